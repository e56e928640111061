"""What the sqlite broker and the sqlite result backend share.

URL parsing, opening a database file the way both need it (WAL, a busy
timeout, incremental vacuum) and retrying a statement while another process
holds the write lock. Only the standard library's :mod:`sqlite3`.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from kombu.exceptions import OperationalError as KombuOperationalError

from .errors import ConfigurationError
from .files import create_private_file, fallback_data_dir, make_private_dirs

__all__ = ["DatabaseLocked", "SQLiteFileError", "connect", "is_busy", "parse_url", "require_sqlite",
           "retrying", "url_options", "LocalConnections"]

T = TypeVar("T")

#: File names under ``OFFLOAD_DATA_DIR`` when a URL is just ``sqlite://``.
DEFAULT_BROKER_FILE = "offload-broker.sqlite3"
DEFAULT_RESULTS_FILE = "offload-results.sqlite3"

#: The default bound, in seconds, on a write waiting for the file's write
#: lock (the ``lock_timeout`` transport option): a statement waits this long
#: inside sqlite, and the retry loop around it stops once it has passed, so a
#: write fails within about this time (twice it at the very worst).
BUSY_TIMEOUT = 5.0

#: The oldest sqlite the broker and backend run on: ``RETURNING`` (3.35).
MIN_SQLITE = (3, 35, 0)


class SQLiteFileError(ConfigurationError, OSError):
    """The database file of the embedded broker or backend cannot be used."""


class DatabaseLocked(KombuOperationalError):
    """Another connection held the file's write lock for longer than ``lock_timeout``.

    A kombu ``OperationalError``: kombu does not retry it on a publish (the
    wait already happened here), and offload's ``submit`` turns it into
    :class:`~offload.BrokerUnavailable`.
    """


def require_sqlite(version: tuple[int, ...] | None = None) -> None:
    """Fail clearly when the sqlite library Python links lacks what offload needs."""
    version = tuple(sqlite3.sqlite_version_info if version is None else version)
    if version < MIN_SQLITE:
        have = ".".join(map(str, version))
        need = ".".join(map(str, MIN_SQLITE))
        raise ConfigurationError(
            f"the embedded sqlite:// broker and backend need SQLite {need} or newer (for RETURNING); "
            f"this Python uses SQLite {have}. Use a newer Python build, or configure another broker "
            "(CELERY_BROKER_URL=redis://... or amqp://...).")


def parse_url(url: str, default_file: str, data_dir: str | None = None) -> str:
    """The absolute path of the database file a ``sqlite://`` URL names.

    ``sqlite:////abs/path.db`` is absolute, ``sqlite:///rel/path.db`` is
    relative to the current directory (as in SQLAlchemy), and ``sqlite://``
    alone is ``default_file`` under ``data_dir`` (else ``$OFFLOAD_DATA_DIR``,
    else ``./instance``).

    >>> parse_url("sqlite:////tmp/q.db", "x.db")
    '/tmp/q.db'
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a sqlite URL is a string, got {url!r}")
    scheme, sep, rest = url.partition("://")
    if scheme != "sqlite" or not sep:
        raise ConfigurationError(
            f"{url!r} is not a sqlite URL; write sqlite:////absolute/path/file.db "
            "(four slashes), or sqlite:// for the default file under OFFLOAD_DATA_DIR")
    rest = rest.partition("?")[0]
    if rest in ("", "/"):
        folder = data_dir or os.environ.get("OFFLOAD_DATA_DIR") or fallback_data_dir()
        return os.path.abspath(os.path.join(folder, default_file))
    if not rest.startswith("/"):
        # sqlite://name/file.db: a host part, which a local file cannot have.
        raise ConfigurationError(
            f"{url!r} names a host ({rest.partition('/')[0]!r}); the sqlite broker is a local "
            "file: write sqlite:////absolute/path/file.db (four slashes)")
    path = rest[1:]
    if not path or path.endswith("/"):
        raise ConfigurationError(f"{url!r} names a folder, not a file; add a file name")
    if path == ":memory:":
        raise ConfigurationError(
            f"{url!r}: an in-memory database cannot be shared with worker processes; name a file")
    return os.path.abspath(path)


def url_options(url: str) -> dict[str, str]:
    """Options given in a URL's query: ``sqlite:////q.db?visibility_timeout=5``."""
    from urllib.parse import parse_qsl

    return dict(parse_qsl(url.partition("?")[2]))


