"""Local worker processes, and monitoring through Celery's control API.

:class:`LocalWorkers` runs the workers ``CELERY_WORKERS`` describes as child
processes of the web app (``off.start()``, or the first ``submit`` with
``CELERY_START_LOCAL_WORKERS``). Three promises:

* **Started right**: ``sys.executable -m celery -A offload._boot:app worker``
  with an argument list; the worker finds the app exactly as the ``offload``
  CLI does (``OFFLOAD_APP``); output goes to a log file per worker under
  ``OFFLOAD_DATA_DIR/workers`` (a file never fills up and blocks like a pipe).
* **Never orphaned**: each worker is the leader of a process group of its
  own and watches its parent pid (:mod:`offload._boot`). When the starter
  exits normally its ``atexit`` hook stops them; when it crashes or is
  SIGKILLed the watchdog sees the new parent pid and takes the whole group
  (pool processes included) down within seconds. We chose the watchdog over
  ``PR_SET_PDEATHSIG``: that fires when the *thread* that forked the worker
  exits (a request thread in a threaded server), is Linux-only, and does not
  reach the pool processes.
* **Started once per machine and app**: under a pre-forking server several
  processes share the app; an ``flock`` on ``OFFLOAD_DATA_DIR/workers/starter.lock``
  elects the one that starts (and owns) the workers. The lock dies with its
  holder, so the next ``ensure_started`` elsewhere takes over.

:func:`status` and :func:`inspect` ask the workers over the broker from the
calling process (no subprocess per call) and return plain JSON-able data.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery.utils.nodenames import host_format, node_format
from kombu.exceptions import OperationalError

from .exceptions import BrokerUnavailable, ConfigurationError, OffloadError

__all__ = ["INSPECT_TARGETS", "LocalWorkers", "WorkerSpec", "WorkersNotReady",
           "inspect", "status", "worker_specs"]

#: What :func:`inspect` can ask the workers.
INSPECT_TARGETS = ("active", "scheduled", "reserved", "revoked", "registered", "stats",
                   "active_queues")

#: The app spec a worker process imports; it reads ``OFFLOAD_APP``.
BOOT_APP = "offload._boot:app"

#: Per-worker options in a ``CELERY_WORKERS`` dict, and the option they become.
_OPTION_FLAGS = {
    "concurrency": "--concurrency",
    "loglevel": "--loglevel",
    "log-level": "--loglevel",
    "log_level": "--loglevel",
    "pidfile": "--pidfile",
    "queues": "--queues",
    "pool": "--pool",
    "prefetch": "--prefetch-multiplier",
}
_POOLS = ("prefork", "eventlet", "gevent", "solo", "processes", "threads", "custom")
_LOGLEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL")


class WorkersNotReady(OffloadError, TimeoutError):
    """Local workers did not all answer a ping in time (or one exited)."""


@dataclass(frozen=True)
class WorkerSpec:
    """One configured worker: its name and the ``celery worker`` arguments."""

    #: The name as configured (``foo``), used for its log file.
    name: str
    #: The node name it answers pings with (``foo@host``).
    nodename: str
    #: Arguments after ``celery -A ... worker``.
    args: tuple[str, ...] = field(default=())
    #: The queues it consumes (empty: the app's default queues).
    queues: tuple[str, ...] = field(default=())
    #: Its pid file (``%n`` already expanded), if configured.
    pidfile: str | None = None


def _positive_int(worker: str, key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or (isinstance(value, float) and value != number):
        raise ConfigurationError(
            f"CELERY_WORKERS[{worker!r}][{key!r}] must be a whole number >= 1, got {value!r}")
    return number


def _queue_names(worker: str, value: Any) -> tuple[str, ...]:
    names = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(
            isinstance(n, str) and n.strip() for n in names):
        raise ConfigurationError(
            f"CELERY_WORKERS[{worker!r}]['queues'] takes a list of queue names, got {value!r}")
    return tuple(n.strip() for n in names)


def _one_spec(name: str, options: Mapping[str, Any], loglevel: str) -> WorkerSpec:
    if not name or any(c.isspace() for c in name) or name.count("@") > 1:
        raise ConfigurationError(
            f"worker name {name!r} in CELERY_WORKERS must be non-empty, without spaces, "
            "with at most one '@' (like 'foo' or 'foo@%h')")
    unknown = sorted(set(options) - set(_OPTION_FLAGS))
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {unknown} for worker {name!r} in CELERY_WORKERS; "
            f"valid: {sorted(_OPTION_FLAGS)}")
    # "foo" answers as foo@<this host>, as `celery worker -n foo` would.
    nodename = host_format(name if "@" in name else f"{name}@%h")
    args: list[str] = ["--hostname", nodename]
    level = next((options[k] for k in ("loglevel", "log-level", "log_level") if k in options), loglevel)
    if not isinstance(level, str) or level.upper() not in _LOGLEVELS:
        raise ConfigurationError(
            f"CELERY_WORKERS[{name!r}] log level must be one of {list(_LOGLEVELS)}, got {level!r}")
    args += ["--loglevel", level.upper()]
    if "concurrency" in options:
        args += ["--concurrency", str(_positive_int(name, "concurrency", options["concurrency"]))]
    if "prefetch" in options:
        args += ["--prefetch-multiplier", str(_positive_int(name, "prefetch", options["prefetch"]))]
    if "pool" in options:
        if options["pool"] not in _POOLS and ":" not in str(options["pool"]):
            raise ConfigurationError(
                f"CELERY_WORKERS[{name!r}]['pool'] must be one of {list(_POOLS)}, got {options['pool']!r}")
        args += ["--pool", str(options["pool"])]
    queues: tuple[str, ...] = ()
    if "queues" in options:
        queues = _queue_names(name, options["queues"])
        args += ["--queues", ",".join(queues)]
    pidfile = None
    if options.get("pidfile"):
        pidfile = os.path.abspath(node_format(str(options["pidfile"]), nodename))
        args += ["--pidfile", pidfile]
    return WorkerSpec(name=name.partition("@")[0], nodename=nodename, args=tuple(args),
                      queues=queues, pidfile=pidfile)


def worker_specs(setting: int | list[str] | Mapping[str, Mapping[str, Any]], *,
                 loglevel: str = "INFO") -> list[WorkerSpec]:
    """The workers a ``CELERY_WORKERS`` value describes.

    >>> [w.name for w in worker_specs(2)], [w.name for w in worker_specs(["foo", "bar"])]
    (['worker1', 'worker2'], ['foo', 'bar'])
    >>> "--concurrency" in worker_specs({"foo": {"concurrency": 4}})[0].args
    True
    """
    if isinstance(setting, bool):
        raise ConfigurationError(f"CELERY_WORKERS takes a count, names or a dict, got {setting!r}")
    if isinstance(setting, int):
        items: list[tuple[str, Mapping[str, Any]]] = [(f"worker{i}", {}) for i in range(1, setting + 1)]
    elif isinstance(setting, Mapping):
        items = []
        for name, options in setting.items():
            if not isinstance(options, Mapping):
                raise ConfigurationError(
                    f"CELERY_WORKERS[{name!r}] must be a dict of options, got {options!r}")
            items.append((str(name), options))
    else:
        items = [(str(name), {}) for name in setting]
    specs = [_one_spec(name, options, loglevel) for name, options in items]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigurationError(f"CELERY_WORKERS names the worker {spec.name!r} twice")
        seen.add(spec.name)
    return specs


def _module_attr_holding(module_name: str, obj: Any) -> str | None:
    module = sys.modules.get(module_name)
    for attr, value in vars(module).items() if module is not None else ():
        if value is obj and not attr.startswith("__"):
            return attr
    return None


def _importable_name(module_name: str) -> tuple[str, str | None]:
    """A name a fresh process can import ``module_name`` by, and a folder it needs on the path."""
    module = sys.modules.get(module_name)
    if module_name != "__main__" or module is None:
        return module_name, None
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        return spec.name, None
    path = getattr(module, "__file__", None)
    if not path:
        raise ConfigurationError(
            "the Offload was created in an interactive session, which a worker cannot "
            "import; create it in a module, or set OFFLOAD_APP=module:attr")
    folder, filename = os.path.split(os.path.abspath(path))
    return os.path.splitext(filename)[0], folder


def _root_of(module_name: str) -> str | None:
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(module_name.count(".")):
        folder = os.path.dirname(folder)
    return folder


class _Owned:
    """A worker process this process started, with where its log begins."""

    def __init__(self, spec: WorkerSpec, proc: subprocess.Popen[bytes], log: Path, offset: int) -> None:
        self.spec = spec
        self.proc = proc
        self.log = log
        self.offset = offset

    def exited(self) -> bool:
        """True once the process has exited, without reaping it.

        While it is an unreaped zombie its pid (and process group id) cannot
        be reused, so a later ``killpg`` cannot hit a stranger.
        """
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def kill_group(self, sig: int) -> None:
        if self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class LocalWorkers:
    """The worker processes ``CELERY_WORKERS`` describes, run from this app.

    ``off.workers`` is one; ``off.start()``/``off.stop()`` call it. Options
    are checked here, so a bad ``CELERY_WORKERS`` fails at the first
    ``off.workers``, not in a worker's log.

    >>> off = Offload({"CELERY_BROKER_URL": "redis://", "CELERY_WORKERS": ["foo", "bar"]})  # doctest: +SKIP
    >>> off.start()                                   # doctest: +SKIP
    >>> sorted(off.status()["workers"])               # doctest: +SKIP
    ['bar@myhost', 'foo@myhost']
    """

    def __init__(self, off: Any) -> None:
        self._off = off
        #: How a worker process imports the app (``module:attr``, a Flask
        #: factory or a Pyramid ini); found from ``off`` when None.
        self.app_spec: str | None = None
        worker_specs(off.settings.workers)  # fail early on a bad setting
        self._owned: dict[str, _Owned] = {}
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._pid = os.getpid()
        self._atexit_registered = False
        self._next_attempt = 0.0

    # What to start --------------------------------------------------------------

    @property
    def specs(self) -> list[WorkerSpec]:
        """The configured workers (re-read, so a later ``configure`` counts)."""
        return worker_specs(self._off.settings.workers)

    @property
    def folder(self) -> Path:
        """``OFFLOAD_DATA_DIR/workers``: logs and the starter lock."""
        return Path(self._off.settings.data_dir or os.path.join(os.getcwd(), "instance")) / "workers"

    def log_path(self, name: str) -> Path:
        """The log file of worker ``name``."""
        return self.folder / f"{name}.log"

    def resolve_app_spec(self) -> tuple[str, list[str]]:
        """The ``OFFLOAD_APP`` a worker gets and the folders it must import from."""
        off = self._off
        folders = [os.getcwd()]
        if self.app_spec:
            return self.app_spec, folders
        env = os.environ.get("OFFLOAD_APP", "").strip()
        if env:
            return env, folders
        flask_app = off.flask_app
        if flask_app is not None:
            # Configured by a Flask app: the worker must build that app, not
            # just import a bare, unconfigured Offload.
            module_name = getattr(flask_app, "import_name", "")
            attr = _module_attr_holding(module_name, flask_app)
            if attr:
                name, folder = _importable_name(module_name)
                return f"{name}:{attr}", folders + [f for f in (folder, _root_of(module_name)) if f]
            if os.environ.get("FLASK_APP"):
                return os.environ["FLASK_APP"].strip(), folders
            module = sys.modules.get(module_name)
            for factory in ("create_app", "make_app"):
                if callable(getattr(module, factory, None)):
                    name, folder = _importable_name(module_name)
                    return f"{name}:{factory}", folders + [f for f in (folder, _root_of(module_name)) if f]
        attr = _module_attr_holding(off.import_name, off)
        if attr:
            name, folder = _importable_name(off.import_name)
            return f"{name}:{attr}", folders + [f for f in (folder, _root_of(off.import_name)) if f]
        if os.environ.get("FLASK_APP"):
            return os.environ["FLASK_APP"].strip(), folders
        raise ConfigurationError(
            f"cannot tell how a worker process would import this Offload (created in "
            f"{off.import_name}, not stored at module level there). Set OFFLOAD_APP="
            "module:attr (an Offload, a Flask app or factory, or a Pyramid .ini), or "
            "off.workers.app_spec.")

    # Ownership --------------------------------------------------------------------

    def _after_fork(self) -> None:
        # A forked child (a pre-forking server's worker) inherits our state,
        # but the processes and the lock belong to its parent.
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._owned = {}
            self._mutex = threading.RLock()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # the parent's copy keeps the lock held
                self._lock_fd = None

    @property
    def owner(self) -> bool:
        """True when this process holds the starter lock (and so runs the workers)."""
        self._after_fork()
        return self._lock_fd is not None

    def owner_pid(self) -> int | None:
        """The pid recorded by the process that holds the starter lock, if any."""
        try:
            text = (self.folder / "starter.lock").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def acquire(self) -> bool:
        """Become the one process that runs the workers; False if another is."""
        self._after_fork()
        with self._mutex:
            if self._lock_fd is not None:
                return True
            try:
                import fcntl
            except ImportError:  # not POSIX: no pre-forking servers to guard against
                self._lock_fd = -1
                return True
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / "starter.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._lock_fd = fd
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True
            return True

    def _release(self) -> None:
        if self._lock_fd is not None:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            self._lock_fd = None

    # Starting ---------------------------------------------------------------------

    def ensure_started(self) -> bool:
        """Start the workers that are not running, without waiting for them.

        Returns True when this process runs the workers, False when another
        process does (or this *is* a worker: a task that submits never
        starts workers of its own).
        """
        if os.environ.get("OFFLOAD_IN_WORKER"):
            return False
        self._after_fork()
        with self._mutex:
            if self._lock_fd is None:
                # Another process runs them. Every submit lands here, so ask
                # the lock again (to take over if that process has gone) at
                # most once a second.
                if time.monotonic() < self._next_attempt:
                    return False
                if not self.acquire():
                    self._next_attempt = time.monotonic() + 1.0
                    return False
            for spec in self.specs:
                owned = self._owned.get(spec.name)
                if owned is None or owned.exited():
                    self._spawn(spec)
            return True

    def _spawn(self, spec: WorkerSpec) -> _Owned:
        app_spec, folders = self.resolve_app_spec()
        self.folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        paths = [p for p in dict.fromkeys(folders) if p] + [env.get("PYTHONPATH", "")]
        env.update({
            "OFFLOAD_APP": app_spec,
            "OFFLOAD_PARENT_PID": str(os.getpid()),
            "OFFLOAD_IN_WORKER": "1",
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        })
        args = [sys.executable, "-m", "celery", "-A", BOOT_APP, "worker", *spec.args]
        if spec.pidfile:
            os.makedirs(os.path.dirname(spec.pidfile), exist_ok=True)
        log_path = self.log_path(spec.name)
        with open(log_path, "ab") as log:
            offset = log.tell()
            log.write(f"--- offload: starting {spec.nodename} at {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n".encode())
            log.flush()
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, close_fds=True)
        owned = _Owned(spec, proc, log_path, offset)
        self._owned[spec.name] = owned
        return owned

    def start(self, timeout: float = 60.0,
              progress: Callable[[set[str], list[WorkerSpec]], None] | None = None) -> None:
        """Start the workers (unless another process runs them) and wait for all.

        Raises:
            WorkersNotReady: a worker exited, or not every worker answered a
                ping within ``timeout`` seconds; the message has its log's tail.
        """
        self.ensure_started()
        self.wait_ready(timeout, progress=progress)

    def wait_ready(self, timeout: float = 60.0,
                   progress: Callable[[set[str], list[WorkerSpec]], None] | None = None) -> None:
        """Wait until every configured worker answers a ping.

        ``progress(answered_nodenames, specs)`` is called after each round.
        """
        specs = self.specs
        deadline = time.monotonic() + timeout
        answered: set[str] = set()
        while True:
            for owned in list(self._owned.values()):
                if owned.spec.nodename not in answered and owned.exited():
                    owned.proc.poll()
                    raise WorkersNotReady(
                        f"worker {owned.spec.nodename} exited with code {owned.proc.returncode} "
                        f"while starting. Last lines of {owned.log}:\n{self.log_tail(owned.spec.name)}")
            missing = [s.nodename for s in specs if s.nodename not in answered]
            if not missing:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                replies = self._off.celery.control.ping(
                    destination=missing, timeout=min(0.5, max(remaining, 0.05)), limit=len(missing))
            except OperationalError as exc:
                raise BrokerUnavailable(
                    f"cannot ping the workers: the broker at {self._off.celery.conf.broker_url!r} "
                    f"is unreachable ({exc})") from exc
            for reply in replies or ():
                answered.update(reply)
            if progress is not None:
                progress(set(answered), specs)
        late = next(s for s in specs if s.nodename not in answered)
        who = "" if self.owner else (
            f" (they are run by process {self.owner_pid()}, which holds {self.folder / 'starter.lock'})")
        raise WorkersNotReady(
            f"worker {late.nodename} did not answer a ping within {timeout:g}s{who}. "
            f"Last lines of {self.log_path(late.name)}:\n{self.log_tail(late.name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines worker ``name`` wrote in its current run."""
        owned = self._owned.get(name)
        try:
            with open(self.log_path(name), "rb") as log:
                log.seek(owned.offset if owned is not None else 0)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    # Watching and stopping ----------------------------------------------------------

    def running(self) -> dict[str, int]:
        """Node names and pids of the live workers this process started."""
        self._after_fork()
        return {o.spec.nodename: o.proc.pid for o in self._owned.values() if not o.exited()}

    def dead(self) -> dict[str, int | None]:
        """Workers this process started that have exited: name -> exit code."""
        self._after_fork()
        found = {}
        for name, owned in self._owned.items():
            if owned.exited():
                owned.kill_group(signal.SIGKILL)  # whatever it left behind
                found[name] = owned.proc.wait()
        return found

    def restart(self, name: str) -> int:
        """Start worker ``name`` again (after it died); its new pid."""
        with self._mutex:
            spec = next((s for s in self.specs if s.name == name), None)
            if spec is None or not self.owner:
                raise ValueError(f"no worker {name!r} run by this process")
            return self._spawn(spec).proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL each group after ``timeout``.

        Only the process that started the workers stops them: in a forked
        child of it this does nothing.
        """
        self._after_fork()
        with self._mutex:
            owned = list(self._owned.values())
            for worker in owned:
                if not worker.exited():
                    try:
                        worker.proc.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + timeout
            pending = [w for w in owned if not w.exited()]
            wake = threading.Event()
            while pending and time.monotonic() < deadline:
                wake.wait(0.05)
                pending = [w for w in pending if not w.exited()]
            for worker in owned:
                # Pool processes or a task's children may outlive the main
                # process; its group id is still reserved while it is unreaped.
                worker.kill_group(signal.SIGKILL)
                try:
                    worker.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._owned = {}
            self._release()


# Monitoring -------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    """Plain JSON types only (control replies may hold tuples, sets, datetimes)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    return repr(value)


