"""``sqlite://``: a kombu transport on one sqlite file, safe across processes.

The embedded default broker. Every message is a row; a consumer *leases* a
row (sets ``owner`` to its id) instead of removing it, and deletes it on ack.
Each consuming connection keeps a heartbeat row in ``consumers``; once a
heartbeat is older than ``visibility_timeout`` seconds, any live consumer
gives that dead consumer's rows back to the queue. So a worker that is
SIGKILLed loses nothing, while a live worker's long task is never delivered
twice (the lease lasts as long as the worker lives, not a fixed time).

Bindings and exchange types live in the file too, not in each process's
memory, so direct, topic and fanout routing work across processes: that is
what Celery's remote control (``inspect ping``, ``revoke``) needs.

A connection consuming from several queues (a worker's task and control
channels) gets their messages in publish order, the most urgent first: a
revoke broadcast reaches the worker before the task it revokes.

Consumers wait on a unix datagram socket whose address is in their
``consumers`` row; a producer pokes every waiter after each commit. A worker
therefore sees a new message within a millisecond or so, and an idle worker
sleeps in ``select()`` (one fallback poll per ``polling_interval``).

URL: ``sqlite:////absolute/path/broker.db``; ``sqlite://`` alone is
``offload-broker.sqlite3`` under ``OFFLOAD_DATA_DIR``. Transport options:
``visibility_timeout`` (seconds, default 10), ``polling_interval`` (seconds
between fallback polls, default 1), ``synchronous`` (``NORMAL``: survives any
process crash; ``FULL``: also survives power loss, at an fsync per commit).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from queue import Empty
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from ._sqlite import (BUSY_TIMEOUT, DEFAULT_BROKER_FILE, LocalConnections, SQLiteFileError, parse_url,
                      release_free_pages, retrying,
                      url_options)

__all__ = ["Channel", "Transport"]

logger = logging.getLogger("offload.transport.sqlite")

DEFAULT_VISIBILITY_TIMEOUT = 10.0
DEFAULT_POLLING_INTERVAL = 1.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL,
    owner TEXT,
    expires REAL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, priority DESC, id)
    WHERE owner IS NULL;
CREATE INDEX IF NOT EXISTS messages_leased ON messages (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY, owner TEXT, ttl REAL);
CREATE TABLE IF NOT EXISTS bindings (
    exchange TEXT NOT NULL, routing_key TEXT NOT NULL, pattern TEXT NOT NULL, queue TEXT NOT NULL,
    PRIMARY KEY (exchange, routing_key, pattern, queue)
);
CREATE TABLE IF NOT EXISTS exchanges (name TEXT PRIMARY KEY, type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS consumers (id TEXT PRIMARY KEY, beat REAL NOT NULL, wake TEXT);
"""

#: "Ready": not leased and not past its expiry (the parameter: now).
_READY = "owner IS NULL AND (expires IS NULL OR expires > ?)"

#: A leased row made ready again: its next delivery says it is a redelivery
#: (``delivery_info["redelivered"]``, as AMQP and kombu's Redis transport do;
#: Celery's ``Reject(requeue=True)`` pattern depends on it).
_GIVE_BACK = ("owner = NULL, payload = CASE WHEN json_valid(payload) THEN json_set(payload, "
              "'$.properties.delivery_info.redelivered', json('true')) ELSE payload END")

#: "Owned by a consumer that has stopped beating" (the parameter: oldest live beat).
_DEAD_OWNER = "owner IS NOT NULL AND owner NOT IN (SELECT id FROM consumers WHERE beat >= ?)"


