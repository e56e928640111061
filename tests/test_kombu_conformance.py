"""The behaviours kombu's own generic integration suite checks of a transport
(t/integration/common.py: BasicFunctionality, BaseExchangeTypes,
BasePriority, BaseMessage, BaseTimeToLive, BaseEventLoop), written here against
``sqlite://`` and, as a reference, against Redis: a check that passes on
Redis and fails on sqlite is a conformance bug in offload's transport.

kombu's suite is not shipped in its wheel, so these are offload's own checks
of the same behaviours, not a copy of kombu's code.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from contextlib import closing

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import OperationalError

import offload  # noqa: F401  (registers the sqlite:// transport)
from conftest import require_service


@pytest.fixture(params=["sqlite", "redis"])
def connection(request, tmp_path):
    if request.param == "redis":
        require_service("redis")
        return Connection("redis://127.0.0.1:6379/15")
    return Connection(f"sqlite:///{tmp_path}/conformance.db")


@pytest.fixture
def sqlite_connection(tmp_path):
    """For what Redis's transport does differently by design (priorities, TTL)."""
    return Connection(f"sqlite:///{tmp_path}/conformance.db")


@pytest.fixture
def name() -> str:
    return f"conf-{uuid.uuid4().hex[:10]}"


def drain_all(conn: Connection, received: list, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.5)
        except socket.timeout:
            pass


# BasicFunctionality ------------------------------------------------------------


def test_connect_and_channels(connection):
    with connection as conn:
        conn.connect()
        assert conn.connected
        with conn.channel() as channel:
            assert channel is not None
        assert conn.default_channel is not None


def test_failed_connection_raises_a_kombu_error():
    with pytest.raises(OperationalError):
        Connection("sqlite:////proc/offload-nope/x.db").ensure_connection(max_retries=1)


def test_publish_consume_and_consume_empty_queue(connection, name):
    queue = Queue(name, routing_key=name)
    received = []
    with connection as conn, conn.channel() as channel:
        Producer(channel).publish({"hello": "world"}, exchange=queue.exchange,
                                  routing_key=name, declare=[queue], retry=True)
        with Consumer(conn, [queue], callbacks=[lambda b, m: (received.append(b), m.ack())]):
            drain_all(conn, received, 1)
            assert received == [{"hello": "world"}]
            with pytest.raises(socket.timeout):
                conn.drain_events(timeout=0.3)


def test_simple_queue_and_buffer(connection, name):
    with connection as conn:
        with closing(conn.SimpleQueue(name)) as queue:
            queue.put({"n": 1}, headers={"k": "v"})
            message = queue.get(timeout=2)
            assert message.payload == {"n": 1} and message.headers["k"] == "v"
            message.ack()
        with closing(conn.SimpleBuffer(name + "-buf")) as buffer:
            buffer.put({"n": 2})
            assert buffer.get(timeout=2).payload == {"n": 2}  # no ack needed


# BaseExchangeTypes ---------------------------------------------------------------


def _consume(conn: Connection, queues: list[Queue], count: int) -> list:
    received: list = []
    with Consumer(conn, queues, callbacks=[lambda b, m: (received.append(b), m.ack())]):
        drain_all(conn, received, count)
    return received


def test_direct_routing_keys(connection, name):
    exchange = Exchange(name, "direct")
    a, b = Queue(name + "-a", exchange, "a"), Queue(name + "-b", exchange, "b")
    with connection as conn:
        producer = conn.Producer()
        producer.publish({"to": "a"}, exchange=exchange, routing_key="a", declare=[a, b])
        producer.publish({"to": "b"}, exchange=exchange, routing_key="b")
        assert _consume(conn, [a], 1) == [{"to": "a"}]
        assert _consume(conn, [b], 1) == [{"to": "b"}]


def test_fanout(connection, name):
    # One listener per connection, as each worker has its own.
    exchange = Exchange(name, "fanout")
    queues = [Queue(name + "-a", exchange), Queue(name + "-b", exchange)]
    with connection as first, connection.clone() as second:
        received: dict[int, list] = {0: [], 1: []}
        consumers = [Consumer(conn, [queue], callbacks=[
            lambda body, m, i=i: (received[i].append(body), m.ack())])
            for i, (conn, queue) in enumerate(zip((first, second), queues))]
        for consumer in consumers:
            consumer.consume()
        # Redis subscribes (pub/sub) on the first drain: be listening first.
        for conn in (first, second):
            drain_all(conn, [], 1, timeout=0.3)
        first.Producer().publish({"all": 1}, exchange=exchange, declare=[exchange])
        for i, conn in enumerate((first, second)):
            drain_all(conn, received[i], 1)
        for consumer in consumers:
            consumer.cancel()
        assert received == {0: [{"all": 1}], 1: [{"all": 1}]}


