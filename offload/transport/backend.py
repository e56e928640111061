"""``sqlite://``: a Celery result backend on one sqlite file.

A key-value table (``key``, ``value``, ``expires``). ``mget`` reads any number
of keys in a few ``IN (...)`` queries, which is what offload's result watcher
polls with. Results expire after ``result_expires`` without ``celery beat``:
reads ignore expired rows and writers delete them now and then.

URL: ``sqlite:////absolute/path/results.db``; ``sqlite://`` alone is
``offload-results.sqlite3`` under ``OFFLOAD_DATA_DIR``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery.backends.base import KeyValueStoreBackend
from kombu.utils.encoding import bytes_to_str

from ._sqlite import DEFAULT_RESULTS_FILE, LocalConnections, parse_url, release_free_pages, retrying

__all__ = ["SQLiteBackend"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value, expires REAL);
CREATE INDEX IF NOT EXISTS results_expires ON results (expires) WHERE expires IS NOT NULL;
"""

#: sqlite's default limit on ``?`` parameters in one statement is 32766;
#: a few hundred keys per query is already one cheap index walk each.
_MGET_CHUNK = 500
#: Seconds between two sweeps of expired rows (done by a writer, lazily).
_SWEEP_INTERVAL = 60.0


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
        self._conns = LocalConnections(self.path, SCHEMA, synchronous)
        self._next_sweep = 0.0

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
        retrying(lambda: conn.execute(
            "INSERT OR REPLACE INTO results (key, value, expires) VALUES (?, ?, ?)", params), path=self.path)
        self._maybe_sweep()

    def set_many(self, items: Sequence[tuple[Any, Any]]) -> None:
        """Store ``(key, value)`` pairs in one transaction (a chunk's results)."""
        conn = self._conn
        expires = self._ttl()
        rows = [(bytes_to_str(key), value, expires) for key, value in items]

        def write() -> None:
            # Autocommit connection: one explicit transaction, one commit.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO results (key, value, expires) VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        retrying(write)
        self._maybe_sweep()

    def delete(self, key: Any) -> None:
        conn = self._conn
        retrying(lambda: conn.execute("DELETE FROM results WHERE key = ?", (bytes_to_str(key),)),
                 path=self.path)

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
        conn = self._conn
        retrying(lambda: conn.execute(
            "DELETE FROM results WHERE expires IS NOT NULL AND expires <= ?", (time.time(),)), path=self.path)
        release_free_pages(conn, min_free_pages=65)

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_INTERVAL
            try:
                self.cleanup()
            except Exception:  # a busy file: the next sweep will do it
                pass
