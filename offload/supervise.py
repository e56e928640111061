"""Supervision: start worker processes, watch them, back off, restart, stop.

One :class:`Supervisor` makes the one decision of *when a worker that exited
starts again*, for both of its callers: :class:`offload.workers.LocalWorkers`
runs a round on each ``submit`` (with ``CELERY_START_LOCAL_WORKERS``), and
``offload cluster`` runs rounds in a loop. A round never waits: it reaps what
exited, says so (:class:`WorkerExited`, with the tail of the log), and starts
what is due (:class:`WorkerStarted`). A worker that keeps exiting (its app
does not import, say) is started again at once the first time, then ever
more slowly (:class:`Backoff`), however often rounds run.

Each worker runs in a session, and so a process group, of its own
(:func:`start_process`); ending a worker ends its whole group, pool processes
and whatever its tasks started included (:class:`Child`).

:class:`StarterLock` elects, among the processes of one app on one machine,
the one that supervises (under a pre-forking server each process may try).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from .datadir import FILE_MODE, make_private_dirs

__all__ = ["BOOT_APP", "Backoff", "Child", "StarterLock", "Supervisor", "WorkerExited", "WorkerStarted",
           "describe_exit", "start_process"]

#: The app spec a process offload starts (a worker, the scheduler, Flower) imports; it reads ``OFFLOAD_APP``.
BOOT_APP = "offload._boot:app"


@dataclass(frozen=True)
class Backoff:
    """When a worker that keeps exiting may start again.

    The first exit restarts it at once (a one-off crash costs nothing); each
    further exit in a row waits twice as long as the one before, from
    ``base`` seconds up to ``cap``. A run that lasted ``stable_after``
    seconds was healthy: its exit counts as the first again.

    >>> [Backoff().delay(n) for n in range(1, 8)]
    [0.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    """

    base: float = 2.0
    cap: float = 30.0
    stable_after: float = 60.0

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.cap >= 0 and self.stable_after > 0):
            raise ValueError(f"Backoff needs base > 0, cap >= 0 and stable_after > 0, got {self!r}")

    def delay(self, exits_in_a_row: int) -> float:
        """Seconds to wait before starting a worker that exited ``exits_in_a_row`` times."""
        if exits_in_a_row <= 1:
            return 0.0
        return min(self.cap, self.base * 2.0 ** (exits_in_a_row - 2))


def start_process(args: Sequence[str], env: Mapping[str, str], log_path: Path,
                  banner: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``args`` in a session of its own, its output appended to ``log_path``.

    A session (so a process group) of its own lets offload end the process
    with everything it started (``killpg``), and keeps a Ctrl-C typed in the
    parent's terminal for the parent to handle. Output goes to a file, which
    never fills up and blocks the process as an unread pipe would; the file
    and its folder are created readable by their owner only (task arguments
    and errors end up in it, see :mod:`offload.datadir`).

    Returns the process and the offset in the log where its output begins.
    """
    make_private_dirs(log_path.parent)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    with open(fd, "ab") as log:
        offset = log.seek(0, os.SEEK_END)
        log.write(f"--- offload: {banner} at {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env), start_new_session=True, close_fds=True)
    return proc, offset


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL`` (Popen's negative codes)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Child:
    """One worker process, leader of its own process group, with its log."""

    def __init__(self, name: str, nodename: str, proc: subprocess.Popen[bytes], log_path: Path,
                 log_offset: int) -> None:
        self.name = name
        self.nodename = nodename
        self.proc = proc
        self.log_path = log_path
        self.log_offset = log_offset
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        """Its exit code once it has exited (negative: the signal that killed it), else None.

        It is not reaped here: while it is an unreaped zombie its pid, and so
        its process group id, cannot be reused, so that ending the group
        later (:meth:`kill_group`) cannot hit a stranger.
        """
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped by someone else (a SIGCHLD handler)
            return self.proc.poll()
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status

    def terminate(self) -> None:
        """Ask for a warm shutdown: SIGTERM to the worker's main process only.

        Celery then finishes (or gives back) the running tasks and ends its
        pool itself; SIGTERM to the pool processes would cut their tasks short.
        """
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill_group(self, reap_timeout: float = 5.0) -> int | None:
        """SIGKILL the whole group (pool processes, what tasks started), then reap.

        Returns the exit code, or None if the main process did not go in time.
        """
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            return self.proc.wait(timeout=reap_timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines this run wrote to its log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Spec(Protocol):
    """What the supervisor needs of a worker's description (an ``offload.specs.WorkerSpec``)."""

    @property
    def name(self) -> str: ...

    @property
    def nodename(self) -> str: ...


#: The spec type a supervisor is given, and hands back to its ``launch``.
S = TypeVar("S", bound=Spec)


@dataclass(frozen=True)
class WorkerStarted:
    """A round started a worker; ``restart`` is False for its first start."""

    name: str
    nodename: str
    pid: int
    restart: bool


@dataclass(frozen=True)
class WorkerExited:
    """A round found that a worker had exited (and reaped its whole group)."""

    name: str
    nodename: str
    pid: int
    #: Its exit code; negative: the signal that killed it.
    exit_code: int
    #: Seconds it ran (as seen by the supervisor).
    ran_for: float
    #: How many times in a row it exited without a healthy run.
    exits_in_a_row: int
    #: Seconds until it starts again.
    restart_in: float
    log_path: Path
    #: The last lines of its log from that run.
    log_tail: str

    @property
    def summary(self) -> str:
        """One line: which worker, how it ended, when it starts again."""
        again = "at once" if self.restart_in <= 0 else f"in {self.restart_in:g}s"
        repeat = f", {self.exits_in_a_row} times in a row" if self.exits_in_a_row > 1 else ""
        return (f"worker {self.nodename} {describe_exit(self.exit_code)} after {self.ran_for:.1f}s"
                f"{repeat}; it starts again {again}")

    def __str__(self) -> str:
        return f"{self.summary}. Last lines of {self.log_path}:\n{self.log_tail}"


Event = WorkerStarted | WorkerExited


class Supervisor(Generic[S]):
    """Keeps one process per spec running, backing off those that keep exiting.

    ``launch(spec)`` starts a worker and returns its :class:`Child`. Every
    method is thread-safe (web request threads submit at the same time) and
    none waits for a worker to be ready.
    """

    def __init__(self, launch: Callable[[S], Child], backoff: Backoff | None = None) -> None:
        self.backoff = backoff or Backoff()
        self._launch = launch
        self._mutex = threading.RLock()
        self._children: dict[str, Child] = {}   # running, or exited and not yet reaped
        self._last: dict[str, Child] = {}       # the latest run of each name, for its log
        self._exits: dict[str, int] = {}        # exits in a row, per name
        self._due: dict[str, float] = {}        # when a name that exited may start again

    def supervise(self, specs: Iterable[S]) -> list[Event]:
        """One round: reap each worker that exited, start each one that is due."""
        events: list[Event] = []
        with self._mutex:
            now = time.monotonic()
            for spec in specs:
                child = self._children.get(spec.name)
                if child is not None:
                    code = child.exit_code()
                    if code is None:
                        continue
                    events.append(self._reap(child, code, now))
                if self._due.get(spec.name, now) <= now:
                    events.append(self._start(spec))
        return events

    def _reap(self, child: Child, code: int, now: float) -> WorkerExited:
        # Its pool processes may have outlived it: the group goes with it.
        child.kill_group()
        del self._children[child.name]
        ran_for = now - child.started_at
        healthy = ran_for >= self.backoff.stable_after
        exits = 1 if healthy else self._exits.get(child.name, 0) + 1
        self._exits[child.name] = exits
        delay = self.backoff.delay(exits)
        self._due[child.name] = now + delay
        return WorkerExited(name=child.name, nodename=child.nodename, pid=child.pid, exit_code=code,
                            ran_for=ran_for, exits_in_a_row=exits, restart_in=delay,
                            log_path=child.log_path, log_tail=child.log_tail())

    def _start(self, spec: S) -> WorkerStarted:
        restart = spec.name in self._last
        child = self._launch(spec)
        self._children[spec.name] = self._last[spec.name] = child
        self._due.pop(spec.name, None)
        return WorkerStarted(name=spec.name, nodename=spec.nodename, pid=child.pid, restart=restart)

    def restart(self, spec: S, grace: float = 10.0) -> WorkerStarted:
        """End worker ``spec.name`` (warm, then its whole group) and start it now.

        A restart asked for by hand clears the name's back-off.
        """
        with self._mutex:
            # Held throughout (rounds wait at most ``grace``): no round may
            # start a second copy while this one ends.
            child = self._children.pop(spec.name, None)
            if child is not None:
                self._end([child], grace)
            self._exits.pop(spec.name, None)
            self._due.pop(spec.name, None)
            return self._start(spec)

    def forgive(self) -> None:
        """Clear every back-off, so that the next round starts every worker."""
        with self._mutex:
            self._exits.clear()
            self._due.clear()

    def stop(self, grace: float = 10.0) -> None:
        """Warm shutdown of every worker, then SIGKILL each group after ``grace`` seconds."""
        with self._mutex:
            children = list(self._children.values())
            self._children.clear()
            self._exits.clear()
            self._due.clear()
            self._end(children, grace)

    @staticmethod
    def _end(children: list[Child], grace: float) -> None:
        for child in children:
            child.terminate()
        deadline = time.monotonic() + grace
        pending = [c for c in children if c.exit_code() is None]
        # Polled: waiting with Popen.wait() would reap the main process, and
        # its group must still be killed after it (see Child.exit_code).
        pause = threading.Event()
        while pending and time.monotonic() < deadline:
            pause.wait(0.05)
            pending = [c for c in pending if c.exit_code() is None]
        for child in children:
            child.kill_group()

    def running(self) -> dict[str, Child]:
        """The workers that have not exited, by name."""
        with self._mutex:
            return {name: c for name, c in self._children.items() if c.exit_code() is None}

    def latest(self, name: str) -> Child | None:
        """The latest run of worker ``name`` (running or not), if it ever started."""
        return self._last.get(name)

    def pending(self) -> dict[str, float]:
        """Workers waiting out a back-off: name -> seconds until they may start."""
        now = time.monotonic()
        with self._mutex:
            return {name: max(0.0, due - now) for name, due in self._due.items()}

    def forget(self) -> None:
        """Drop every worker without touching it (they belong to another process)."""
        self._mutex = threading.RLock()  # a thread that held it did not survive the fork
        self._children = {}
        self._last = {}
        self._exits = {}
        self._due = {}


class StarterLock:
    """The ``flock`` that elects the one process running an app's workers.

    The kernel drops the lock when its holder dies, however it dies, so
    another process of the app can take over. A forked child never holds it:
    an ``flock`` belongs to the open file, which ``fork`` shares, so a child
    keeping its copy open would keep the lock after its parent died. The
    child closes its copy right after the fork (``os.register_at_fork``),
    before any of its code runs.
    """

    def __init__(self, path: Path, *, after_fork_in_child: Callable[[], None] | None = None) -> None:
        self.path = path
        self._fd: int | None = None
        self._mutex = threading.Lock()
        self._after_fork_in_child = after_fork_in_child
        if hasattr(os, "register_at_fork"):
            # A weak reference: a fork hook cannot be unregistered, and must
            # not keep a discarded Offload alive.
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: StarterLock._forked(ref))

    @staticmethod
    def _forked(ref: weakref.ref[StarterLock]) -> None:
        lock = ref()
        if lock is not None:
            lock.drop_after_fork()

    def drop_after_fork(self) -> None:
        """In a forked child: close the inherited copy (the parent keeps the lock)."""
        self._mutex = threading.Lock()
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
        self._fd = None
        if self._after_fork_in_child is not None:
            self._after_fork_in_child()

    @property
    def held(self) -> bool:
        """True when this process holds the lock."""
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        with self._mutex:
            if self._fd is not None:
                return True
            try:
                import fcntl
            except ImportError:  # not POSIX: no pre-forking servers to guard against
                self._fd = -1
                return True
            make_private_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return True

    def release(self) -> None:
        """Let another process take the lock."""
        with self._mutex:
            if self._fd is not None and self._fd >= 0:
                os.close(self._fd)
            self._fd = None

    def holder_pid(self) -> int | None:
        """The pid written by the process that holds (or last held) the lock."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None