class Store:
    """The SQL of the broker file; safe to share between threads."""

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._conns = LocalConnections(path, SCHEMA, synchronous)
        self._sender: socket.socket | None = None
        self._sender_pid = 0

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conns.get()

    def _write(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        conn = self.conn
        return retrying(lambda: conn.execute(sql, tuple(params)))

    def _returning(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        conn = self.conn
        # fetchall: an autocommit statement commits only once fully stepped.
        return retrying(lambda: conn.execute(sql, tuple(params)).fetchall())

    def _transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        conn = self.conn

        def run() -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        retrying(run)

    # Messages --------------------------------------------------------------

    def put(self, queue: str, priority: int, payload: str, ttl: float | None = None) -> None:
        now = time.time()
        # A message's own expiration wins; else the queue's x-message-ttl.
        self._write(
            "INSERT INTO messages (queue, priority, payload, expires) VALUES (?, ?, ?, "
            "coalesce(?, (SELECT ? + ttl FROM queues WHERE name = ? AND ttl IS NOT NULL)))",
            (queue, priority, payload, None if ttl is None else now + ttl, now, queue))

    def put_fanout(self, exchange: str, priority: int, payload: str, ttl: float | None = None) -> int:
        now = time.time()
        return self._write(
            "INSERT INTO messages (queue, priority, payload, expires) "
            "SELECT DISTINCT b.queue, ?, ?, coalesce(?, ? + q.ttl) FROM bindings AS b "
            "LEFT JOIN queues AS q ON q.name = b.queue WHERE b.exchange = ?",
            (priority, payload, None if ttl is None else now + ttl, now, exchange)).rowcount

    def take(self, queue: str, owner: str | None) -> tuple[int, str] | None:
        """Lease the next ready message (or remove it when ``owner`` is None)."""
        conn = self.conn
        while True:
            # A read first: an empty poll then takes no write lock at all.
            row = conn.execute(
                f"SELECT id FROM messages WHERE queue = ? AND {_READY} "
                "ORDER BY priority DESC, id LIMIT 1", (queue, time.time())).fetchone()
            if row is None:
                return None
            if owner is None:
                got = self._returning("DELETE FROM messages WHERE id = ? AND owner IS NULL "
                                      "RETURNING payload", (row[0],))
            else:
                got = self._returning("UPDATE messages SET owner = ? WHERE id = ? AND owner IS NULL "
                                      "RETURNING payload", (owner, row[0]))
            if got:
                return row[0], got[0][0]
            # Another consumer took it between the two statements: look again.

    def next_queue(self, queues: list[str]) -> str | None:
        """Of ``queues``, the one whose next message comes first.

        Each queue's head is its most urgent, then oldest, ready message;
        the heads are compared the same way. So messages of several queues
        go out in the order they were published (a revoke broadcast before
        the task it revokes), and a higher priority still goes first.
        """
        best: tuple[int, int, str] | None = None
        now = time.time()
        for start in range(0, len(queues), 200):  # under sqlite's compound-select limit
            chunk = queues[start:start + 200]
            heads = " UNION ALL ".join(
                f"SELECT * FROM (SELECT queue, priority, id FROM messages WHERE queue = ? AND {_READY} "
                "ORDER BY priority DESC, id LIMIT 1)" for _ in chunk)
            row = self.conn.execute(
                f"SELECT queue, priority, id FROM ({heads}) ORDER BY priority DESC, id LIMIT 1",
                [value for queue in chunk for value in (queue, now)]).fetchone()
            if row is not None and (best is None or (-row[1], row[2]) < (-best[0], best[1])):
                best = (row[1], row[2], row[0])
        return None if best is None else best[2]

    def delete_message(self, row_id: int) -> None:
        self._write("DELETE FROM messages WHERE id = ?", (row_id,))

    def release(self, row_ids: list[int], owner: str) -> None:
        """Make leased rows ready again (a reject with requeue, a shutdown)."""
        if row_ids:
            conn = self.conn
            retrying(lambda: conn.executemany(
                f"UPDATE messages SET {_GIVE_BACK} WHERE id = ? AND owner = ?",
                [(row_id, owner) for row_id in row_ids]))

    def size(self, queue: str) -> int:
        return self.conn.execute(f"SELECT count(*) FROM messages WHERE queue = ? AND {_READY}",
                                 (queue, time.time())).fetchone()[0]

    def purge(self, queue: str) -> int:
        return self._write(f"DELETE FROM messages WHERE queue = ? AND {_READY}",
                           (queue, time.time())).rowcount

    # Queues, exchanges, bindings -----------------------------------------

    def declare_queue(self, queue: str, owner: str | None, ttl: float | None = None) -> None:
        row = self.conn.execute("SELECT owner, ttl FROM queues WHERE name = ?", (queue,)).fetchone()
        if row is None or tuple(row) != (owner, ttl):
            self._write("INSERT INTO queues (name, owner, ttl) VALUES (?, ?, ?) ON CONFLICT (name) "
                        "DO UPDATE SET owner = excluded.owner, ttl = excluded.ttl", (queue, owner, ttl))

    def has_queue(self, queue: str) -> bool:
        return self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM queues WHERE name = ?) "
            "OR EXISTS (SELECT 1 FROM messages WHERE queue = ?)", (queue, queue)).fetchone()[0] == 1

    def delete_queue(self, queue: str) -> None:
        self._transaction([
            ("DELETE FROM messages WHERE queue = ?", (queue,)),
            ("DELETE FROM bindings WHERE queue = ?", (queue,)),
            ("DELETE FROM queues WHERE name = ?", (queue,)),
        ])

    def bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        if self.conn.execute(
                "SELECT 1 FROM bindings WHERE exchange = ? AND routing_key = ? AND pattern = ? "
                "AND queue = ?", (exchange, routing_key, pattern, queue)).fetchone() is None:
            self._write("INSERT OR IGNORE INTO bindings VALUES (?, ?, ?, ?)",
                        (exchange, routing_key, pattern, queue))

    def unbind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self._write("DELETE FROM bindings WHERE exchange = ? AND routing_key = ? AND pattern = ? "
                    "AND queue = ?", (exchange, routing_key, pattern, queue))

    def table(self, exchange: str) -> list[tuple[str, str, str]]:
        return [tuple(row) for row in self.conn.execute(
            "SELECT routing_key, pattern, queue FROM bindings WHERE exchange = ?", (exchange,))]

    def declare_exchange(self, exchange: str, type_: str) -> None:
        row = self.conn.execute("SELECT type FROM exchanges WHERE name = ?", (exchange,)).fetchone()
        if row is None or row[0] != type_:
            self._write("INSERT OR REPLACE INTO exchanges VALUES (?, ?)", (exchange, type_))

    def exchange_type(self, exchange: str) -> str | None:
        row = self.conn.execute("SELECT type FROM exchanges WHERE name = ?", (exchange,)).fetchone()
        return row[0] if row else None

    def delete_exchange(self, exchange: str) -> None:
        self._transaction([
            ("DELETE FROM bindings WHERE exchange = ?", (exchange,)),
            ("DELETE FROM exchanges WHERE name = ?", (exchange,)),
        ])

    # Consumers ---------------------------------------------------------------

    def beat(self, consumer: str, wake: str | None) -> None:
        self._write("INSERT INTO consumers (id, beat, wake) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET beat = excluded.beat, wake = excluded.wake",
                    (consumer, time.time(), wake))

    def unregister(self, consumer: str) -> None:
        """A clean exit: give leased messages back, drop auto-delete queues."""
        owned = "SELECT name FROM queues WHERE owner = ?"
        self._transaction([
            (f"UPDATE messages SET {_GIVE_BACK} WHERE owner = ?", (consumer,)),
            (f"DELETE FROM messages WHERE queue IN ({owned})", (consumer,)),
            (f"DELETE FROM bindings WHERE queue IN ({owned})", (consumer,)),
            ("DELETE FROM queues WHERE owner = ?", (consumer,)),
            ("DELETE FROM consumers WHERE id = ?", (consumer,)),
        ])

    def sweep(self, visibility_timeout: float) -> int:
        """Recover what dead consumers held; the number of messages made ready.

        Read-only unless something is dead, so that every live consumer can
        run it every few seconds for next to nothing.
        """
        now = time.time()
        oldest_live = now - visibility_timeout
        conn = self.conn
        if conn.execute("SELECT EXISTS (SELECT 1 FROM messages WHERE owner IS NULL AND expires <= ?)",
                        (now,)).fetchone()[0]:
            self._write("DELETE FROM messages WHERE owner IS NULL AND expires <= ?", (now,))
        leased = conn.execute(f"SELECT count(*) FROM messages WHERE {_DEAD_OWNER}",
                              (oldest_live,)).fetchone()[0]
        orphaned = conn.execute(f"SELECT EXISTS (SELECT 1 FROM queues WHERE {_DEAD_OWNER})",
                                (oldest_live,)).fetchone()[0]
        stale = conn.execute("SELECT EXISTS (SELECT 1 FROM consumers WHERE beat < ?)",
                             (oldest_live,)).fetchone()[0]
        if not (leased or orphaned or stale):
            return 0
        dead_queues = f"SELECT name FROM queues WHERE {_DEAD_OWNER}"
        self._transaction([
            (f"UPDATE messages SET {_GIVE_BACK} WHERE {_DEAD_OWNER}", (oldest_live,)),
            # A dead worker's pidbox queue would otherwise collect every
            # broadcast forever.
            (f"DELETE FROM messages WHERE queue IN ({dead_queues})", (oldest_live,)),
            (f"DELETE FROM bindings WHERE queue IN ({dead_queues})", (oldest_live,)),
            (f"DELETE FROM queues WHERE {_DEAD_OWNER}", (oldest_live,)),
            ("DELETE FROM consumers WHERE beat < ?", (oldest_live,)),
        ])
        if leased:
            logger.warning("sqlite broker: %d message(s) of a dead consumer are ready again", leased)
        return leased

    def compact(self, min_free_pages: int = 16) -> None:
        """Give free pages back to the file system once enough piled up."""
        conn = self.conn
        if not release_free_pages(conn, min_free_pages):
            return
        # The truncation reaches the main file at a checkpoint, and TRUNCATE
        # also cuts the -wal file to nothing; never wait long for it, though.
        conn.execute("PRAGMA busy_timeout=50")
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError:
            pass
        finally:
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")

    # Wake-ups ----------------------------------------------------------------

    def notify(self) -> None:
        """Poke every waiting consumer: something changed."""
        waiters = self.conn.execute("SELECT id, wake FROM consumers WHERE wake IS NOT NULL").fetchall()
        if not waiters:
            return
        if self._sender is None or self._sender_pid != os.getpid():
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sender.setblocking(False)
            self._sender_pid = os.getpid()
        for consumer, address in waiters:
            try:
                self._sender.sendto(b"!", _socket_address(address))
            except BlockingIOError:
                pass  # its buffer is full of wake-ups already
            except (ConnectionRefusedError, FileNotFoundError):
                # Nobody listens there any more: the process is gone.
                self._write("UPDATE consumers SET wake = NULL WHERE id = ? AND wake = ?",
                            (consumer, address))
            except OSError:
                logger.debug("could not wake %s", address, exc_info=True)

    def close(self) -> None:
        self._conns.close()


