"""``sqlite://``: a kombu transport on one sqlite file, safe across processes.

The embedded default broker. This module is the kombu glue (QoS, Channel,
Transport); the SQL is in :mod:`offload.transport.store`, the heartbeat and
the recovery after a pause in :mod:`offload.transport.lease`, the wake-up
sockets in :mod:`offload.transport.wakeup`.

Every message is a row a consumer leases and deletes on ack; a consumer
that dies (its heartbeat stops for ``visibility_timeout`` seconds) has its
messages given back, so a SIGKILLed worker loses nothing while a live
worker's long task is never delivered twice. A connection consuming from
several queues (a worker's task and control channels) gets their messages
in publish order, the most urgent first: a revoke broadcast reaches the
worker before the task it revokes.

The transport is asynchronous in kombu's sense: a consuming process sleeps
on a unix datagram socket that producers poke after each commit, and that
socket is the readable file descriptor kombu's event loop (the Hub) watches.
So a Celery worker runs its asynchronous consumer and prefork pool on it,
with Celery's defaults, and answers remote control while every pool process
is busy. ``drain_events`` (kombu's blocking API) waits on the same socket.

URL: ``sqlite:////absolute/path/broker.db``; ``sqlite://`` alone is
``offload-broker.sqlite3`` under ``OFFLOAD_DATA_DIR``. Transport options
(or URL query parameters): ``visibility_timeout`` (seconds, default 10),
``lock_timeout`` (seconds a write waits for the file's lock before it fails,
default 5), ``polling_interval`` (seconds between fallback polls, default 1),
``synchronous`` (``NORMAL``: survives any process crash; ``FULL``: also
survives power loss, at an fsync per commit).
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable
from queue import Empty
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from ._sqlite import (BUSY_TIMEOUT, DEFAULT_BROKER_FILE, DatabaseLocked, SQLiteFileError, parse_url,
                      require_sqlite, url_options)
from .lease import ConsumerLease
from .store import Store
from .wakeup import Poker

__all__ = ["Channel", "Transport"]

logger = logging.getLogger("offload.transport.sqlite")

DEFAULT_VISIBILITY_TIMEOUT = 10.0
DEFAULT_POLLING_INTERVAL = 1.0

# kombu's virtual transport framework is extended through its underscore
# methods and attributes (``_get``, ``_put``, ``_restore``, ``_active_queues``,
# ``_consumers``, ``_tag_to_queue``, ``_get_and_deliver``,
# ``_get_message_priority``): they are its subclassing interface, not public
# API. tests/test_transport.py::test_kombu_virtual_interface_is_what_this_module_uses
# fails when a kombu release renames one.

# A lock that is never inherited held: a fork while another thread held it
# would leave the child's copy locked for good.
_lease_lock = threading.Lock()


def _reset_lease_lock() -> None:
    global _lease_lock
    _lease_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lease_lock)


def _expiration(message: dict[str, Any]) -> float | None:
    """A message's time to live in seconds (AMQP's ``expiration``, in ms).

    Celery also sends a task's ``expires`` as its message TTL; a broker
    that drops the expired message leaves the task's future waiting forever.
    So a Celery task message (its headers name the task and its ``expires``)
    is kept and delivered: the worker sees it has expired, revokes it and
    stores REVOKED, as on Redis. Any other message keeps TTL semantics.
    """
    headers = message.get("headers") or {}
    if headers.get("task") and headers.get("expires"):
        return None
    value = message.get("properties", {}).get("expiration")
    try:
        return None if value in (None, "") else float(value) / 1000
    except (TypeError, ValueError):
        return None


class QoS(virtual.QoS):
    """Acks delete the leased row; rejects delete it or give it back."""

    channel: Channel

    def ack(self, delivery_tag: Any) -> None:
        self.channel.settle(int(delivery_tag))
        super().ack(delivery_tag)
        # The consuming loop may be asleep with its prefetch full.
        self.channel.poke_self()

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if not requeue:
            self.channel.settle(int(delivery_tag))
        # With requeue, kombu calls Channel._restore_at_beginning (below).
        super().reject(delivery_tag, requeue=requeue)
        self.channel.poke_self()


class Channel(virtual.Channel):
    """One kombu channel on the broker file."""

    QoS = QoS
    supports_fanout = True
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        #: A forked child (a pool process) inherits this channel; it must
        #: never give back the parent's messages when it exits.
        self.pid = os.getpid()
        self._no_ack_queues: set[str] = set()
        self._auto_delete_queues: set[str] = set()

    @property
    def store(self) -> Store:
        return self.connection.store

    # Leases ---------------------------------------------------------------------

    def settle(self, row_id: int) -> None:
        """An ack or a reject: delete the row if this process still holds it.

        An ack may be the first thing a paused process does when it resumes
        (its pool finished the task meanwhile): renew first, so that a lapsed
        lease reclaims this row before the ack, rather than the row staying
        ready and being delivered a second time."""
        lease = self.connection.lease
        lease.ensure_fresh()
        lease.let_go(row_id)
        if not self.store.settle(row_id, lease.id):
            logger.info("sqlite broker: message %d was settled by another consumer "
                        "(this process's lease had lapsed)", row_id)

    def poke_self(self) -> None:
        self.connection.poke_self()

    def _restore(self, message: Any) -> None:
        # kombu gives back an unacked message (a reject with requeue, a
        # closing channel): make its row ready again, marked redelivered.
        if self.pid != os.getpid():
            return
        lease = self.connection.lease
        row_id = int(message.delivery_tag)
        lease.let_go(row_id)
        try:
            self.store.release([row_id], lease.id)
            self.connection.notify()
        except Exception as exc:
            # The heartbeat stops with this process, so it comes back anyway.
            logger.warning("could not give back message %d: %r", row_id, exc)

    def _restore_at_beginning(self, message: Any) -> None:
        self._restore(message)

    # Messages ----------------------------------------------------------------

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        return self._take(queue, no_ack=queue in self._no_ack_queues)

    def _take(self, queue: str, no_ack: bool) -> dict[str, Any]:
        lease = self.connection.register()
        lease.ensure_fresh()
        taken = self.store.take(queue, None if no_ack else lease.id)
        if taken is None:
            raise Empty()
        row_id, text = taken
        if not no_ack:
            lease.hold(row_id)
        payload = loads(text)
        # The row id is the delivery tag: an ack knows which row to delete.
        payload["properties"]["delivery_tag"] = row_id
        return payload

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self.store.put(queue, self._get_message_priority(message), dumps(message), _expiration(message))
        self.connection.notify()

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str,
                    **kwargs: Any) -> None:
        if self.store.put_fanout(exchange, self._get_message_priority(message), dumps(message),
                                 _expiration(message)):
            self.connection.notify()

    def _purge(self, queue: str) -> int:
        return self.store.purge(queue)

    def _size(self, queue: str) -> int:
        return self.store.size(queue)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        # An event loop delivers what is already waiting on its next turn.
        self.connection.poke_self()
        return result

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue in self._auto_delete_queues and queue not in self._active_queues:
            self._delete(queue)
        return result

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            message = self.Message(self._take(queue, no_ack), channel=self)
        except Empty:
            return None
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    # Queues, exchanges and bindings: in the file, for every process ----------

    def _new_queue(self, queue: str, auto_delete: bool = False, **kwargs: Any) -> None:
        arguments = kwargs.get("arguments") or {}
        raw_ttl = arguments.get("x-message-ttl")
        ttl = None if raw_ttl is None else float(raw_ttl) / 1000
        owner = None
        if auto_delete or arguments.get("x-expires"):
            # Dropped when this connection goes away, or dies.
            lease = self.connection.register()
            owner = lease.id
            lease.own_queue(queue, ttl)
            self._auto_delete_queues.add(queue)
        self.store.declare_queue(queue, owner, ttl)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.store.has_queue(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._auto_delete_queues.discard(queue)
        self.connection.lease.disown_queue(queue)
        self.store.delete_queue(queue)

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False,
                     **kwargs: Any) -> None:
        if if_empty and self._size(queue):
            return
        self.state.queue_bindings_delete(queue)
        self._delete(queue)

    def exchange_declare(self, exchange: str | None = None, type: str = "direct", durable: bool = False,
                         auto_delete: bool = False, arguments: Any = None, nowait: bool = False,
                         passive: bool = False) -> None:
        if passive and exchange and exchange not in self.state.exchanges:
            type_ = self.store.exchange_type(exchange)
            if type_ is not None:
                self.state.exchanges[exchange] = {
                    "type": type_, "durable": True, "auto_delete": False, "arguments": {}, "table": []}
        super().exchange_declare(exchange, type, durable, auto_delete, arguments, nowait, passive)
        if exchange and not passive:
            self.store.declare_exchange(exchange, type or "direct")

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        self.state.exchanges.pop(exchange, None)
        self.store.delete_exchange(exchange)

    def queue_bind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                   arguments: Any = None, **kwargs: Any) -> None:
        exchange = exchange or "amq.direct"
        self.state.binding_declare(queue, exchange, routing_key, arguments)
        self._queue_bind(exchange, *self.typeof(exchange).prepare_bind(
            queue, exchange, routing_key, arguments))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        binding = (exchange, routing_key or "", pattern or "", queue)
        lease = self.connection.lease
        if lease.owns(queue):
            lease.record_binding(binding)
        self.store.bind(*binding)

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                     arguments: Any = None, **kwargs: Any) -> None:
        exchange = exchange or "amq.direct"
        self.state.binding_delete(queue, exchange, routing_key)
        key, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        binding = (exchange, key or "", pattern or "", queue)
        self.connection.lease.forget_binding(binding)
        self.store.unbind(*binding)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        return self.store.table(exchange)

    def list_bindings(self) -> Iterable[tuple[str, str, str]]:
        return self.store.bindings()

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        info = self.state.exchanges.get(exchange)
        if info is not None:
            return self.exchange_types[info["type"]]
        # Declared by another process (a worker replying to a client).
        type_ = self.store.exchange_type(exchange) if exchange else None
        return self.exchange_types[type_ or default]


class Transport(virtual.Transport):
    """The ``sqlite://`` kombu transport."""

    # kombu sets this None in its class body and a list in __init__.
    channels: list[Channel]  # type: ignore[assignment]
    Channel = Channel
    can_parse_url = True
    driver_type = "sqlite"
    driver_name = "sqlite3"
    polling_interval = DEFAULT_POLLING_INTERVAL
    #: At most this many messages are delivered per wake-up (or per
    #: ``drain_events`` call), so that other file descriptors get their turn.
    batch_size = 100
    #: kombu retries a publish on these (after reconnecting). Not on
    #: DatabaseLocked: the store already waited ``lock_timeout`` for the lock.
    recoverable_connection_errors = virtual.Transport.connection_errors + (
        sqlite3.OperationalError, SQLiteFileError)
    #: Celery's worker reconnects on any of these.
    # kombu's base declares a one-error tuple, which mypy takes for the type.
    connection_errors = recoverable_connection_errors + (DatabaseLocked,)  # type: ignore[assignment]
    channel_errors = virtual.Transport.channel_errors
    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        require_sqlite()
        super().__init__(client, **kwargs)
        options = {**url_options(client.hostname or ""), **(client.transport_options or {})}
        self.path = self._path_from(client, options)
        self.visibility_timeout = self._positive(options, "visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
        self.lock_timeout = self._positive(options, "lock_timeout", BUSY_TIMEOUT)
        if "polling_interval" in options:
            self.polling_interval = self._positive(options, "polling_interval", DEFAULT_POLLING_INTERVAL)
        self.synchronous = str(options.get("synchronous", "NORMAL")).upper()
        if self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise SQLiteFileError(f"synchronous must be NORMAL or FULL, got {self.synchronous!r}")
        self._store: Store | None = None
        self._lease: ConsumerLease | None = None
        self._poker = Poker()
        self._loop: Any = None
        self._loop_fd: int | None = None
        self._loop_timer: Any = None

    @staticmethod
    def _positive(options: dict[str, Any], name: str, default: float) -> float:
        try:
            value = float(options.get(name, default))
        except (TypeError, ValueError):
            value = -1.0
        if not value > 0:
            raise SQLiteFileError(f"the sqlite transport option {name} must be a positive number of "
                                  f"seconds, got {options.get(name)!r}")
        return value

    @staticmethod
    def _path_from(client: Any, options: dict[str, Any]) -> str:
        hostname = client.hostname or ""
        if hostname.startswith("sqlite:"):
            return parse_url(hostname, DEFAULT_BROKER_FILE, options.get("data_dir"))
        vhost = client.virtual_host or ""
        path = hostname if hostname.startswith("/") else vhost if vhost.startswith("/") and vhost != "/" else ""
        return parse_url("sqlite:///" + path, DEFAULT_BROKER_FILE, options.get("data_dir"))

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    @property
    def store(self) -> Store:
        """This process's access to the broker file."""
        store = self._store
        if store is None or store.pid != os.getpid():
            store = self._store = Store(self.path, self.synchronous, self.lock_timeout)
        return store

    @property
    def lease(self) -> ConsumerLease:
        """This process's lease (made here, started by :meth:`register`)."""
        lease = self._lease
        if lease is None or lease.pid != os.getpid():
            with _lease_lock:
                lease = self._lease
                if lease is None or lease.pid != os.getpid():
                    if lease is not None:
                        lease.abandon()  # the parent's socket: never read it here
                    lease = self._lease = ConsumerLease(self.store, self.visibility_timeout, self.notify)
        return lease

    def register(self) -> ConsumerLease:
        """Start beating (once per process) before the first lease."""
        lease = self.lease
        lease.start()
        return lease

    def notify(self) -> None:
        """Poke every waiting consumer: something changed."""
        store = self.store
        for consumer, address in self._poker.poke(store.waiters()):
            store.forget_waiter(consumer, address)

    def poke_self(self) -> None:
        lease = self._lease
        if lease is not None and lease.pid == os.getpid() and lease.waker is not None:
            lease.waker.poke()

    def establish_connection(self) -> Any:
        self.store.conn  # noqa: B018 (opens the file now: a bad path fails at connect time)
        return super().establish_connection()

    # Delivery ---------------------------------------------------------------------

    def _deliver_next(self) -> bool:
        """Deliver the next message of all consuming channels; False if none.

        One choice across channels, not kombu's round robin over them: a
        worker's remote-control channel and its task channel are served in
        publish order (see :meth:`Store.next_queue`).
        """
        consuming: dict[str, Channel] = {}
        for channel in self.channels:
            if channel._consumers and channel.qos.can_consume():
                for queue in channel._active_queues:
                    consuming.setdefault(queue, channel)
        for _ in range(3):  # another consumer may take the head first
            if not consuming:
                return False
            queue = self.store.next_queue(list(consuming))
            if queue is None:
                return False
            try:
                consuming[queue]._get_and_deliver(queue, self._deliver)
            except Empty:
                continue
            return True
        return False

    def _deliver_batch(self) -> int:
        """Deliver what is ready now (within prefetch), up to ``batch_size``."""
        delivered = 0
        while delivered < self.batch_size and self._deliver_next():
            delivered += 1
        return delivered

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        lease = self.register()
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 0.001
        while True:
            if self._deliver_batch():
                return
            waker = lease.waker
            wait = self.polling_interval if waker is not None else backoff
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                wait = min(wait, left)
            if waker is not None:
                waker.wait(wait)
            else:
                time.sleep(wait)
                backoff = min(backoff * 2, self.polling_interval)

    # kombu's event loop (the Hub) ----------------------------------------------------

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Watch this process's wake-up socket on ``loop`` (Celery's worker Hub).

        A poke (a producer's commit, an ack that freed prefetch room) makes
        the socket readable and :meth:`on_readable` delivers what is ready;
        a fallback poll every ``polling_interval`` covers a lost wake-up.
        """
        self._unregister_from_loop()
        lease = self.register()
        self._loop = loop
        if lease.waker is not None:
            self._loop_fd = lease.waker.fileno()
            loop.add_reader(self._loop_fd, self.on_readable, self._loop_fd)
        self._loop_timer = loop.call_repeatedly(self.polling_interval, self._on_poll)
        self.poke_self()  # deliver what is already waiting on the loop's next turn

    # kombu's base Transport declares on_readable(connection, loop) for the
    # transports it drives itself; this one is the reader registered above,
    # called with the fd, as kombu's own Redis transport does.
    def on_readable(self, fileno: int) -> None:  # type: ignore[override]
        """The wake-up socket is readable: deliver what is ready."""
        lease = self.lease
        if lease.waker is not None:
            lease.waker.drain()
        if self._deliver_batch() >= self.batch_size:
            self.poke_self()  # more to come: after the loop's other work

    def _on_poll(self) -> None:
        if self._deliver_batch() >= self.batch_size:
            self.poke_self()

    def _unregister_from_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._loop_timer is not None:
            try:
                self._loop_timer.cancel()
            except Exception:  # the loop may be closed already
                pass
            self._loop_timer = None
        if self._loop_fd is not None:
            try:
                loop.remove_reader(self._loop_fd)
            except Exception:
                pass
            self._loop_fd = None

    def close_connection(self, connection: Any) -> None:
        self._unregister_from_loop()
        super().close_connection(connection)  # channels give back their leases
        lease = self._lease
        if lease is not None:
            if lease.pid == os.getpid():
                lease.stop()
            else:
                lease.abandon()
            self._lease = None
