"""What the sqlite broker and the sqlite result backend share.

URL parsing, opening a database file the way both need it (WAL, a busy
timeout, incremental vacuum) and retrying a statement while another process
holds the write lock. Only the standard library's :mod:`sqlite3`.
"""

from __future__ import annotations

import io
import os
import random
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

try:
    import fcntl
except ImportError:  # not a POSIX system: sqlite's own lock alone
    fcntl = None  # type: ignore[assignment]

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


class WriterTurns:
    """Offload's writers to one file take turns on a lock of their own first.

    When a write finds the file's write lock held, sqlite's busy handler
    sleeps 1 ms, then 2, then 5 and more, while offload's writes hold that
    lock for tens of microseconds: two processes that meet (a submit and a
    worker's ack) lose a millisecond or more each time. So offload's
    writers first take an ``flock`` on ``<file>-lock``, polled from 20 us
    on: they then meet sqlite's lock free, and a write waits about as long
    as the ones before it take. Other programs' writers meet sqlite's lock
    as before; the lock is only a turn, sqlite's is what keeps the file
    whole.

    Each holder writes the time it took the turn into the lock file. A
    waiter goes on waiting while the turns move (a long line of writers on
    a loaded machine); while one holder has kept the turn for :attr:`WAIT`
    seconds or more (paused, or in a long transaction), writes are done
    without, at once. Giving up on a line that moves would be worse than
    waiting in it: the writers that left it meet sqlite's lock, whose
    sparse retries lose to the line's writers, and then wait seconds where
    the line takes milliseconds.

    A waiter notes in the lock file since when it waits and when it last
    tried; a writer that comes for the turn while one has waited
    :attr:`STARVED` seconds or more (the holder that just gave it back,
    sweeping expired results in batches, acking message after message)
    first steps aside until that waiter has it, for :attr:`STEP_ASIDE`
    seconds at most. An ``flock`` is not fair: without this, a writer
    taking the turn again at once kept it from the others, whose tries come
    up to a millisecond apart, for as long as its batches lasted (a submit
    then failed with :class:`DatabaseLocked`).

    Bad luck: the kernel drops a dead process's lock; a write waits for its
    turn at most as long as for sqlite's lock (``lock_timeout``); a forked
    child closes the parent's descriptors (one it inherited locked must not
    outlive the parent). One descriptor per thread and process, closed with
    the thread's state.
    """

    #: Longest time one holder keeps the turn before the others write without it.
    WAIT = 0.25
    #: The first pause between two tries (doubling to 1 ms).
    FIRST_PAUSE = 0.00002
    #: A waiter that tried this recently is waiting still (it tries at least every ms).
    FRESH = 0.0025
    #: A waiter that has waited this long is let in first.
    STARVED = 0.005
    #: Longest time a writer steps aside for a waiter before coming for the turn.
    STEP_ASIDE = 0.003
    #: The lock file's content: when its holder took the turn (``time.monotonic``),
    #: then since when the longest waiter waits and when it last tried (0.0: none does).
    _STAMP = struct.Struct("=d")
    _WAITER = struct.Struct("=dd")
    _WAITER_AT = 8

    def __init__(self) -> None:
        self._local = threading.local()
        self._opened: weakref.WeakSet[io.FileIO] = weakref.WeakSet()
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        for lock_file in list(self._opened):
            lock_file.close()
        self._opened = weakref.WeakSet()

    def _files(self) -> tuple[dict[str, io.FileIO], set[str]]:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.files, local.held = os.getpid(), {}, set()
        return local.files, local.held

    def take(self, path: str, deadline: float = BUSY_TIMEOUT) -> io.FileIO | None:
        """This thread's turn to write ``path``, waited for at most ``deadline``
        seconds; None: write without one."""
        if fcntl is None:
            return None
        files, held = self._files()
        if path in held:
            return None  # a write within a write: the outer one has the turn
        lock_file = files.get(path)
        try:
            if lock_file is None:
                lock_file = files[path] = io.FileIO(
                    path + "-lock", "r+", opener=lambda name, flags: os.open(name, os.O_RDWR | os.O_CREAT, 0o600))
                self._opened.add(lock_file)
            fd = lock_file.fileno()
            self._step_aside(fd)
            if not self._wait(fd, deadline):
                return None
        except OSError:  # a read-only folder, no locks there: sqlite's alone
            return None
        try:
            os.pwrite(fd, self._STAMP.pack(time.monotonic()), 0)
        except OSError:  # a full disk: the others, reading an old time, write around this turn
            pass
        held.add(path)
        return lock_file

    def _step_aside(self, fd: int) -> None:
        """Let a writer that has waited :attr:`STARVED` seconds for the turn
        have it first (until it took it, or for :attr:`STEP_ASIDE` seconds at most)."""
        now = time.monotonic()
        give_up, pause = now + self.STEP_ASIDE, self.FIRST_PAUSE
        while now < give_up:
            since = self._waiter(fd, now)
            if since is None or now - since < self.STARVED:
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.0002)
            now = time.monotonic()

    def _waiter(self, fd: int, now: float) -> float | None:
        """Since when the longest waiter still trying waits; None: none is."""
        noted = os.pread(fd, self._WAITER.size, self._WAITER_AT)
        if len(noted) < self._WAITER.size:
            return None
        since, tried = self._WAITER.unpack(noted)
        return since if 0 <= now - tried < self.FRESH else None

    def _wait(self, fd: int, deadline: float) -> bool:
        pause = self.FIRST_PAUSE
        started = time.monotonic()
        give_up = started + deadline
        noted = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    pass
                now = time.monotonic()
                if now >= give_up or self._held_too_long(fd, now):
                    return False
                if now - started >= self.STARVED / 2:  # a wait of one write or two is not noted
                    longest = self._waiter(fd, now)
                    self._note(fd, started if longest is None or started <= longest else longest, now)
                    noted = True
                time.sleep(pause)
                pause = min(pause * 2, 0.001)
        finally:
            if noted:  # had, or given up on: no longer waiting
                self._note(fd, 0.0, 0.0)

    def _note(self, fd: int, since: float, tried: float) -> None:
        try:
            os.pwrite(fd, self._WAITER.pack(since, tried), self._WAITER_AT)
        except OSError:  # a full disk: the holders do not step aside for this waiter
            pass

    def _held_too_long(self, fd: int, now: float) -> bool:
        """Whether the turn's holder took it :attr:`WAIT` seconds ago or more
        (or wrote no time: an older release of offload)."""
        stamp = os.pread(fd, self._STAMP.size, 0)
        if len(stamp) < self._STAMP.size:
            return True
        return not 0 <= now - self._STAMP.unpack(stamp)[0] < self.WAIT

    def give_back(self, path: str, lock_file: io.FileIO) -> None:
        self._files()[1].discard(path)
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
        except (OSError, ValueError):  # closed by a fork meanwhile
            pass


