"""Periodic tasks: schedules on tasks, and one scheduler (Celery beat) per host.

A task gets a schedule where it is declared::

    @off.task(schedule=crontab(minute="*/5"))      # or schedule=30.0 (seconds)
    def cleanup(): ...

and Celery's own ``CELERY_BEAT_SCHEDULE`` setting works as in Celery. The
scheduler is Celery beat with :class:`Scheduler`, which adds the tasks'
schedules to ``beat_schedule`` and keeps its state file under
``OFFLOAD_DATA_DIR/beat/``. Two schedulers sending the same schedule would
run every task twice, so a scheduler first takes a guard: however many
processes start one (``offload beat``, ``offload cluster`` on several
machines, ``celery beat``), one sends and the others wait, ready to take over
when it stops or dies.

The guard holds across every host that shares the broker: on Redis (the
broker, or else the result store) a lease, one key set with ``NX`` and a
short expiry that the holder renews, as celery-redbeat does: a holder that
dies (SIGKILL, a lost machine) lets it expire, and another takes over within
:data:`LEASE_TTL` seconds. On RabbitMQ an exclusive queue, which RabbitMQ
deletes when its holder's connection closes. On the embedded broker, whose
file is on one host anyway, an ``flock`` beside the state file.
"""

from __future__ import annotations

import datetime
import logging
import numbers
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import beat as celery_beat
from celery.schedules import BaseSchedule, schedule as every

from .datadir import fallback_data_dir, make_private_dirs
from .exceptions import ConfigurationError
from .interface import OffloadLike

__all__ = ["SCHEDULER", "BeatProcess", "QueueLease", "RedisLease", "Scheduler", "scheduler_lease", "as_schedule", "has_schedule",
           "run_beat", "state_file", "task_entries"]

#: The Celery beat scheduler class offload uses (``celery beat -S``).
SCHEDULER = "offload.beat:Scheduler"
#: Celery's own default, which offload's replaces when a task has a schedule.
_CELERY_DEFAULT_SCHEDULER = "celery.beat:PersistentScheduler"
#: Seconds between two attempts to take the lock held by another scheduler.
LOCK_RETRY = 0.5
#: Seconds a Redis lease lasts unless renewed; the holder renews it three
#: times as often, so a dead holder's lease is taken over within this time.
LEASE_TTL = 6.0

logger = logging.getLogger(__name__)


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


def has_schedule(off: OffloadLike) -> bool:
    """True when a task has a schedule or ``CELERY_BEAT_SCHEDULE`` is set."""
    return bool(off.celery.conf.beat_schedule) or bool(task_entries(off.celery))


def state_file(off: OffloadLike) -> Path:
    """``OFFLOAD_DATA_DIR/beat/celerybeat-schedule``: the scheduler's state."""
    data_dir = off.settings.data_dir or fallback_data_dir()
    return Path(data_dir) / "beat" / "celerybeat-schedule"


