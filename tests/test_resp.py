"""The result hub's bulk reader of a Redis pub/sub stream (offload._resp).

The parser against hand-written RESP (every split point of a stream, the
types a subscribed connection receives, malformed input), and the
Subscriber against the local Redis: its replies are what Redis sends.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from offload._resp import ProtocolError, ReplyError, RespReader, Subscriber
from conftest import wait_until

REDIS_URL = "redis://127.0.0.1:6379/10"

STREAM = (
    b"*3\r\n$10\r\npsubscribe\r\n$3\r\np:*\r\n:1\r\n"
    b"*4\r\n$8\r\npmessage\r\n$3\r\np:*\r\n$4\r\np:ab\r\n$10\r\n{\"a\":\"\r\n\"}\r\n"
    b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$0\r\n\r\n"
    b"*2\r\n$4\r\npong\r\n$-1\r\n"
    b"+OK\r\n"
    b"*2\r\n*1\r\n:-7\r\n_\r\n"
)
EXPECTED = [
    [b"psubscribe", b"p:*", 1],
    [b"pmessage", b"p:*", b"p:ab", b'{"a":"\r\n"}'],  # CRLF inside a bulk string
    [b"message", b"c", b""],
    [b"pong", None],
    b"OK",
    [[-7], None],
]


def read_all(reader, chunks):
    replies = []
    for chunk in chunks:
        reader.feed(chunk)
        reply = reader.gets()
        while reply is not False:
            replies.append(reply)
            reply = reader.gets()
    return replies


def test_the_reader_parses_a_stream_in_one_piece():
    assert read_all(RespReader(), [STREAM]) == EXPECTED


def test_the_reader_parses_a_stream_split_at_every_byte():
    for cut in range(1, len(STREAM)):
        assert read_all(RespReader(), [STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
    assert read_all(RespReader(), [STREAM[i:i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_the_reader_returns_an_error_reply_as_an_exception_value():
    reader = RespReader()
    reader.feed(b"-ERR unknown command\r\n")
    reply = reader.gets()
    assert isinstance(reply, ReplyError) and "unknown command" in str(reply)
    assert reader.gets() is False


@pytest.mark.parametrize("garbage", [b"?what\r\n", b"$abc\r\n", b"*x\r\n", b":1.5\r\n"])
def test_the_reader_refuses_what_is_not_resp(garbage):
    reader = RespReader()
    reader.feed(garbage)
    with pytest.raises(ProtocolError):
        reader.gets()


def test_the_subscriber_hears_what_redis_publishes():
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"offload-test-resp-{uuid.uuid4().hex}:".encode()
    subscriber = Subscriber(client)
    try:
        subscriber.psubscribe(prefix + b"*")
        subscriber.subscribe(prefix + b"plain")
        replies: list = []
        assert wait_until(lambda: replies.extend(subscriber.read(0.1)) or len(replies) >= 2, 10)
        assert {r[0] for r in replies} == {b"psubscribe", b"subscribe"}
        assert subscriber.read(0.0) == []  # nothing more: no wait
        big = b"x" * 300_000  # more than one recv takes
        with client.pipeline(transaction=False) as pipe:
            for i in range(500):
                pipe.publish(prefix + b"t%d" % i, b"%d" % i)
            pipe.publish(prefix + b"plain", big)
            pipe.execute()
        heard: list = []
        assert wait_until(lambda: heard.extend(subscriber.read(0.1)) or len(heard) >= 502, 10)
        patterned = [r for r in heard if r[0] == b"pmessage"]
        # One reply per message, in publish order (each pattern hears the plain one too).
        assert [r[3] for r in patterned[:500]] == [b"%d" % i for i in range(500)]
        assert [r[2] for r in heard if r[0] == b"message"] == [big]
        subscriber.unsubscribe(prefix + b"plain")
        assert wait_until(lambda: any(r[0] == b"unsubscribe" for r in subscriber.read(0.1)), 10)
    finally:
        subscriber.close()


def test_a_subscriber_whose_connection_is_killed_raises_connection_error():
    client = redis.Redis.from_url(REDIS_URL)
    subscriber = Subscriber(client)
    try:
        subscriber.subscribe(f"offload-test-resp-{uuid.uuid4().hex}".encode())
        assert wait_until(lambda: subscriber.read(0.1), 10)
        host, port = subscriber.connection._sock.getsockname()[:2]
        assert client.client_kill_filter(_type=None, addr=f"{host}:{port}") == 1
        deadline = time.monotonic() + 10
        with pytest.raises(ConnectionError):
            while time.monotonic() < deadline:
                subscriber.read(0.1)
    finally:
        subscriber.close()
