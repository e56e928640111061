"""The broker file: its schema and every statement the ``sqlite://`` transport runs.

No kombu here. A message is a row; a consumer *leases* a row (``owner`` is
its id) instead of removing it, and deletes it on ack. Each consumer keeps a
heartbeat row in ``consumers``; a consumer whose heartbeat is older than the
visibility timeout is dead, and :meth:`Store.sweep` gives what it held back
to the queue and drops the queues it owned (a worker's pidbox queue).

Queues, bindings and exchange types live in the file too, so that direct,
topic and fanout routing work across processes.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from ._sqlite import BUSY_TIMEOUT, LocalConnections, release_free_pages, retrying

__all__ = ["Store", "SCHEMA"]

logger = logging.getLogger("offload.transport.sqlite")

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

#: The write-ahead log's length (bytes) a drained broker file may keep
#: (:meth:`Store.compact`): 64 pages.
WAL_KEPT = 64 * 4096

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
    """The SQL of one broker file; safe to share between the threads of a process.

    ``lock_timeout`` bounds every write: one that cannot get the file's write
    lock within it raises :class:`~offload.transport._sqlite.DatabaseLocked`.
    """

    def __init__(self, path: str, synchronous: str = "NORMAL", lock_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        #: The process this store belongs to (connections never cross a fork).
        self.pid = os.getpid()
        self.lock_timeout = lock_timeout
        self._conns = LocalConnections(path, SCHEMA, synchronous, busy_timeout=lock_timeout)
        #: A vacuum freed pages but its checkpoint could not finish yet.
        self._checkpoint_due = False

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection to the file."""
        return self._conns.get()

    def _write(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        conn = self.conn
        return retrying(lambda: conn.execute(sql, tuple(params)), self.lock_timeout, path=self.path)

    def _returning(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        conn = self.conn
        # fetchall: an autocommit statement commits only once fully stepped.
        return retrying(lambda: conn.execute(sql, tuple(params)).fetchall(), self.lock_timeout, path=self.path)

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

        retrying(run, self.lock_timeout, path=self.path)

    # Messages --------------------------------------------------------------

    def put(self, queue: str, priority: int, payload: str, ttl: float | None = None) -> None:
        """Append a message; ``ttl`` (seconds) wins over the queue's own TTL."""
        now = time.time()
        self._write(
            "INSERT INTO messages (queue, priority, payload, expires) VALUES (?, ?, ?, "
            "coalesce(?, (SELECT ? + ttl FROM queues WHERE name = ? AND ttl IS NOT NULL)))",
            (queue, priority, payload, None if ttl is None else now + ttl, now, queue))

    def put_fanout(self, exchange: str, priority: int, payload: str, ttl: float | None = None) -> int:
        """One copy per queue bound to ``exchange``; how many were stored.

        An exchange nobody is bound to (Celery's events while no monitor
        listens: two per task) costs a read, not the file's write lock:
        an insert that stores nothing still takes it.
        """
        if self.conn.execute("SELECT NOT EXISTS (SELECT 1 FROM bindings WHERE exchange = ?)",
                             (exchange,)).fetchone()[0]:
            return 0
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

    def settle(self, row_id: int, owner: str) -> bool:
        """Delete a message ``owner`` holds (an ack, a reject); False if it no
        longer holds it (its lease lapsed and someone else has it now)."""
        return self._write("DELETE FROM messages WHERE id = ? AND owner = ?", (row_id, owner)).rowcount > 0

    def release(self, row_ids: list[int], owner: str) -> None:
        """Make leased rows ready again (a reject with requeue, a shutdown)."""
        if row_ids:
            conn = self.conn
            retrying(lambda: conn.executemany(
                f"UPDATE messages SET {_GIVE_BACK} WHERE id = ? AND owner = ?",
                [(row_id, owner) for row_id in row_ids]), self.lock_timeout, path=self.path)

    def reclaim(self, row_ids: list[int], owner: str) -> set[int]:
        """Lease again what ``owner`` held before its lease lapsed, where the
        rows are still waiting in their queue; the ids it holds again."""
        got: set[int] = set()
        for start in range(0, len(row_ids), 500):
            chunk = row_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            got.update(row[0] for row in self._returning(
                f"UPDATE messages SET owner = ? WHERE id IN ({marks}) AND owner IS NULL RETURNING id",
                (owner, *chunk)))
        return got

    def size(self, queue: str) -> int:
        return self.conn.execute(f"SELECT count(*) FROM messages WHERE queue = ? AND {_READY}",
                                 (queue, time.time())).fetchone()[0]

    def purge(self, queue: str) -> int:
        return self._write(f"DELETE FROM messages WHERE queue = ? AND {_READY}",
                           (queue, time.time())).rowcount

    # Queues, exchanges, bindings -----------------------------------------

    def declare_queue(self, queue: str, owner: str | None, ttl: float | None = None) -> None:
        """Create or update a queue; an ``owner`` makes it go away with that consumer."""
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
        """``(routing_key, pattern, queue)`` of every binding of ``exchange``."""
        return [tuple(row) for row in self.conn.execute(
            "SELECT routing_key, pattern, queue FROM bindings WHERE exchange = ?", (exchange,))]

    def bindings(self) -> list[tuple[str, str, str]]:
        """``(queue, exchange, routing_key)`` of every binding."""
        return [tuple(row) for row in self.conn.execute("SELECT queue, exchange, routing_key FROM bindings")]

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

    def beat(self, consumer: str, wake: str | None) -> bool:
        """Renew ``consumer``'s heartbeat; False if its row was gone (it had
        been swept as dead), in which case it is registered afresh."""
        now = time.time()
        if self._write("UPDATE consumers SET beat = ?, wake = ? WHERE id = ?",
                       (now, wake, consumer)).rowcount:
            return True
        self._write("INSERT INTO consumers (id, beat, wake) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET beat = excluded.beat, wake = excluded.wake",
                    (consumer, now, wake))
        return False

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

    def waiters(self) -> list[tuple[str, str]]:
        """``(consumer, wake-up address)`` of every consumer that sleeps on a socket."""
        return self.conn.execute("SELECT id, wake FROM consumers WHERE wake IS NOT NULL").fetchall()

    def forget_waiter(self, consumer: str, address: str) -> None:
        """Nobody listens at ``address`` any more: stop poking it."""
        self._write("UPDATE consumers SET wake = NULL WHERE id = ? AND wake = ?", (consumer, address))

    def compact(self, min_free_pages: int = 16) -> None:
        """Give free pages back to the file system once enough piled up,
        and the write-ahead log's length once the queues are drained."""
        conn = self.conn
        if release_free_pages(conn, min_free_pages, self.path) or self._drained_with_a_long_log():
            self._checkpoint_due = True
        if not self._checkpoint_due:
            return
        # The truncation reaches the main file at a checkpoint, and TRUNCATE
        # also cuts the -wal file to nothing. A reader in another process
        # makes it stop short; it is tried again at the next call, without
        # ever waiting long.
        conn.execute("PRAGMA busy_timeout=50")
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            self._checkpoint_due = bool(busy)
        except sqlite3.OperationalError:
            pass
        finally:
            conn.execute(f"PRAGMA busy_timeout={int(self.lock_timeout * 1000)}")

    def _drained_with_a_long_log(self) -> bool:
        # The log keeps the length of the last burst until a checkpoint
        # truncates it; the vacuum asks for one only when it freed pages,
        # and a drain may end with fewer free pages than min_free_pages.
        # Not while messages wait: a busy broker keeps its log, and its
        # writers never meet a truncating checkpoint.
        if self._checkpoint_due:
            return False
        try:
            if os.stat(self.path + "-wal").st_size <= WAL_KEPT:
                return False
        except OSError:
            return False
        return not self.conn.execute("SELECT EXISTS (SELECT 1 FROM messages)").fetchone()[0]

    def close(self) -> None:
        """Close this thread's connection."""
        self._conns.close()