def _broker_error(app: Any, exc: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"cannot reach the workers: the broker at {app.conf.broker_url!r} is unreachable "
        f"({exc}). Is it running?")


def status(app: Any, timeout: float = 1.0) -> dict[str, Any]:
    """Ping every worker: ``{"ping": bool, "workers": {"foo@host": "OK"}}``.

    ``ping`` is True when at least one worker answered within ``timeout``.
    """
    try:
        replies = app.control.ping(timeout=timeout)
    except OperationalError as exc:
        raise _broker_error(app, exc) from exc
    workers: dict[str, str] = {}
    for reply in replies or ():
        for node, answer in reply.items():
            ok = isinstance(answer, Mapping) and answer.get("ok") == "pong"
            workers[str(node)] = "OK" if ok else str(_jsonable(answer))
    return {"ping": bool(workers), "workers": dict(sorted(workers.items()))}


def inspect(app: Any, what: str, timeout: float = 1.0) -> dict[str, Any]:
    """Ask every worker ``what`` (one of :data:`INSPECT_TARGETS`); per worker.

    >>> inspect(off.celery, "registered")          # doctest: +SKIP
    {'foo@host': ['offload.dispatch', ...]}
    """
    if what not in INSPECT_TARGETS:
        raise ValueError(f"cannot inspect {what!r}; choose one of {', '.join(INSPECT_TARGETS)}")
    try:
        replies = getattr(app.control.inspect(timeout=timeout), what)()
    except OperationalError as exc:
        raise _broker_error(app, exc) from exc
    return _jsonable(dict(sorted((replies or {}).items())))