_turns = WriterTurns()


def retrying(operation: Callable[[], T], deadline: float = BUSY_TIMEOUT, *, path: str) -> T:
    """Run ``operation`` until it gets past SQLITE_BUSY, with jittered backoff.

    In this process's turn to write the file at ``path`` (:class:`WriterTurns`:
    a required argument, so that no write of offload's skips its turn).
    sqlite's own busy handler already waits up to the connection's timeout
    per statement; this loop covers the cases it does not (a lock upgrade
    refused at once in WAL mode). Once ``deadline`` seconds have passed,
    the wait for the turn included, :class:`DatabaseLocked` is raised:
    nothing is ever dropped silently.
    """
    started = time.monotonic()
    turn = _turns.take(path, deadline) if path else None
    try:
        return _retry(operation, started + deadline, deadline, path)
    finally:
        if turn is not None:
            _turns.give_back(path, turn)


def _retry(operation: Callable[[], T], give_up: float, deadline: float, path: str) -> T:
    delay = 0.001
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            if time.monotonic() >= give_up or _reads_an_older_state(exc):
                raise _locked(path, deadline, exc) from exc
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.1)


def _reads_an_older_state(exc: sqlite3.Error) -> bool:
    # WAL mode: this connection still reads a state of the file older than
    # the last commit (a cursor not read to its end), which it cannot write
    # over. Waiting cannot end it: the read is this thread's own.
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_BUSY_SNAPSHOT"


def _locked(path: str, deadline: float, exc: sqlite3.Error) -> DatabaseLocked:
    if _reads_an_older_state(exc):
        return DatabaseLocked(
            f"the sqlite file {path or '(broker)'} cannot be written by this connection: it still "
            f"holds a read of an older state of the file ({exc}, SQLITE_BUSY_SNAPSHOT); a cursor on "
            "it was left unread to its end.")
    return DatabaseLocked(
        f"the sqlite file {path or '(broker)'} stayed locked by another connection for more than "
        f"{deadline:g} s ({exc}); is a process holding a long transaction on it? "
        "The lock_timeout transport option sets this bound.")


def release_free_pages(conn: sqlite3.Connection, min_free_pages: int, path: str, step: int = 1024) -> bool:
    """Give the file's free pages back (incremental vacuum) once at least
    ``min_free_pages`` piled up, ``step`` pages per transaction (the writers
    wait for each); whether it did."""
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    if free < min_free_pages:
        return False
    while free > 0:
        # executescript steps it to the end; execute() would free one page.
        retrying(lambda: conn.executescript(f"PRAGMA incremental_vacuum({step})"), BUSY_TIMEOUT, path=path)
        left = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if left >= free:  # another process's pages freed meanwhile, or none left to move
            break
        free = left
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
        if not retrying(lambda: conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone(), busy_timeout, path=path):
            retrying(lambda: conn.execute("PRAGMA auto_vacuum=INCREMENTAL"), busy_timeout, path=path)
        retrying(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone(), busy_timeout, path=path)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        # After a checkpoint the -wal file is cut back to this size.
        conn.execute("PRAGMA journal_size_limit=4194304")
        retrying(lambda: conn.executescript(schema), busy_timeout, path=path)
        if upgrade is not None:
            retrying(lambda: upgrade(conn), busy_timeout, path=path)
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
