"""Local worker processes: the workers ``CELERY_WORKERS`` describes, run from the app.

:class:`LocalWorkers` runs them as child processes of the web app
(``off.start()``, or each ``submit`` with ``CELERY_START_LOCAL_WORKERS``).
It puts together three modules, each with one job:

* :mod:`offload.specs`: which workers (``CELERY_WORKERS`` -> :class:`WorkerSpec`);
* :mod:`offload.supervise`: starting, watching, backing off, restarting and
  stopping them, shared with ``offload cluster``;
* :mod:`offload.monitor`: :func:`status` and :func:`inspect` over Celery's
  control API (re-exported here).

Its promises:

* **Started right**: ``sys.executable -m celery -A offload._boot:app worker``
  with an argument list; the worker finds the app exactly as the ``offload``
  CLI does (``OFFLOAD_APP``); output goes to a log file per worker under
  ``OFFLOAD_DATA_DIR/workers``.
* **Restarted, backing off**: a worker that exits is started again (by a
  thread of the process that called ``off.start()``, and by the next
  ``submit`` with ``CELERY_START_LOCAL_WORKERS``), at once the first time,
  then ever more slowly (2 s, 4 s, ... up to 30 s) while it keeps exiting;
  each exit is logged as a warning on the ``offload.workers`` logger with
  the tail of the worker's log. Nothing waits for it.
* **Never orphaned**: each worker leads a process group of its own and
  watches its parent pid (:mod:`offload._boot`). When the starter exits
  normally its ``atexit`` hook stops them; when it crashes or is SIGKILLed
  the watchdog sees the new parent pid and takes the whole group (pool
  processes included) down within seconds. Stopping, restarting or
  replacing a worker ends its whole group too. We chose the watchdog over
  ``PR_SET_PDEATHSIG``: that fires when the *thread* that forked the worker
  exits (a request thread in a threaded server), is Linux-only, and does not
  reach the pool processes.
* **With the scheduler when something is scheduled**: the process that runs
  the workers also runs the periodic-task scheduler (:class:`offload.beat.BeatProcess`)
  when a task has a schedule or ``CELERY_BEAT_SCHEDULE`` is set, and stops
  it with them; the scheduler's own ``flock`` keeps it to one per host
  (another ``offload beat`` or ``offload cluster`` waits).
* **Started once per machine and app**: under a pre-forking server several
  processes share the app; an ``flock`` on ``OFFLOAD_DATA_DIR/workers/starter.lock``
  elects the one that starts (and owns) the workers. The lock dies with its
  holder, so another process that called ``off.start()`` (or the next
  ``ensure_started`` elsewhere) takes over; a forked child neither holds it
  nor thinks it owns its parent's workers.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kombu.exceptions import OperationalError

from .config import is_setting
from .datadir import FILE_MODE, fallback_data_dir, make_private_dirs
from .exceptions import CONNECTION_ERRORS, ConfigurationError, OffloadError, broker_unreachable
from .monitor import INSPECT_TARGETS, inspect, status
from .specs import WorkerSpec, worker_specs
from .supervise import (BOOT_APP, Backoff, Child, StarterLock, Supervisor, WorkerExited, WorkerStarted,
                        describe_exit, start_process)

__all__ = ["BOOT_APP", "INSPECT_TARGETS", "SETTINGS_FILE_ENV", "Backoff", "LocalWorkers", "WorkerExited",
           "WorkerSpec", "WorkerStarted", "WorkersNotReady", "check_broker", "importable_spec", "inspect",
           "module_attr_holding", "status", "starter_settings", "worker_specs"]

if TYPE_CHECKING:  # the scheduler is imported only when something is scheduled
    from .beat import BeatProcess

#: The variable naming the file of the starter's settings, which a local
#: worker applies over what its own import of the app built (:mod:`offload._boot`).
SETTINGS_FILE_ENV = "OFFLOAD_SETTINGS_FILE"

#: Where each exit of a local worker is reported (a warning with its log's tail).
logger = logging.getLogger("offload.workers")

#: Seconds between two tries at the starter lock by a process that does not
#: hold it (every submit would otherwise try).
_RETRY_LOCK_EVERY = 1.0


class WorkersNotReady(OffloadError, TimeoutError):
    """Local workers did not all answer a ping in time (or one exited)."""


def check_broker(app: Any, doing: str) -> None:
    """Raise :class:`~offload.BrokerUnavailable` at once when the broker does not answer.

    A worker started against a dead broker retries for minutes
    (``broker_connection_retry_on_startup``) and says so only in its log;
    ``offload worker``, ``offload cluster`` and ``off.start()`` ask first,
    with the message ``offload status`` gives.
    """
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    except CONNECTION_ERRORS as exc:
        raise broker_unreachable(app, exc, doing) from exc


def _travels(value: Any) -> bool:
    """Whether ``value`` comes back from JSON as it went (tuples as lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_travels(item) for item in value)
    if isinstance(value, Mapping):
        return all(isinstance(key, str) and _travels(item) for key, item in value.items())
    return False