class RedisLease:
    """One scheduler per deployment: a key in Redis that only its holder renews.

    Parameters:
        client: a redis-py client on the broker's (or result store's) Redis.
        key: the lease's name, one per app (its default queue).
        ttl: seconds the lease lasts unless renewed.
    """

    _RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
              "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
    _RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                "return redis.call('del', KEYS[1]) else return 0 end")

    def __init__(self, client: Any, key: str, ttl: float = LEASE_TTL) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"

    def take(self) -> bool:
        """True if this process now holds the lease."""
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Extend the lease; False if it was lost (expired, taken by another)."""
        return bool(self.client.eval(self._RENEW, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        self.client.eval(self._RELEASE, 1, self.key, self.token)

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value


class QueueLease:
    """One scheduler per deployment on RabbitMQ: an exclusive queue.

    RabbitMQ lets one connection at a time declare an exclusive queue and
    deletes it when that connection closes, a killed process's included, so
    a waiting scheduler takes over at its next try.
    """

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key
        self.token = f"{socket.gethostname()}:{os.getpid()}"
        self.connection: Any = None

    def take(self) -> bool:
        from kombu import Queue

        connection = self.app.connection_for_write()
        try:
            connection.ensure_connection(max_retries=1)
            Queue(self.key, exclusive=True, durable=False)(connection.default_channel).declare()
        except connection.channel_errors:  # RESOURCE_LOCKED: another connection holds it
            connection.release()
            return False
        except BaseException:
            connection.release()
            raise
        self.connection = connection
        return True

    def renew(self) -> bool:
        """True while this connection still holds the queue."""
        try:
            self.connection.default_channel.queue_declare(self.key, passive=True)
            return True
        except Exception:
            self.release()
            return False

    def release(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.release()  # the queue goes with the connection
            except Exception:
                pass

    def holder(self) -> str | None:
        return None


def scheduler_lease(app: Any) -> RedisLease | QueueLease | None:
    """The guard shared by every host of ``app``'s deployment, if its broker has one.

    A Redis broker: a lease in it. RabbitMQ: an exclusive queue. Otherwise a
    Redis result store: a lease there. None: the flock, one host only.
    """
    broker = str(app.conf.broker_url or "")
    key = f"offload:beat:{app.conf.task_default_queue}"
    if _is_redis_url(broker):
        return _redis_lease(broker, key)
    if broker.partition("://")[0] in ("amqp", "amqps", "pyamqp"):
        return QueueLease(app, key.replace(":", "."))
    backend = str(app.conf.result_backend or "")
    if _is_redis_url(backend):
        return _redis_lease(backend, key)
    return None


def _is_redis_url(url: str) -> bool:
    return url.partition("://")[0] in ("redis", "rediss", "offload-redis")


def _redis_lease(url: str, key: str) -> RedisLease:
    import redis

    client = redis.Redis.from_url(url.replace("offload-redis://", "redis://", 1),
                                  socket_timeout=3, socket_connect_timeout=2)
    return RedisLease(client, key)


class Scheduler(celery_beat.PersistentScheduler):
    """Celery's persistent scheduler, plus the tasks' ``schedule=`` and one per deployment."""

    _lock_fd: int | None = None
    _lease: RedisLease | QueueLease | None = None
    _renewed_at = 0.0
    #: Celery's (seconds beat sleeps at most between ticks); Celery ships no types.
    max_interval: float

    def setup_schedule(self) -> None:
        lease = scheduler_lease(self.app)
        if lease is not None:
            self._take_lease(lease)
            # Beat sleeps at most max_interval between ticks: often enough to renew.
            self.max_interval = min(self.max_interval, LEASE_TTL / 3)
        else:
            self._take_lock()
        super().setup_schedule()

    def merge_inplace(self, b: dict[str, Any]) -> None:
        # Celery drops entries that are not in b: give it ours too.
        super().merge_inplace({**task_entries(self.app), **b})

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self._lease is not None and time.monotonic() - self._renewed_at >= LEASE_TTL / 3:
            if not self._renew():
                # Lost (a pause longer than the lease, Redis flushed): another
                # scheduler may send now, so this one waits to take it back.
                logger.warning("beat: the scheduler lease %s was lost; waiting to take it again",
                               self._lease.key)
                self._take_lease(self._lease)
        return float(super().tick(*args, **kwargs))

    def _renew(self) -> bool:
        assert self._lease is not None
        try:
            renewed = self._lease.renew()
        except Exception:  # Redis unreachable: the lease may still hold; try next tick
            logger.warning("beat: could not renew the scheduler lease", exc_info=True)
            return True
        if renewed:
            self._renewed_at = time.monotonic()
        return renewed

    def close(self) -> None:
        super().close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock: a waiting scheduler takes over
            self._lock_fd = None
        if self._lease is not None:
            try:
                self._lease.release()  # a waiting scheduler takes over at its next try
            except Exception:
                logger.debug("beat: lease not released (it expires)", exc_info=True)
            self._lease = None

    def _wait_for(self, take: Callable[[], bool], describe: Callable[[], str]) -> None:
        """Call ``take`` every LOCK_RETRY seconds until it returns True."""
        # Waiting happens before Celery's SIGTERM handler can be of use (it
        # would build a second scheduler that waits too): stop at once instead.
        restore = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[sig] = signal.signal(sig, _exit_now)
        wait = threading.Event()
        told = False
        try:
            while not take():
                if not told:
                    logger.warning("beat: another scheduler (%s) holds the guard; this one waits and "
                                   "takes over when it stops", describe())
                    told = True
                wait.wait(LOCK_RETRY)
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)

    def _take_lease(self, lease: RedisLease | QueueLease) -> None:
        def take() -> bool:
            try:
                return lease.take()
            except Exception as exc:
                logger.warning("beat: Redis unreachable for the scheduler lease (%s); retrying", exc)
                return False

        def describe() -> str:
            try:
                return f"lease {lease.key} held by {lease.holder() or '?'}"
            except Exception:
                return f"lease {lease.key}"

        self._wait_for(take, describe)
        self._lease = lease
        self._renewed_at = time.monotonic()
        logger.info("beat: this scheduler (%s) holds the lease %s", lease.token, lease.key)

    def _take_lock(self) -> None:
        import fcntl

        filename = self.schedule_filename
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        path = f"{filename}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

        def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        try:
            self._wait_for(take, lambda: f"pid {_read_pid(path) or '?'}, {path}")
        except BaseException:
            os.close(fd)
            raise
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


def run_beat(off: OffloadLike, loglevel: str = "INFO") -> None:
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
    :class:`Scheduler` (a Redis lease, or an flock) makes a second one, started
    by another process or on another host, wait.
    """

    def __init__(self, off: OffloadLike) -> None:
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