def _socket_address(stored: str) -> str:
    # Linux abstract socket names start with a NUL byte; the db keeps '@'.
    return "\0" + stored[1:] if stored.startswith("@") else stored


class _Waker:
    """The socket a consumer sleeps on until a producer pokes it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"offload-{uuid.uuid4().hex[:16]}"
        if sys.platform.startswith("linux"):
            # An abstract address: no file to clean up, no path length limit.
            self.address = "@" + name
        else:
            self.address = os.path.join(tempfile.gettempdir(), name)
        self.sock.bind(_socket_address(self.address))
        self.sock.setblocking(False)

    def wait(self, timeout: float) -> None:
        readable, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if readable:
            try:
                while self.sock.recv(64):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def poke(self) -> None:
        try:
            self.sock.sendto(b"!", _socket_address(self.address))
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except OSError:
                pass


class QoS(virtual.QoS):
    """Acks delete the leased row; rejects and shutdowns release it."""

    channel: Channel

    def ack(self, delivery_tag: Any) -> None:
        self.channel._store().delete_message(int(delivery_tag))
        super().ack(delivery_tag)
        # The consuming thread may be asleep with its prefetch full.
        self.channel._poke_self()

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        channel = self.channel
        if requeue:
            channel._store().release([int(delivery_tag)], channel._owner())
            channel._store().notify()
        else:
            channel._store().delete_message(int(delivery_tag))
        self._quick_ack(delivery_tag)
        channel._poke_self()

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        if not tags or self.channel._pid != os.getpid():
            return []  # a forked child must not give back its parent's leases
        try:
            self.channel._store().release([int(tag) for tag in tags], self.channel._owner())
            self.channel._store().notify()
        except Exception as exc:
            # The heartbeat stops with this process, so they come back anyway.
            logger.warning("could not give back %d message(s): %r", len(tags), exc)
        return []


def _expiration(message: dict[str, Any]) -> float | None:
    """A message's ``expiration`` property (AMQP: milliseconds) in seconds."""
    value = message.get("properties", {}).get("expiration")
    try:
        return None if value in (None, "") else float(value) / 1000
    except (TypeError, ValueError):
        return None