def starter_settings(off: Any) -> tuple[dict[str, Any], list[str]]:
    """The settings local workers of ``off`` start with, and those that cannot go.

    A worker imports the app again (its module, a Flask factory, an ini
    file), and that import may configure it otherwise than the process
    that starts it did (a script that sets ``app.config`` before
    ``init_app``): so the worker is given the starter's own config, the
    mapping its last ``configure`` read, and applies it over its own.
    What JSON cannot carry stays as the worker's import makes it; the
    second list names those of them that offload or Celery read.
    """
    values: dict[str, Any] = {}
    left: list[str] = []
    for key, value in off.configured_from.items():
        if _travels(value):
            values[key] = value
        elif is_setting(key):
            left.append(key)
    # The folder of the embedded broker, the logs and the starter lock, as
    # the starter resolved it (a Flask app's instance folder, ...).
    values["OFFLOAD_DATA_DIR"] = off.settings.data_dir
    return values, left


def _maybe_built_otherwise(off: Any, keys: list[str]) -> list[str]:
    """Which of the settings ``keys`` (kept as the worker's import makes
    them) that import may build otherwise than ``off`` holds them.

    A value given to the ``Offload(...)`` constructor of an app no web app
    configured (a ``crontab`` in ``CELERY_BEAT_SCHEDULE``, a kombu ``Queue``)
    is the same object still: the worker's import of the module runs the
    same constructor. A value set later (``configure``, a Flask app's
    config, a factory) may not be set there at all.
    """
    rebuilt = off.constructed_from if off.app_hooks is None else {}
    return [key for key in keys if not (key in rebuilt and rebuilt[key] is off.configured_from[key])]


def module_attr_holding(module_name: str, obj: Any) -> str | None:
    """The name under which the module ``module_name`` holds ``obj``, or None."""
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


def importable_spec(module_name: str, attr: str) -> tuple[str, list[str]]:
    """``module:attr`` as a fresh process imports it, and the folders it needs on its path."""
    name, folder = _importable_name(module_name)
    return f"{name}:{attr}", [f for f in (folder, _root_of(module_name)) if f]


