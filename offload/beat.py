"""Periodic tasks: schedules on tasks, and one scheduler (Celery beat) per host.

A task gets a schedule where it is declared::

    @off.task(schedule=crontab(minute="*/5"))      # or schedule=30.0 (seconds)
    def cleanup(): ...

and Celery's own ``CELERY_BEAT_SCHEDULE`` setting works as in Celery. The
scheduler is Celery beat with :class:`Scheduler`, which adds the tasks'
schedules to ``beat_schedule`` and keeps its state file under
``OFFLOAD_DATA_DIR/beat/``. Two schedulers sending the same schedule would
run every task twice, so a scheduler first takes an ``flock`` beside its
state file: however many processes start one (``offload beat``, ``offload
cluster`` in several terminals, ``celery beat``), one sends and the others
wait, ready to take over when it stops.
"""

from __future__ import annotations

import datetime
import logging
import numbers
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Protocol

from celery import beat as celery_beat
from celery.schedules import BaseSchedule, schedule as every

from .datadir import make_private_dirs
from .exceptions import ConfigurationError

__all__ = ["SCHEDULER", "BeatProcess", "Scheduler", "as_schedule", "has_schedule",
           "run_beat", "state_file", "task_entries"]

#: The Celery beat scheduler class offload uses (``celery beat -S``).
SCHEDULER = "offload.beat:Scheduler"
#: Celery's own default, which offload's replaces when a task has a schedule.
_CELERY_DEFAULT_SCHEDULER = "celery.beat:PersistentScheduler"
#: Seconds between two attempts to take the lock held by another scheduler.
LOCK_RETRY = 0.5

logger = logging.getLogger(__name__)


class _Offload(Protocol):
    """What this module uses of an :class:`offload.Offload`."""

    celery: Any
    settings: Any
    workers: Any


def as_schedule(value: Any) -> BaseSchedule:
    """A Celery schedule from ``schedule=``: seconds, a timedelta, or a Celery schedule.

    >>> as_schedule(30.0)
    <freq: 30.00 seconds>

    Raises:
        TypeError: anything else (a string, a bool, a cron line).
        ValueError: a number or timedelta that is not positive.
    """
    if isinstance(value, BaseSchedule):
        return value
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"schedule= takes seconds (30.0), a datetime.timedelta or a Celery schedule "
            f"(celery.schedules.crontab(minute='*/5')), got {value!r}")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"a schedule's interval must be a positive number of seconds, got {value!r}")
    return every(datetime.timedelta(seconds=seconds))


def use_scheduler(app: Any) -> None:
    """Make ``celery beat`` use offload's scheduler unless the user chose another."""
    if app.conf.beat_scheduler == _CELERY_DEFAULT_SCHEDULER:
        app.conf.beat_scheduler = SCHEDULER


def task_entries(app: Any) -> dict[str, dict[str, Any]]:
    """Beat entries for the app's tasks declared with ``schedule=``."""
    entries = {}
    for name, task in app.tasks.items():
        scheduled = getattr(task, "schedule", None)
        if isinstance(scheduled, BaseSchedule):
            entries[name] = {"task": name, "schedule": scheduled}
    return entries


def has_schedule(off: _Offload) -> bool:
    """True when a task has a schedule or ``CELERY_BEAT_SCHEDULE`` is set."""
    return bool(off.celery.conf.beat_schedule) or bool(task_entries(off.celery))


def state_file(off: _Offload) -> Path:
    """``OFFLOAD_DATA_DIR/beat/celerybeat-schedule``: the scheduler's state."""
    data_dir = off.settings.data_dir or os.path.join(os.getcwd(), "instance")
    return Path(data_dir) / "beat" / "celerybeat-schedule"


class Scheduler(celery_beat.PersistentScheduler):
    """Celery's persistent scheduler, plus the tasks' ``schedule=`` and one per state file."""

    _lock_fd: int | None = None

    def setup_schedule(self) -> None:
        self._take_lock()
        super().setup_schedule()

    def merge_inplace(self, b: dict[str, Any]) -> None:
        # Celery drops entries that are not in b: give it ours too.
        super().merge_inplace({**task_entries(self.app), **b})

    def close(self) -> None:
        super().close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock: a waiting scheduler takes over
            self._lock_fd = None

    def _take_lock(self) -> None:
        import fcntl

        filename = self.schedule_filename
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        path = f"{filename}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        # Waiting happens before Celery's SIGTERM handler can be of use (it
        # would build a second scheduler that waits too): stop at once instead.
        restore = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[sig] = signal.signal(sig, _exit_now)
        wait = threading.Event()
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not told:
                        holder = _read_pid(path)
                        logger.warning(
                            "beat: another scheduler (pid %s) holds %s; this one waits and takes "
                            "over when it stops", holder or "?", path)
                        told = True
                    wait.wait(LOCK_RETRY)
        except BaseException:
            os.close(fd)
            raise
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        logger.info("beat: this scheduler (pid %s) holds %s", os.getpid(), path)


def _exit_now(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _read_pid(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def run_beat(off: _Offload, loglevel: str = "INFO") -> None:
    """Run the scheduler in this process until it is stopped (``offload beat``).

    Raises:
        ConfigurationError: nothing is scheduled (no task has ``schedule=``
            and ``CELERY_BEAT_SCHEDULE`` is empty).
    """
    if not has_schedule(off):
        raise ConfigurationError(
            "nothing to schedule: give a task a schedule (@off.task(schedule=30.0) or "
            "schedule=crontab(...)) or set CELERY_BEAT_SCHEDULE")
    path = state_file(off)
    path.parent.mkdir(parents=True, exist_ok=True)
    off.celery.Beat(scheduler=SCHEDULER, schedule=str(path), loglevel=loglevel).run()


class BeatProcess:
    """The scheduler as a child process of ``offload cluster``, or of the app
    beside its local workers (:class:`offload.workers.LocalWorkers`).

    Started like the local workers (``python -m celery -A offload._boot:app
    beat``, the app found the way the CLI finds it, a watchdog on the parent
    pid, its log in ``OFFLOAD_DATA_DIR/workers/beat.log``). The flock in
    :class:`Scheduler` makes a second one, started by another process, wait.
    """

    def __init__(self, off: _Offload) -> None:
        self._off = off
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Where the scheduler's output goes."""
        return Path(self._off.workers.folder) / "beat.log"

    def start(self) -> bool:
        """Start the scheduler if anything is scheduled; True when started."""
        if not has_schedule(self._off):
            return False
        path = state_file(self._off)
        make_private_dirs(path.parent)
        from .supervise import BOOT_APP, start_process

        # The workers' own environment: the app imported as they import it,
        # and the watchdog on this process (see offload._boot).
        self.proc, _offset = start_process(
            [sys.executable, "-m", "celery", "-A", BOOT_APP, "beat", "-S", SCHEDULER,
             "-s", str(path), "--loglevel", "INFO"],
            self._off.workers.process_env(), self.log_path, "starting the periodic-task scheduler")
        return True

    @property
    def pid(self) -> int | None:
        """The scheduler process's pid, while one was started."""
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        """True while the scheduler process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (beat saves its state), then SIGKILL the group after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Still running, so its group id is still its own.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