class Channel(virtual.Channel):
    """One kombu channel on the broker file."""

    QoS = QoS
    supports_fanout = True
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._pid = os.getpid()
        self._no_ack_queues: set[str] = set()
        self._auto_delete_queues: set[str] = set()

    def _store(self) -> Store:
        return self.connection.store

    def _owner(self) -> str:
        return self.connection.consumer_id()

    def _poke_self(self) -> None:
        waker = self.connection._waker
        if waker is not None:
            waker.poke()

    # Messages ----------------------------------------------------------------

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        return self._take(queue, no_ack=queue in self._no_ack_queues)

    def _take(self, queue: str, no_ack: bool) -> dict[str, Any]:
        owner = None if no_ack else self.connection.register()
        taken = self._store().take(queue, owner)
        if taken is None:
            raise Empty()
        row_id, text = taken
        payload = loads(text)
        # The row id is the delivery tag: an ack knows which row to delete.
        payload["properties"]["delivery_tag"] = row_id
        return payload

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        store = self._store()
        store.put(queue, self._get_message_priority(message), dumps(message), _expiration(message))
        store.notify()

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str,
                    **kwargs: Any) -> None:
        store = self._store()
        if store.put_fanout(exchange, self._get_message_priority(message), dumps(message),
                            _expiration(message)):
            store.notify()

    def _purge(self, queue: str) -> int:
        return self._store().purge(queue)

    def _size(self, queue: str) -> int:
        return self._store().size(queue)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue in self._auto_delete_queues and queue not in self._active_queues:
            self._auto_delete_queues.discard(queue)
            self._store().delete_queue(queue)
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
        owner = None
        if auto_delete or arguments.get("x-expires"):
            # Dropped when this connection goes away, or dies.
            owner = self.connection.register()
            self._auto_delete_queues.add(queue)
        ttl = arguments.get("x-message-ttl")
        self._store().declare_queue(queue, owner, None if ttl is None else float(ttl) / 1000)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self._store().has_queue(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._auto_delete_queues.discard(queue)
        self._store().delete_queue(queue)

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False,
                     **kwargs: Any) -> None:
        if if_empty and self._size(queue):
            return
        self.state.queue_bindings_delete(queue)
        self._delete(queue)

    def exchange_declare(self, exchange: str | None = None, type: str = "direct",
                         *args: Any, passive: bool = False, **kwargs: Any) -> None:
        if passive and exchange and exchange not in self.state.exchanges:
            type_ = self._store().exchange_type(exchange)
            if type_ is not None:
                self.state.exchanges[exchange] = {
                    "type": type_, "durable": True, "auto_delete": False, "arguments": {}, "table": []}
        super().exchange_declare(exchange, type, *args, passive=passive, **kwargs)
        if exchange and not passive:
            self._store().declare_exchange(exchange, type or "direct")

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        self.state.exchanges.pop(exchange, None)
        self._store().delete_exchange(exchange)

    def queue_bind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                   arguments: Any = None, **kwargs: Any) -> None:
        exchange = exchange or "amq.direct"
        self.state.binding_declare(queue, exchange, routing_key, arguments)
        self._queue_bind(exchange, *self.typeof(exchange).prepare_bind(
            queue, exchange, routing_key, arguments))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self._store().bind(exchange, routing_key or "", pattern or "", queue)

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                     arguments: Any = None, **kwargs: Any) -> None:
        exchange = exchange or "amq.direct"
        self.state.binding_delete(queue, exchange, routing_key)
        key, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._store().unbind(exchange, key or "", pattern or "", queue)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        return self._store().table(exchange)

    def list_bindings(self) -> Iterable[tuple[str, str, str]]:
        conn = self._store().conn
        return [tuple(row) for row in conn.execute("SELECT queue, exchange, routing_key FROM bindings")]

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        info = self.state.exchanges.get(exchange)
        if info is not None:
            return self.exchange_types[info["type"]]
        # Declared by another process (a worker replying to a client).
        type_ = self._store().exchange_type(exchange) if exchange else None
        return self.exchange_types[type_ or default]

    def close(self) -> None:
        super().close()


