"""``sqlite://``: a Celery result backend on one sqlite file.

A key-value table (``key``, ``value``, ``expires``, ``seq``). ``mget`` reads
any number of keys in a few ``IN (...)`` queries. Every write also numbers
its row (``seq``, one more than any number given before, in commit order):
:meth:`SQLiteBackend.changes` reads what was written since a number, so
offload's result hub reads each new state once, not every followed id on
every poll. A process that follows results registers a wake-up socket
(:meth:`SQLiteBackend.watch`); writers poke it after each commit, so it reads
as soon as something changed. Results expire after ``result_expires``
without ``celery beat``: reads ignore expired rows and writers delete them
now and then.

URL: ``sqlite:////absolute/path/results.db``; ``sqlite://`` alone is
``offload-results.sqlite3`` under ``OFFLOAD_DATA_DIR``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from celery import states
from celery.backends.base import KeyValueStoreBackend
from kombu.utils.encoding import bytes_to_str

from . import REVOKED_BEFORE_START
from ._sqlite import DEFAULT_RESULTS_FILE, LocalConnections, parse_url, release_free_pages, retrying
from .wakeup import Poker, Waker

__all__ = ["ResultWatch", "SQLiteBackend"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value, expires REAL, seq INTEGER);
CREATE INDEX IF NOT EXISTS results_expires ON results (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS result_changes (id INTEGER PRIMARY KEY CHECK (id = 1), last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS result_watchers (address TEXT PRIMARY KEY);
"""

#: The highest change number given so far: the rows' own, or the one kept in
#: ``result_changes`` when the row that held it was deleted (a number is never
#: given twice, so a reader that has passed it misses nothing).
_LAST_SEQ = ("max(coalesce((SELECT max(seq) FROM results), 0), "
             "coalesce((SELECT last FROM result_changes WHERE id = 1), 0))")
_UPSERT = f"INSERT OR REPLACE INTO results (key, value, expires, seq) VALUES (?, ?, ?, {_LAST_SEQ} + 1)"
#: A task's state (:meth:`SQLiteBackend._store_result`): stored unless a live
#: row already holds SUCCESS, or, for a STARTED (the last ``?`` is 1),
#: REVOKED. Celery's own store reads the row first, then writes.
_STATUS_OF_ROW = "(CASE WHEN json_valid(CAST(results.value AS TEXT)) " \
                 "THEN json_extract(CAST(results.value AS TEXT), '$.status') END)"
_STORE_STATE = (f"{_UPSERT.replace('INSERT OR REPLACE', 'INSERT')} "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires = excluded.expires, "
                "seq = excluded.seq WHERE NOT ((results.expires IS NULL OR results.expires > ?) AND "
                f"({_STATUS_OF_ROW} IS 'SUCCESS' OR (? AND {_STATUS_OF_ROW} IS 'REVOKED')))")
#: Before a delete: keep the highest number in ``result_changes``.
_KEEP_LAST_SEQ = ("INSERT INTO result_changes (id, last) VALUES (1, coalesce((SELECT max(seq) FROM results), 0)) "
                  "ON CONFLICT (id) DO UPDATE SET last = max(last, excluded.last)")
#: Seconds a writer goes on poking the watchers it read before it reads them
#: again (a new watcher polls on its own until then).
_WATCHERS_TTL = 0.5


def _upgrade(conn: sqlite3.Connection) -> None:
    # A file made before change numbers existed: add the column (its old
    # rows keep NULL, which only a full read finds) and its index.
    if "seq" not in {row[1] for row in conn.execute("PRAGMA table_info(results)")}:
        try:
            conn.execute("ALTER TABLE results ADD COLUMN seq INTEGER")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc).lower():  # another process added it first
                raise
    conn.execute("CREATE INDEX IF NOT EXISTS results_seq ON results (seq)")

#: sqlite's default limit on ``?`` parameters in one statement is 32766;
#: a few hundred keys per query is already one cheap index walk each.
_MGET_CHUNK = 500
#: Seconds between two sweeps of expired rows (done by a writer, lazily).
_SWEEP_INTERVAL = 60.0
#: Expired results deleted per transaction.
_SWEEP_BATCH = 2000
_DELETE_EXPIRED = ("DELETE FROM results WHERE key IN "
                   "(SELECT key FROM results WHERE expires IS NOT NULL AND expires <= ? LIMIT ?)")