def _root_of(module_name: str) -> str | None:
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(module_name.count(".")):
        folder = os.path.dirname(folder)
    return folder


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

    def __init__(self, off: Any, backoff: Backoff | None = None) -> None:
        self._off = off
        #: How a worker process imports the app (``module:attr``, a Flask
        #: factory or a Pyramid ini); found from ``off`` when None (its
        #: ``app_hooks``, else the module attribute holding it).
        self.app_spec: str | None = None
        #: Folders a worker process must import from besides the current
        #: one (an integration's project root, such as Django's BASE_DIR).
        self.import_folders: list[str] = []
        # Parsed now, so that a bad setting fails here and not in a worker's log.
        self._parsed = (copy.deepcopy(off.settings.workers), worker_specs(off.settings.workers))
        self.supervisor = Supervisor(self._launch, backoff)
        self._starter = StarterLock(self.folder / "starter.lock", after_fork_in_child=self._forked)
        self._atexit_registered = False
        self._next_attempt = 0.0
        self._watch_thread: threading.Thread | None = None
        self._watch_lock = threading.Lock()
        self._watch_cancel = threading.Event()
        #: The periodic-task scheduler started beside the workers, if any
        #: (:class:`offload.beat.BeatProcess`).
        self.scheduler: BeatProcess | None = None
        self._nothing_scheduled: tuple[int, bool] | None = None
        self._warned_left: list[str] = []
        self._warned_pidfiles: set[str] = set()

    # What to start --------------------------------------------------------------

    @property
    def specs(self) -> list[WorkerSpec]:
        """The configured workers (re-read, so a later ``configure`` counts)."""
        setting = self._off.settings.workers
        # Each submit asks (with CELERY_START_LOCAL_WORKERS): parse only when
        # the setting changed, comparing a copy (it may be a mutable dict).
        if self._parsed[0] != setting:
            self._parsed = (copy.deepcopy(setting), worker_specs(setting))
        return list(self._parsed[1])

    @property
    def folder(self) -> Path:
        """``OFFLOAD_DATA_DIR/workers``: logs and the starter lock."""
        return Path(self._off.settings.data_dir or fallback_data_dir()) / "workers"

    def log_path(self, name: str) -> Path:
        """The log file of worker ``name``."""
        return self.folder / f"{name}.log"

    def unconsumed_queues(self) -> dict[str, str]:
        """The queues this app sends to that no configured worker consumes.

        Maps each queue to where the app sends to it (the default queue,
        ``CELERY_QUEUES``, a route, ``@off.task(queue=...)``). A task sent
        there waits until some worker consumes the queue; with no worker
        configured (``CELERY_WORKERS = 0``) nothing is said: they run elsewhere.
        """
        specs = self.specs
        if not specs:
            return {}
        off = self._off
        conf = off.celery.conf
        default = conf.task_default_queue
        # A worker without queues consumes the app's queues (task_queues), else the default.
        app_queues = [q.name for q in conf.task_queues] if conf.task_queues else [default]
        consumed = {queue for spec in specs for queue in (spec.queues or app_queues)}
        sent = {default: "the default queue, where a plain submit() goes"}
        for queue in off.settings.queues or ():
            sent.setdefault(queue, "CELERY_QUEUES")
        for routes in off.settings.celery.get("task_routes") or ():
            for pattern, target in (routes.items() if isinstance(routes, Mapping) else ()):
                queue = target.get("queue") if isinstance(target, Mapping) else target
                if isinstance(queue, str):
                    sent.setdefault(queue, f"CELERY_ROUTES[{pattern!r}]")
        for task, queue in off.task_queues.items():
            sent.setdefault(queue, f"@off.task(queue=...) of {task}")
        return {queue: why for queue, why in sent.items() if queue not in consumed}

    def unconsumed_message(self) -> str | None:
        """What :meth:`unconsumed_queues` finds, said as a warning; None when every queue is consumed."""
        unconsumed = self.unconsumed_queues()
        if not unconsumed:
            return None
        conf = self._off.celery.conf
        app_queues = [q.name for q in conf.task_queues] if conf.task_queues else [conf.task_default_queue]
        listed = ", ".join(f"{queue!r} ({why})" for queue, why in unconsumed.items())
        return (f"no configured worker consumes the queue(s) {listed}: a task sent there stays queued "
                "and its future times out. Add them to a worker's 'queues' in CELERY_WORKERS, or "
                f"leave one worker without 'queues' (it consumes {', '.join(app_queues)}).")

    def resolve_app_spec(self) -> tuple[str, list[str]]:
        """The ``OFFLOAD_APP`` a worker gets and the folders it must import from."""
        off = self._off
        folders = [os.getcwd(), *self.import_folders]
        if self.app_spec:
            return self.app_spec, folders
        env = os.environ.get("OFFLOAD_APP", "").strip()
        if env:
            return env, folders
        # Configured from a web app (off.init_app(app)): the worker must
        # build that app, not just import a bare, unconfigured Offload; its
        # integration knows how (offload.flask: the app's module, a factory).
        hooks = off.app_hooks
        found = hooks.worker_spec() if hooks is not None else None
        if found is not None:
            return found[0], folders + found[1]
        attr = module_attr_holding(off.import_name, off)
        if attr:
            spec, extra = importable_spec(off.import_name, attr)
            return spec, folders + extra
        # The app discovery's last variable (offload._boot: OFFLOAD_APP, else FLASK_APP).
        if os.environ.get("FLASK_APP"):
            return os.environ["FLASK_APP"].strip(), folders
        raise ConfigurationError(
            f"cannot tell how a worker process would import this Offload (created in "
            f"{off.import_name}, not stored at module level there). Set OFFLOAD_APP="
            "module:attr (an Offload, a Flask app or factory, or a Pyramid .ini), or "
            "off.workers.app_spec.")

    def process_env(self) -> dict[str, str]:
        """The environment of a process this app starts (a worker, Flower).

        It imports the app as this process would (``OFFLOAD_APP``, and the
        folders on ``PYTHONPATH``), and its watchdog follows this process
        (``OFFLOAD_PARENT_PID``, see :mod:`offload._boot`).
        """
        app_spec, folders = self.resolve_app_spec()
        env = dict(os.environ)
        paths = [p for p in dict.fromkeys(folders) if p] + [env.get("PYTHONPATH", "")]
        env.update({
            "OFFLOAD_APP": app_spec,
            SETTINGS_FILE_ENV: str(self._write_settings(app_spec)),
            "OFFLOAD_PARENT_PID": str(os.getpid()),
            # A task that submits must not start workers of its own.
            "OFFLOAD_IN_WORKER": "1",
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        })
        return env

    def _pidfile(self, spec: WorkerSpec) -> str:
        """Where worker ``spec`` writes its pid file.

        offload creates folders under ``OFFLOAD_DATA_DIR`` only, never a
        system folder (``/var/run/celery``, as root): a pid file whose folder
        is missing elsewhere goes to ``OFFLOAD_DATA_DIR/workers``, with a warning.
        """
        assert spec.pidfile is not None
        folder = os.path.dirname(spec.pidfile)
        data_dir = os.path.abspath(self._off.settings.data_dir or self.folder.parent)
        if os.path.isdir(folder):
            return spec.pidfile
        if os.path.commonpath([data_dir, os.path.abspath(folder)]) == data_dir:
            make_private_dirs(folder)
            return spec.pidfile
        instead = str(self.folder / os.path.basename(spec.pidfile))
        if spec.name not in self._warned_pidfiles:
            self._warned_pidfiles.add(spec.name)
            warnings.warn(
                f"the folder of CELERY_WORKERS[{spec.name!r}]['pidfile'] ({folder}) does not exist, and "
                f"offload creates no folder outside OFFLOAD_DATA_DIR: the pid file is {instead} instead. "
                "Create the folder (owned by the user the workers run as) to use it.",
                UserWarning, stacklevel=2)
        return instead

    def _write_settings(self, app_spec: str) -> Path:
        """Write :func:`starter_settings` where the workers read them; warn of what cannot go.

        A file readable by its owner only, not the environment: the config
        holds the broker's password and the app's secrets.
        """
        values, left = starter_settings(self._off)
        unsure = _maybe_built_otherwise(self._off, left)
        if unsure and unsure != self._warned_left:
            self._warned_left = unsure
            warnings.warn(
                f"the local workers cannot be given the setting(s) {', '.join(unsure)}: their values "
                "are not JSON (strings, numbers, lists, dicts), so the workers take them from their "
                f"own import of the app ({app_spec}). Give them as JSON values, or set them where "
                "that import builds the app.", UserWarning, stacklevel=4)
        make_private_dirs(self.folder)
        path = self.folder / "settings.json"
        partial = self.folder / f".settings.json.{os.getpid()}"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "w") as out:
            json.dump({"settings": values, "kept": left}, out)
        os.replace(partial, path)  # a worker starting now reads the old file or the new, whole
        return path

    def _launch(self, spec: WorkerSpec) -> Child:
        args = [sys.executable, "-m", "celery", "-A", BOOT_APP, "worker", *spec.args]
        if spec.pidfile:
            args[args.index("--pidfile") + 1] = self._pidfile(spec)
        log_path = self.log_path(spec.name)
        proc, offset = start_process(args, self.process_env(), log_path, f"starting {spec.nodename}")
        return Child(spec.name, spec.nodename, proc, log_path, offset)

    # Ownership --------------------------------------------------------------------

    def _forked(self) -> None:
        # A forked child (a pre-forking server's worker) inherits our state,
        # but the processes belong to its parent.
        self.supervisor.forget()
        self._next_attempt = 0.0
        self._watch_thread = None  # threads do not survive a fork
        self.scheduler = None  # the parent's
        self._watch_lock = threading.Lock()
        self._watch_cancel = threading.Event()

    @property
    def owner(self) -> bool:
        """True when this process holds the starter lock (and so runs the workers)."""
        return self._starter.held

    def owner_pid(self) -> int | None:
        """The pid recorded by the process that holds the starter lock, if any."""
        return self._starter.holder_pid()

    def acquire(self) -> bool:
        """Become the one process that runs the workers; False if another is."""
        if not self._starter.held:
            self._starter.path = self.folder / "starter.lock"  # a later configure counts
        if not self._starter.acquire():
            return False
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        return True

    # Starting and watching ----------------------------------------------------------

    def supervise(self) -> list[WorkerExited | WorkerStarted]:
        """One round of supervision: reap the workers that exited, start those due.

        Never waits for a worker. Does nothing in a process that does not
        hold the starter lock (see :meth:`acquire`).
        """
        if not self.owner:
            return []
        return self.supervisor.supervise(self.specs)

    def ensure_started(self) -> bool:
        """Start the workers that are not running (backing off), without waiting for them.

        Returns True when this process runs the workers, False when another
        process does (or this *is* a worker: a task that submits never
        starts workers of its own). Each worker found exited is logged as a
        warning on the ``offload.workers`` logger, with its log's last lines.
        """
        if os.environ.get("OFFLOAD_IN_WORKER"):
            return False
        if not self.owner:
            # Another process runs them. Every submit lands here, so ask the
            # lock again (to take over if that process has gone) at most
            # once a second.
            if time.monotonic() < self._next_attempt:
                return False
            if not self.acquire():
                self._next_attempt = time.monotonic() + _RETRY_LOCK_EVERY
                return False
        for event in self.supervise():
            if isinstance(event, WorkerExited):
                logger.warning("%s", event)
            else:
                logger.info("started worker %s (pid %d, log %s)", event.nodename, event.pid,
                            self.log_path(event.name))
        self._ensure_scheduler()
        return True

    def _ensure_scheduler(self) -> None:
        """Start the periodic-task scheduler once, when anything is scheduled.

        Started once per ownership, not again if it exits: a scheduler that
        cannot start (a bad schedule) says why in its log, not once a second.
        """
        if self.scheduler is not None:
            return
        from .beat import BeatProcess, has_schedule

        # Each submit lands here: look through the tasks again only when
        # their number or the beat_schedule setting changed.
        key = (len(self._off.celery.tasks), bool(self._off.celery.conf.beat_schedule))
        if key == self._nothing_scheduled:
            return
        if not has_schedule(self._off):
            self._nothing_scheduled = key
            return
        scheduler = BeatProcess(self._off)
        scheduler.start()
        self.scheduler = scheduler
        logger.info("started the periodic-task scheduler (pid %s, log %s)", scheduler.pid,
                    scheduler.log_path)

    def start(self, timeout: float = 60.0,
              progress: Callable[[set[str], list[WorkerSpec]], None] | None = None) -> None:
        """Start the workers (unless another process runs them) and wait for all.

        An explicit start does not wait out a back-off: it starts now. Then
        a thread of this process keeps looking after the workers until
        :meth:`stop`: it starts again a worker that exited (backing off as
        ``submit`` does), and, in a process that does not run them, takes
        over once the process that does has gone (a pre-forking server
        recycling its workers).

        Raises:
            WorkersNotReady: a worker exited, or not every worker answered a
                ping within ``timeout`` seconds; the message has its log's tail.
        """
        if os.environ.get("OFFLOAD_IN_WORKER"):
            # A worker importing a module that calls off.start(): it must not
            # wait for workers (itself among them) while it is being loaded.
            return
        check_broker(self._off.celery, "start the local workers")
        unconsumed = self.unconsumed_message()
        if unconsumed:
            warnings.warn(unconsumed, UserWarning, stacklevel=3)
        self.supervisor.forgive()
        self.ensure_started()
        try:
            self.wait_ready(timeout, progress=progress)
        finally:
            # Only now: wait_ready must see a worker that exited while
            # starting, not the run the watcher would have started instead.
            self._keep_watching()

    def _keep_watching(self) -> None:
        if os.environ.get("OFFLOAD_IN_WORKER"):
            return
        with self._watch_lock:
            if self._watch_thread is not None and self._watch_thread.is_alive():
                return
            self._watch_cancel = threading.Event()
            self._watch_thread = threading.Thread(target=self._watch, args=(self._watch_cancel,),
                                                  name="offload-workers", daemon=True)
            self._watch_thread.start()

    def _watch(self, cancel: threading.Event) -> None:
        # A round a second (sooner when a back-off ends): each is a few
        # system calls, and a worker that died is back within a second.
        failure = ""
        while not cancel.wait(max(0.05, min([_RETRY_LOCK_EVERY, *self.pending_restarts().values()]))):
            try:
                self.ensure_started()
                failure = ""
            except Exception as exc:  # a bad app spec, a full disk: say so once, try again
                if str(exc) != failure:
                    logger.exception("offload could not start the local workers")
                failure = str(exc)

    def wait_ready(self, timeout: float = 60.0,
                   progress: Callable[[set[str], list[WorkerSpec]], None] | None = None) -> None:
        """Wait until every configured worker answers a ping.

        ``progress(answered_nodenames, specs)`` is called after each round.
        """
        specs = self.specs
        deadline = time.monotonic() + timeout
        answered: set[str] = set()
        while True:
            for spec in specs:
                child = self.supervisor.latest(spec.name)
                code = child.exit_code() if child is not None and self.owner else None
                if spec.nodename not in answered and code is not None:
                    raise WorkersNotReady(
                        f"worker {spec.nodename} {describe_exit(code)} while starting. "
                        f"Last lines of {self.log_path(spec.name)}:\n{self.log_tail(spec.name)}")
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
                raise broker_unreachable(self._off.celery, exc, "ping the workers") from exc
            for reply in replies or ():
                answered.update(reply)
            if progress is not None:
                progress(set(answered), specs)
        late = next(s for s in specs if s.nodename not in answered)
        holder = self.owner_pid()
        if self.owner:
            who = ""
        elif holder == os.getpid():
            # Two Offloads of this process share one data folder (two Flask
            # apps of one package share its instance folder).
            who = (f" (another Offload of this same process runs the workers of {self.folder}: "
                   "give each app its own OFFLOAD_DATA_DIR)")
        else:
            who = f" (they are run by process {holder}, which holds {self.folder / 'starter.lock'})"
        raise WorkersNotReady(
            f"worker {late.nodename} did not answer a ping within {timeout:g}s{who}. "
            f"Last lines of {self.log_path(late.name)}:\n{self.log_tail(late.name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines worker ``name`` wrote in its latest run (its whole log if unknown)."""
        child = self.supervisor.latest(name)
        if child is not None:
            return child.log_tail(lines)
        try:
            text = self.log_path(name).read_bytes().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def running(self) -> dict[str, int]:
        """Node names and pids of the live workers this process started."""
        return {c.nodename: c.pid for c in self.supervisor.running().values()}

    def pending_restarts(self) -> dict[str, float]:
        """Workers that exited and wait out their back-off: name -> seconds left."""
        return self.supervisor.pending()

    # Stopping -----------------------------------------------------------------------

    def restart(self, name: str, timeout: float = 10.0) -> int:
        """Stop worker ``name`` (warm, then its whole group) and start it again; its new pid."""
        spec = next((s for s in self.specs if s.name == name), None)
        if spec is None or not self.owner:
            raise ValueError(f"no worker {name!r} run by this process")
        return self.supervisor.restart(spec, grace=timeout).pid

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL each worker's group after ``timeout``.

        Only the process that started the workers stops them: in a forked
        child of it this does nothing (but stop standing by to take over).
        """
        self._watch_cancel.set()
        thread = self._watch_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)  # a round under way finishes before the workers stop
        if not self.owner:
            return
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            scheduler.stop(timeout)
        self.supervisor.stop(grace=timeout)
        self._starter.release()