def test_topic(connection, name):
    exchange = Exchange(name, "topic")
    errors = Queue(name + "-e", exchange, "*.error")
    everything = Queue(name + "-all", exchange, "#")
    with connection as conn:
        producer = conn.Producer()
        producer.publish({"r": "db.error"}, exchange=exchange, routing_key="db.error",
                         declare=[errors, everything])
        producer.publish({"r": "db.info"}, exchange=exchange, routing_key="db.info")
        assert _consume(conn, [errors], 1) == [{"r": "db.error"}]
        assert sorted(m["r"] for m in _consume(conn, [everything], 2)) == ["db.error", "db.info"]


# BasePriority and BaseMessage -----------------------------------------------------


def test_priority_and_requeue_keep_order(sqlite_connection, name):
    high, low, top = 6, 3, 9  # as AMQP: a higher number is served first
    queue = Queue(name, routing_key=name, max_priority=10)
    with sqlite_connection as conn:
        producer = conn.Producer()
        for body, priority in (("first", low), ("second", high), ("third", low)):
            producer.publish({"m": body}, exchange=queue.exchange, routing_key=name,
                             declare=[queue], priority=priority)
        bound = queue(conn.default_channel)
        taken = [bound.get() for _ in range(3)]
        assert [m.payload["m"] for m in taken] == ["second", "first", "third"]
        for message in taken:
            message.requeue()
        producer.publish({"m": "fourth"}, exchange=queue.exchange, routing_key=name, priority=top)
        order = []
        while (message := bound.get()) is not None:
            order.append(message.payload["m"])
            message.ack()
        assert order == ["fourth", "second", "first", "third"]


@pytest.mark.parametrize("settle, comes_back", [
    ("ack", False), ("reject", False), ("reject_requeue", True), ("requeue", True)])
def test_ack_reject_requeue(connection, name, settle, comes_back):
    with connection as conn, closing(conn.SimpleQueue(name)) as queue:
        queue.put({"x": 1})
        message = queue.get(timeout=2)
        {"ack": message.ack, "reject": message.reject, "requeue": message.requeue,
         "reject_requeue": lambda: message.reject(requeue=True)}[settle]()
        if comes_back:
            again = queue.get(timeout=2)
            assert again.payload == {"x": 1}
            again.ack()
        else:
            with pytest.raises(queue.Empty):
                queue.get(timeout=0.3)


# BaseTimeToLive ------------------------------------------------------------------


def test_expired_messages_are_not_delivered(sqlite_connection, name):
    # (kombu's Redis transport has no per-message TTL.)
    with sqlite_connection as conn, closing(conn.SimpleQueue(name)) as queue:
        queue.put({"short": 1}, expiration=0.2)
        queue.put({"long": 1})
        time.sleep(0.4)
        message = queue.get(timeout=2)
        assert message.payload == {"long": 1}
        message.ack()
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.3)


# BaseEventLoop ---------------------------------------------------------------------


def test_consume_on_kombus_event_loop_with_acks_from_another_thread(connection, name):
    """What Celery's worker does: the connection on kombu's Hub, messages
    delivered when the transport's file descriptor is readable, each ack
    handed back to the loop from another thread; prefetch 1, so the second
    message comes only once the first is acked."""
    from kombu.asynchronous import Hub

    queue = Queue(name, routing_key=name)
    hub = Hub()
    acked: list = []
    acked_event = threading.Event()

    def ack(message):
        message.ack()
        acked.append(message.payload)
        if len(acked) == 3:
            acked_event.set()

    def callback(body, message):
        threading.Timer(0.05, hub.call_soon, (ack, message)).start()

    with connection as conn:
        producer = conn.Producer()
        for body in range(3):
            producer.publish(body, exchange=queue.exchange, routing_key=name, declare=[queue])
        consumer = Consumer(conn, [queue], callbacks=[callback], prefetch_count=1)
        with consumer:
            try:
                conn.register_with_event_loop(hub)
                deadline = time.monotonic() + 10
                while not acked_event.is_set() and time.monotonic() < deadline:
                    hub.run_once()
                assert acked == [0, 1, 2]
            finally:
                hub.close()
                queue(consumer.channel).delete()


def test_sqlite_is_asynchronous_for_celery(sqlite_connection):
    # What makes Celery choose its event loop (and AsynPool) for a worker.
    assert sqlite_connection.transport.implements.asynchronous is True
