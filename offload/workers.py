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
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kombu.exceptions import OperationalError

from .exceptions import ConfigurationError, OffloadError, broker_unreachable
from .monitor import INSPECT_TARGETS, inspect, status
from .specs import WorkerSpec, worker_specs
from .supervise import (BOOT_APP, Backoff, Child, StarterLock, Supervisor, WorkerExited, WorkerStarted,
                        describe_exit, start_process)

__all__ = ["BOOT_APP", "INSPECT_TARGETS", "Backoff", "LocalWorkers", "WorkerExited", "WorkerSpec",
           "WorkerStarted", "WorkersNotReady", "inspect", "status", "worker_specs"]

if TYPE_CHECKING:  # the scheduler is imported only when something is scheduled
    from .beat import BeatProcess

#: Where each exit of a local worker is reported (a warning with its log's tail).
logger = logging.getLogger("offload.workers")

#: Seconds between two tries at the starter lock by a process that does not
#: hold it (every submit would otherwise try).
_RETRY_LOCK_EVERY = 1.0


class WorkersNotReady(OffloadError, TimeoutError):
    """Local workers did not all answer a ping in time (or one exited)."""


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
        #: factory or a Pyramid ini); found from ``off`` when None.
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
        return Path(self._off.settings.data_dir or os.path.join(os.getcwd(), "instance")) / "workers"

    def log_path(self, name: str) -> Path:
        """The log file of worker ``name``."""
        return self.folder / f"{name}.log"

    def resolve_app_spec(self) -> tuple[str, list[str]]:
        """The ``OFFLOAD_APP`` a worker gets and the folders it must import from."""
        off = self._off
        folders = [os.getcwd(), *self.import_folders]
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
            "OFFLOAD_PARENT_PID": str(os.getpid()),
            # A task that submits must not start workers of its own.
            "OFFLOAD_IN_WORKER": "1",
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        })
        return env

    def _launch(self, spec: WorkerSpec) -> Child:
        args = [sys.executable, "-m", "celery", "-A", BOOT_APP, "worker", *spec.args]
        if spec.pidfile:
            os.makedirs(os.path.dirname(spec.pidfile), exist_ok=True)
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