class SQLiteBackend(KeyValueStoreBackend):
    """Celery results in a sqlite file, shared by every process on the machine."""

    # Keys are text in the file (readable with the sqlite3 shell).
    key_t = staticmethod(bytes_to_str)
    implements_incr = True
    supports_autoexpire = True
    supports_native_join = True

    def __init__(self, url: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, url=url, **kwargs)
        options = self.app.conf.get("result_backend_transport_options") or {}
        self.url = url or "sqlite://"
        self.path = parse_url(self.url, DEFAULT_RESULTS_FILE, options.get("data_dir"))
        synchronous = str(options.get("synchronous", "NORMAL")).upper()
        self._conns = LocalConnections(self.path, SCHEMA, synchronous, upgrade=_upgrade)
        self._next_sweep = 0.0
        self._poker = Poker()
        self._watchers: list[tuple[str, str]] = []
        self._watchers_until = 0.0

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {}, url=self.url)
        return super().__reduce__(args, kwargs)

    def as_uri(self, include_password: bool = False) -> str:
        return "sqlite:///" + self.path

    @property
    def _conn(self) -> Any:
        return self._conns.get()

    def _ttl(self, seconds: Any = None) -> float | None:
        seconds = self.expires if seconds is None else seconds
        if not seconds:
            return None
        return time.time() + float(seconds)

    def get(self, key: Any) -> Any:
        row = self._conn.execute(
            "SELECT value FROM results WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (bytes_to_str(key), time.time())).fetchone()
        return row[0] if row else None

    def mget(self, keys: Sequence[Any]) -> list[Any]:
        """Values for ``keys`` in order (None where missing or expired)."""
        names = [bytes_to_str(key) for key in keys]
        found: dict[str, Any] = {}
        now = time.time()
        conn = self._conn
        for start in range(0, len(names), _MGET_CHUNK):
            chunk = names[start:start + _MGET_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(conn.execute(
                f"SELECT key, value FROM results WHERE key IN ({marks}) "
                "AND (expires IS NULL OR expires > ?)", (*chunk, now)))
        return [found.get(name) for name in names]

    def set(self, key: Any, value: Any) -> None:
        conn = self._conn
        params = (bytes_to_str(key), value, self._ttl())
        retrying(lambda: conn.execute(_UPSERT, params), path=self.path)
        self._wake_watchers()
        self._maybe_sweep()

    #: A STARTED store tells a task revoked before it ran (offload.result_store.OneCallStore).
    checks_revoked_on_start = True

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        """Celery's read-then-write of a task's state, as one statement.

        The same meta and rules as Celery's key-value store (a SUCCESS stays),
        and a STARTED is not written over a REVOKED: the request is marked
        for offload's task base to skip the run.
        """
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        started = state == states.STARTED
        conn = self._conn
        params = (bytes_to_str(self.get_key_for_task(task_id)), value, self._ttl(), time.time(), int(started))
        stored = retrying(lambda: conn.execute(_STORE_STATE, params).rowcount, path=self.path)
        if stored:
            self._wake_watchers()
            self._maybe_sweep()
        elif started and request is not None:
            if self.get_task_meta(task_id, cache=False).get("status") == states.REVOKED:
                setattr(request, REVOKED_BEFORE_START, True)
        return result

    def set_many(self, items: Sequence[tuple[Any, Any]]) -> None:
        """Store ``(key, value)`` pairs in one transaction (a chunk's results)."""
        conn = self._conn
        expires = self._ttl()
        rows = [(bytes_to_str(key), value, expires) for key, value in items]

        def write() -> None:
            # Autocommit connection: one explicit transaction, one commit.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        retrying(write, path=self.path)
        self._wake_watchers()
        self._maybe_sweep()

    def _deleting(self, sql: str, params: tuple[Any, ...]) -> int:
        # A delete keeps the highest change number first, in one transaction.
        conn = self._conn

        def write() -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_KEEP_LAST_SEQ)
                deleted = conn.execute(sql, params).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return deleted

        return retrying(write, path=self.path)

    def delete(self, key: Any) -> None:
        self._deleting("DELETE FROM results WHERE key = ?", (bytes_to_str(key),))

    def expire(self, key: Any, value: Any) -> None:
        conn = self._conn
        params = (self._ttl(value), bytes_to_str(key))
        retrying(lambda: conn.execute("UPDATE results SET expires = ? WHERE key = ?", params), path=self.path)

    def incr(self, key: Any) -> int:
        conn = self._conn
        params = (bytes_to_str(key), self._ttl())
        rows = retrying(lambda: conn.execute(
            "INSERT INTO results (key, value, expires) VALUES (?, 1, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1 "
            "RETURNING value", params).fetchall(), path=self.path)
        return int(rows[0][0])

    def cleanup(self) -> None:
        """Delete expired results now (``celery beat``'s cleanup calls this too)."""
        # A batch per transaction: a sweep of a million results must not keep
        # the file's writers (a submit among them) waiting for seconds.
        now = time.time()
        while self._deleting(_DELETE_EXPIRED, (now, _SWEEP_BATCH)) == _SWEEP_BATCH:
            pass
        release_free_pages(self._conn, min_free_pages=65, path=self.path)

    # Following changes ----------------------------------------------------------

    def last_change(self) -> int:
        """The number of the latest write: :meth:`changes` after it returns only newer ones."""
        return int(self._conn.execute(f"SELECT {_LAST_SEQ}").fetchone()[0])

    def changes(self, after: int, limit: int = 1000) -> tuple[list[tuple[str, Any]], int]:
        """``(task id, stored value)`` of the task results written after change ``after``
        (at most ``limit`` writes, oldest first), and the number to pass next time.

        A write after ``after`` that replaced another is found once, with
        its latest value; rows of other keys (groups, counters) are skipped.
        """
        rows = self._conn.execute("SELECT key, value, seq FROM results WHERE seq > ? ORDER BY seq LIMIT ?",
                                  (after, limit)).fetchall()
        if not rows:
            return [], after
        prefix = bytes_to_str(self.task_keyprefix)
        start = len(prefix)
        return [(key[start:], value) for key, value, _ in rows if key.startswith(prefix)], int(rows[-1][2])

    def watch(self) -> ResultWatch:
        """A wake-up socket of this process, poked by every writer after each commit."""
        return ResultWatch(self)

    def _add_watcher(self, address: str) -> None:
        conn = self._conn
        retrying(lambda: conn.execute("INSERT OR IGNORE INTO result_watchers (address) VALUES (?)", (address,)),
                 path=self.path)

    def _remove_watcher(self, address: str) -> None:
        conn = self._conn
        retrying(lambda: conn.execute("DELETE FROM result_watchers WHERE address = ?", (address,)),
                 path=self.path)

    def _wake_watchers(self) -> None:
        # After a commit; a wake-up is a hint (the watcher also polls), so
        # nothing here may fail the write that is already stored.
        try:
            now = time.monotonic()
            if now >= self._watchers_until:
                self._watchers = [(address, address) for (address,) in
                                  self._conn.execute("SELECT address FROM result_watchers")]
                self._watchers_until = now + _WATCHERS_TTL
            if self._watchers:
                for _, address in self._poker.poke(self._watchers):
                    # Nobody listens there any more: a process that ended without closing.
                    self._remove_watcher(address)
                    self._watchers_until = 0.0
        except Exception:
            pass

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_INTERVAL
            try:
                self.cleanup()
            except Exception:  # a busy file: the next sweep will do it
                pass


class ResultWatch:
    """One process's wake-up socket, registered in the results file.

    Every writer pokes it after each commit (:meth:`SQLiteBackend.set`);
    :meth:`wait` returns once poked. Writers read the registrations every
    half second, so a new watch polls on its own until then; one whose
    process died is dropped by the first writer that finds nobody there.
    """

    def __init__(self, backend: SQLiteBackend) -> None:
        self._backend = backend
        self._waker = Waker()
        self.address = self._waker.address
        try:
            backend._add_watcher(self.address)
        except BaseException:
            self._waker.close()
            raise

    def fileno(self) -> int:
        """Readable when poked."""
        return self._waker.fileno()

    def wait(self, timeout: float) -> bool:
        """Sleep until poked (True) or ``timeout`` seconds pass (False)."""
        return self._waker.wait(timeout)

    def poke(self) -> None:
        """Wake this watch's own :meth:`wait` (to stop it)."""
        self._waker.poke()

    def close(self) -> None:
        """Unregister (best effort: writers drop a dead address anyway) and close the socket."""
        try:
            self._backend._remove_watcher(self.address)
        except Exception:
            pass
        self._waker.close()
