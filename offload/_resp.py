"""A Redis pub/sub connection read in bulk: the result hub's hot path on Redis.

redis-py's ``PubSub.get_message`` spends about 15 µs of Python on each
message (a readiness check, a retry wrapper, a dict built per message);
when thousands of tasks end together that is most of the hub's time, taken
from the threads that submit and from the event loop that answers web
waiters. :class:`Subscriber` keeps redis-py for what it does well (opening
the connection: TLS, authentication, RESP version) and reads the socket
itself: whatever one ``recv`` holds, every reply in it parsed at once, by
hiredis' C reader when it is installed and otherwise by :class:`RespReader`.

:class:`RespReader` is written here because no well-kept pure-Python RESP
parser is importable on its own (redis-py's are private and bound to its
connection's socket buffer); it reads the part of RESP 2 and 3 that a
subscribed connection receives.
"""

from __future__ import annotations

import select
import ssl
from typing import Any

__all__ = ["ProtocolError", "RespReader", "Subscriber", "make_reader"]

#: What one ``recv`` takes at most: a burst of results in a few system calls.
#: Not more: hiredis moves what is left of its buffer after each reply, so a
#: reply costs 0.25 us out of 64 KB fed at once and 2 us out of 1 MB.
READ_SIZE = 1 << 16


class ProtocolError(ConnectionError):
    """The stream is not RESP (or not what a subscribed connection receives)."""


class ReplyError(Exception):
    """An error reply (``-ERR ...``) in the stream."""


_INCOMPLETE = object()


class RespReader:
    """``feed(data)`` then ``gets()`` until it returns False: hiredis.Reader's interface.

    Bulk strings come back as bytes, arrays (and RESP 3 pushes) as lists,
    integers as int, error replies as :class:`ReplyError` instances.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            self._buf = self._buf[self._pos:] + data
            self._pos = 0
        else:
            self._buf += data

    def gets(self) -> Any:
        try:
            value, pos = self._parse(self._pos)
        except ValueError as exc:  # a length or integer that is not a number
            raise ProtocolError(f"malformed RESP: {exc}") from exc
        if value is _INCOMPLETE:
            return False
        self._pos = pos
        return value

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buf
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return _INCOMPLETE, pos
        kind = buf[pos:pos + 1]
        if kind == b"$":
            size = int(buf[pos + 1:end])
            if size < 0:
                return None, end + 2
            start = end + 2
            if len(buf) < start + size + 2:
                return _INCOMPLETE, pos
            return buf[start:start + size], start + size + 2
        if kind in (b"*", b">"):
            count = int(buf[pos + 1:end])
            if count < 0:
                return None, end + 2
            items = []
            at = end + 2
            for _ in range(count):
                item, at = self._parse(at)
                if item is _INCOMPLETE:
                    return _INCOMPLETE, pos
                items.append(item)
            return items, at
        if kind == b":":
            return int(buf[pos + 1:end]), end + 2
        if kind == b"+":
            return buf[pos + 1:end], end + 2
        if kind == b"-":
            return ReplyError(buf[pos + 1:end].decode("utf-8", "replace")), end + 2
        if kind == b"_":
            return None, end + 2
        raise ProtocolError(f"unexpected RESP type {kind!r} on a subscribed connection")


def make_reader() -> Any:
    """hiredis' reader when installed (about ten times faster), else :class:`RespReader`."""
    try:
        import hiredis
    except ImportError:
        return RespReader()
    return hiredis.Reader(replyError=ReplyError, protocolError=ProtocolError)


class Subscriber:
    """One subscribed connection of a redis-py client, read in bulk.

    ``subscribe`` / ``psubscribe`` / ``unsubscribe`` send without waiting:
    their confirmations arrive in the stream, as Redis sends them.
    :meth:`read` returns every reply that has arrived (after waiting up to
    ``timeout`` seconds for the first): lists such as ``[b"pmessage",
    pattern, channel, data]``. A closed or broken connection raises
    ``ConnectionError``; make a new Subscriber then.
    """

    def __init__(self, client: Any, reader: Any = None) -> None:
        self.pool = client.connection_pool
        self.connection = self.pool.get_connection()
        self._reader = reader if reader is not None else make_reader()
        sock = self.connection._sock
        if sock is None:
            self.pool.release(self.connection)
            raise ConnectionError("the Redis connection did not open")
        self._sock = sock
        self._poll = select.poll()  # not select(): a web server's fds pass 1024
        self._poll.register(sock, select.POLLIN)

    def _send(self, *args: Any) -> None:
        # check_health=False: a health check would read a PONG off the
        # stream with redis-py's parser, and with it the replies before it.
        self.connection.send_command(*args, check_health=False)

    def psubscribe(self, *patterns: bytes) -> None:
        self._send("PSUBSCRIBE", *patterns)

    def subscribe(self, *channels: bytes) -> None:
        self._send("SUBSCRIBE", *channels)

    def unsubscribe(self, *channels: bytes) -> None:
        self._send("UNSUBSCRIBE", *channels)

    def read(self, timeout: float) -> list[Any]:
        replies = self._drain()
        if replies:
            return replies
        sock = self._sock
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not pending and not self._poll.poll(max(timeout, 0.0) * 1000.0):
            return []
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return []
        except OSError as exc:
            raise ConnectionError(f"the result stream broke: {exc}") from exc
        if not data:
            raise ConnectionError("Redis closed the result stream")
        self._reader.feed(data)
        return self._drain()

    def _drain(self) -> list[Any]:
        replies = []
        gets = self._reader.gets
        reply = gets()
        while reply is not False:
            if isinstance(reply, ReplyError):
                raise ConnectionError(f"Redis refused a subscription: {reply}")
            replies.append(reply)
            reply = gets()
        return replies

    def close(self) -> None:
        try:
            self._poll.unregister(self._sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            self.connection.disconnect()
        finally:
            self.pool.release(self.connection)