class Transport(virtual.Transport):
    """The ``sqlite://`` kombu transport."""

    Channel = Channel
    can_parse_url = True
    driver_type = "sqlite"
    driver_name = "sqlite3"
    polling_interval = DEFAULT_POLLING_INTERVAL
    #: At most this many messages are delivered per ``drain_events`` call.
    batch_size = 100
    connection_errors = virtual.Transport.connection_errors + (sqlite3.OperationalError, SQLiteFileError)
    channel_errors = virtual.Transport.channel_errors
    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = {**url_options(client.hostname or ""), **(client.transport_options or {})}
        self.path = self._path_from(client, options)
        self.visibility_timeout = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
        if self.visibility_timeout <= 0:
            raise SQLiteFileError(f"visibility_timeout must be positive, got {self.visibility_timeout}")
        if "polling_interval" in options:
            self.polling_interval = float(options["polling_interval"])
        self.synchronous = str(options.get("synchronous", "NORMAL")).upper()
        if self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise SQLiteFileError(f"synchronous must be NORMAL or FULL, got {self.synchronous!r}")
        self._store: Store | None = None
        self._store_pid = 0
        self._consumer: str | None = None
        self._consumer_pid = 0
        self._register_lock = threading.Lock()
        self._waker: _Waker | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

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
        if self._store is None or self._store_pid != os.getpid():
            self._store = Store(self.path, self.synchronous)
            self._store_pid = os.getpid()
        return self._store

    def establish_connection(self) -> Any:
        self.store.conn  # opens the file now: a bad path fails at connect time
        return super().establish_connection()

    # Consumers: the heartbeat that keeps our leases ----------------------------

    def consumer_id(self) -> str:
        if self._consumer is None or self._consumer_pid != os.getpid():
            self._consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            self._consumer_pid = os.getpid()
        return self._consumer

    def register(self) -> str:
        """Start beating (once per process) before the first lease; our id."""
        consumer = self.consumer_id()
        if self._heartbeat is not None and self._heartbeat.is_alive():
            return consumer
        with self._register_lock:
            if self._heartbeat is None or not self._heartbeat.is_alive():
                if self._waker is None:
                    try:
                        self._waker = _Waker()
                    except OSError:
                        logger.info("no unix socket for wake-ups; polling instead", exc_info=True)
                self.store.beat(consumer, self._waker.address if self._waker else None)
                self._stop.clear()
                self._heartbeat = threading.Thread(
                    target=self._beat_forever, args=(consumer,),
                    name="offload-sqlite-heartbeat", daemon=True)
                self._heartbeat.start()
        return consumer

    def _beat_forever(self, consumer: str) -> None:
        interval = max(0.1, self.visibility_timeout / 5)
        wake = self._waker.address if self._waker else None
        store = self.store
        while not self._stop.wait(interval):
            if consumer != self._consumer or os.getpid() != self._consumer_pid:
                return
            try:
                store.beat(consumer, wake)
                if store.sweep(self.visibility_timeout):
                    store.notify()
                store.compact()
            except Exception:
                logger.warning("sqlite broker heartbeat failed; retrying", exc_info=True)
        store.close()

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

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        self.register()
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 0.001
        while True:
            if self._deliver_next():
                # Hand over what else is ready now (within prefetch) in the
                # same call, as a socket broker would in one read.
                for _ in range(self.batch_size - 1):
                    if not self._deliver_next():
                        break
                return
            wait = self.polling_interval if self._waker is not None else backoff
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                wait = min(wait, left)
            if self._waker is not None:
                self._waker.wait(wait)
            else:
                time.sleep(wait)
                backoff = min(backoff * 2, self.polling_interval)

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)  # channels give back their leases
        self._stop.set()
        if self._consumer is not None and self._consumer_pid == os.getpid():
            try:
                self.store.unregister(self._consumer)
                self.store.notify()
            except Exception:
                logger.debug("could not unregister %s", self._consumer, exc_info=True)
        if self._waker is not None:
            self._waker.close()
            self._waker = None