def is_busy(exc: BaseException) -> bool:
    """True for the errors that mean "another connection holds the lock"."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def retrying(operation: Callable[[], T], deadline: float = BUSY_TIMEOUT, path: str = "") -> T:
    """Run ``operation`` until it gets past SQLITE_BUSY, with jittered backoff.

    sqlite's own busy handler already waits up to the connection's timeout
    per statement; this loop covers the cases it does not (a lock upgrade
    refused at once in WAL mode). Once ``deadline`` seconds have passed,
    :class:`DatabaseLocked` is raised: nothing is ever dropped silently.
    """
    give_up = time.monotonic() + deadline
    delay = 0.001
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            if time.monotonic() >= give_up:
                raise _locked(path, deadline, exc) from exc
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.1)


def _locked(path: str, deadline: float, exc: BaseException) -> DatabaseLocked:
    return DatabaseLocked(
        f"the sqlite file {path or '(broker)'} stayed locked by another connection for more than "
        f"{deadline:g} s ({exc}); is a process holding a long transaction on it? "
        "The lock_timeout transport option sets this bound.")


def release_free_pages(conn: sqlite3.Connection, min_free_pages: int) -> bool:
    """Give the file's free pages back (incremental vacuum) once at least
    ``min_free_pages`` piled up; whether it did."""
    if conn.execute("PRAGMA freelist_count").fetchone()[0] < min_free_pages:
        return False
    # executescript steps it to the end; execute() would free one page.
    retrying(lambda: conn.executescript("PRAGMA incremental_vacuum"), BUSY_TIMEOUT)
    return True


def _prepare_folder(path: str) -> None:
    folder = os.path.dirname(path)
    try:
        make_private_dirs(folder)
    except OSError as exc:
        raise SQLiteFileError(
            f"cannot create the folder {folder!r} for the sqlite file {os.path.basename(path)!r}: "
            f"{exc.strerror or exc}. Point OFFLOAD_DATA_DIR (or the sqlite:// URL) at a writable folder."
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SQLiteFileError(
            f"the folder {folder!r} is not writable; sqlite needs to create {os.path.basename(path)!r} "
            "and its -wal/-shm files there. Point OFFLOAD_DATA_DIR (or the sqlite:// URL) at a "
            "writable folder.")


def connect(path: str, schema: str, synchronous: str = "NORMAL",
            busy_timeout: float | None = None,
            upgrade: Callable[[sqlite3.Connection], None] | None = None) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with a busy timeout, creating ``schema`` once.

    ``upgrade`` then brings a file an older release made up to date (a
    column added since); it must be harmless to run again, and to run in two
    processes at once.

    The connection is in autocommit mode (``isolation_level=None``): single
    statements commit by themselves and multi-statement writes use
    ``BEGIN IMMEDIATE`` so that they wait for the write lock up front.
    """
    require_sqlite()
    _prepare_folder(path)
    busy_timeout = busy_timeout or BUSY_TIMEOUT
    try:
        create_private_file(path)  # owner-only; sqlite gives its -wal/-shm files the same mode
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False, cached_statements=256)
    except (sqlite3.Error, OSError) as exc:
        raise SQLiteFileError(f"cannot open the sqlite file {path!r}: {exc}") from None
    try:
        # auto_vacuum only takes effect before the first table exists: it is
        # what lets the file shrink back when a queue drains. Setting it takes
        # the file's write lock, so it is set on a new file only: every
        # connection a thread opens would otherwise queue behind the writers.
        if not retrying(lambda: conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone(), busy_timeout, path):
            retrying(lambda: conn.execute("PRAGMA auto_vacuum=INCREMENTAL"), busy_timeout, path)
        retrying(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone(), busy_timeout, path)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        # After a checkpoint the -wal file is cut back to this size.
        conn.execute("PRAGMA journal_size_limit=4194304")
        retrying(lambda: conn.executescript(schema), busy_timeout, path)
        if upgrade is not None:
            retrying(lambda: upgrade(conn), busy_timeout, path)
    except DatabaseLocked:
        conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_busy(exc):
            raise _locked(path, busy_timeout, exc) from exc
        raise SQLiteFileError(
            f"cannot use {path!r} as an offload sqlite file: {exc}. "
            "Is it writable, and a sqlite database (or absent)?") from None
    return conn


class LocalConnections:
    """One connection per process and thread to one file.

    sqlite connections must not cross a ``fork()`` (Celery's prefork pool
    forks after the app has connected), and one connection per thread needs
    no lock around it.
    """

    def __init__(self, path: str, schema: str, synchronous: str = "NORMAL",
                 busy_timeout: float = BUSY_TIMEOUT,
                 upgrade: Callable[[sqlite3.Connection], None] | None = None) -> None:
        self.path = path
        self._schema = schema
        self._upgrade = upgrade
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._local = threading.local()

    def get(self) -> sqlite3.Connection:
        local = self._local
        pid = os.getpid()
        if getattr(local, "pid", None) != pid:
            local.conn = connect(self.path, self._schema, self._synchronous, self._busy_timeout,
                                 self._upgrade)
            local.pid = pid
        return local.conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.__dict__.clear()
