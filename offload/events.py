"""Tasks of every process, from Celery's task events, in a bounded record.

Workers offload starts send task events (``worker_send_task_events``) and
senders report each task they send (``task_send_sent_event``): so a task
submitted by another web process, the CLI or ``celery`` itself is seen here
as well as this process's own. :class:`EventListener` is the one event
receiver of a process (a thread); it feeds a :class:`TaskLog`, which keeps
the most recent ``max_tasks`` tasks and, apart from them, the failed ones
until they are dismissed or older than ``failed_retention``.

Progress (``progress()``, a PROGRESS state in the result backend) is not a
task event: while a task runs, the log follows it on the Offload's result
hub, one subscription per running task, as any Future does.
"""

from __future__ import annotations

import ast
import bisect
import collections
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import states
from celery.events.state import TASK_EVENT_TO_STATE

from .changes import Changes

__all__ = ["Changes", "EventListener", "Monitor", "TaskLog", "TaskRecord", "literal_arguments"]

logger = logging.getLogger("offload.events")

#: States after which a task does nothing more (a retry makes a new run).
FINAL_STATES = frozenset({states.SUCCESS, states.FAILURE, states.REVOKED, states.REJECTED})

#: Buckets of the runtime histogram (seconds): Prometheus' defaults, then longer.
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: The most running tasks whose progress is followed at once.
MAX_FOLLOWED = 200


@dataclass
class TaskRecord:
    """What is known of one task: fields as Celery's events carry them (reprs, not values)."""

    id: str
    name: str | None = None
    state: str = states.PENDING
    args: str | None = None
    kwargs: str | None = None
    worker: str | None = None
    queue: str | None = None
    eta: str | None = None
    history: list[tuple[str, float]] = field(default_factory=list)
    runtime: float | None = None
    result: str | None = None
    exception: str | None = None
    traceback: str | None = None
    progress: Any = None
    retries: int = 0
    retry_of: str | None = None
    retried_as: str | None = None
    updated: float = 0.0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def exception_type(self) -> str | None:
        """``ValueError`` of ``ValueError('boom')`` (the event carries the repr)."""
        if not self.exception:
            return None
        head = self.exception.split("(", 1)[0].strip()
        return head.rsplit(".", 1)[-1] or None

    @property
    def started(self) -> float | None:
        return next((t for s, t in self.history if s == states.STARTED), None)

    @property
    def first_seen(self) -> float:
        return self.history[0][1] if self.history else self.updated


class _ProgressFollower:
    """A hub listener copying a running task's PROGRESS meta into its record."""

    def __init__(self, log: TaskLog, task_id: str) -> None:
        self.log, self.task_id = log, task_id
        self.subscription: Any = None

    def on_event(self, event: Any) -> None:
        if event.state == "PROGRESS":
            self.log.set_progress(self.task_id, event.result)
        elif event.state in FINAL_STATES or event.state == "LOST":
            self.log.unfollow(self.task_id)


class TaskLog:
    """The bounded record of tasks seen in events (thread-safe).

    Parameters:
        max_tasks: recent tasks kept; the least recently changed goes first.
        max_failed: failed tasks kept apart from the recent ones.
        failed_retention: seconds a failed task stays listed unless dismissed.
        hub: the Offload's result hub, to follow running tasks' progress
            (None: no progress).
        clock: ``time.time`` (tests may pass another).
    """

    def __init__(self, *, max_tasks: int = 1000, max_failed: int = 500, failed_retention: float = 7 * 86400,
                 hub: Any = None, clock: Callable[[], float] = time.time) -> None:
        if max_tasks < 1 or max_failed < 1:
            raise ValueError("max_tasks and max_failed must be at least 1")
        if not failed_retention > 0:
            raise ValueError("failed_retention must be a positive number of seconds")
        self.max_tasks, self.max_failed = int(max_tasks), int(max_failed)
        self.failed_retention = float(failed_retention)
        self.hub, self.clock = hub, clock
        self.changes = Changes()
        self._lock = threading.RLock()
        self._tasks: collections.OrderedDict[str, TaskRecord] = collections.OrderedDict()
        self._failed: collections.OrderedDict[str, TaskRecord] = collections.OrderedDict()
        self._followed: dict[str, _ProgressFollower] = {}
        #: Tasks that reached each (name, state), and runtimes: what /metrics counts.
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.runtimes: dict[str, list[float]] = {}  # per name: bucket counts, then sum, then count

    # Feeding ---------------------------------------------------------------

    def on_event(self, event: Mapping[str, Any]) -> None:
        """One Celery event (a dict); anything but a task event is ignored."""
        kind = str(event.get("type", ""))
        if not kind.startswith("task-") or not isinstance(event.get("uuid"), str):
            return
        verb = kind[5:]
        state = TASK_EVENT_TO_STATE.get(verb)
        if state is None:
            return
        when = _number(event.get("timestamp")) or self.clock()
        follow = None
        with self._lock:
            record = self._record(event["uuid"])
            for key in ("args", "kwargs", "eta", "queue"):
                value = event.get(key)
                if value not in (None, ""):
                    setattr(record, key, str(value))
            name = _shown_name(event.get("name"), record.args)
            if name and not (record.name and name.startswith("offload.")):
                record.name = name
            if event.get("hostname") and verb != "sent":
                record.worker = str(event["hostname"])
            if "runtime" in event:
                record.runtime = _number(event["runtime"])
            if verb == "succeeded":
                record.result = _text(event.get("result"))
            if verb in ("failed", "retried"):
                record.exception = _text(event.get("exception"))
                record.traceback = _text(event.get("traceback"))
            if verb == "retried":
                record.retries += 1
            # In time order: a sender's task-sent event may come after the
            # worker's first (offload.sent sends them in batches).
            bisect.insort(record.history, (state, when), key=_when)
            # Events can arrive out of order (received after started): never
            # step back from a later state of a run, nor leave a final one.
            if not record.final and (state in FINAL_STATES or state == states.RETRY
                                     or _rank(state) >= _rank(record.state)):
                record.state = state
            record.updated = self.clock()
            self._tasks.move_to_end(record.id)
            if state == states.FAILURE:
                self._failed[record.id] = record
                self._failed.move_to_end(record.id)
                while len(self._failed) > self.max_failed:
                    self._failed.popitem(last=False)
            if state in FINAL_STATES or state == states.RETRY:
                self._count(record, state)
            if state == states.STARTED and self.hub is not None and record.id not in self._followed \
                    and len(self._followed) < MAX_FOLLOWED:
                follow = self._followed[record.id] = _ProgressFollower(self, record.id)
            self._trim()
        if follow is not None:
            try:
                follow.subscription = self.hub.subscribe(record.id, follow)
            except Exception:  # the backend is down: no progress, the rest still shows
                logger.debug("could not follow %s's progress", record.id, exc_info=True)
        if state in FINAL_STATES:
            self.unfollow(record.id)
        self.changes.bump()

    def _record(self, task_id: str) -> TaskRecord:
        record = self._tasks.get(task_id) or self._failed.get(task_id)
        if record is None:
            record = TaskRecord(task_id, updated=self.clock())
        self._tasks[task_id] = record
        return record

    def _count(self, record: TaskRecord, state: str) -> None:
        name = record.name or "unknown"
        self.counts[(name, state)] += 1
        if record.runtime is not None and state in (states.SUCCESS, states.FAILURE):
            bucket = self.runtimes.setdefault(name, [0.0] * (len(RUNTIME_BUCKETS) + 3))
            for i, bound in enumerate(RUNTIME_BUCKETS):
                if record.runtime <= bound:
                    bucket[i] += 1
            bucket[-3] += 1  # +Inf
            bucket[-2] += record.runtime
            bucket[-1] += 1

    def _trim(self) -> None:
        while len(self._tasks) > self.max_tasks:
            task_id, _ = self._tasks.popitem(last=False)
            follower = self._followed.pop(task_id, None)
            if follower is not None and follower.subscription is not None:
                follower.subscription.close()

    def set_progress(self, task_id: str, meta: Any) -> None:
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.final:
                return
            record.progress = meta
            record.state = "PROGRESS" if record.state in (states.STARTED, "PROGRESS") else record.state
            record.updated = self.clock()
        self.changes.bump()

    def unfollow(self, task_id: str) -> None:
        with self._lock:
            follower = self._followed.pop(task_id, None)
        if follower is not None and follower.subscription is not None:
            follower.subscription.close()

    # Reading ---------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            return self._tasks.get(task_id) or self._failed.get(task_id)

    def recent(self, limit: int = 50) -> list[TaskRecord]:
        """The most recently changed tasks, newest first."""
        with self._lock:
            return list(_take(reversed(self._tasks.values()), limit))

    def failed(self, name: str | None = None, exception_type: str | None = None,
               limit: int = 100) -> list[TaskRecord]:
        """Failed tasks not dismissed nor past the retention, newest first, optionally filtered."""
        with self._lock:
            horizon = self.clock() - self.failed_retention
            for task_id in [t for t, r in self._failed.items() if r.updated < horizon]:
                del self._failed[task_id]
            found = (r for r in reversed(self._failed.values())
                     if (not name or r.name == name) and (not exception_type or r.exception_type == exception_type))
            return list(_take(found, limit))

    def failed_facets(self) -> tuple[list[str], list[str]]:
        """The task names and exception types among the failed tasks (for filters)."""
        listed = self.failed(limit=self.max_failed)
        return (sorted({r.name for r in listed if r.name}),
                sorted({r.exception_type for r in listed if r.exception_type}))

    def dismiss(self, task_id: str) -> bool:
        """Drop a failed task from the failed list; True when it was listed."""
        with self._lock:
            found = self._failed.pop(task_id, None) is not None
        if found:
            self.changes.bump()
        return found

    def link_retry(self, original: str, retry: str, name: str | None, args: str | None,
                   kwargs: str | None) -> None:
        """Record that ``retry`` was sent to run ``original`` again (both show the link)."""
        with self._lock:
            first = self._record(original)
            first.retried_as = retry
            again = self._record(retry)
            again.retry_of = original
            again.name = again.name or name
            again.args, again.kwargs = again.args or args, again.kwargs or kwargs
            if not again.history:
                again.history.append((states.PENDING, self.clock()))
            self._trim()
        self.changes.bump()

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)


def _take(items: Iterator[TaskRecord] | Any, limit: int) -> Iterator[TaskRecord]:
    for count, item in enumerate(items):
        if count >= limit:
            return
        yield item


#: The head of the dispatcher's arguments: ``('package.module:qualname', ...``.
_DISPATCHED = re.compile(r"""[\[(]'([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)'""")


def _shown_name(name: Any, args: str | None) -> str | None:
    """A task's name as users know it.

    The sender's event names a submitted function's task "offload.dispatch"
    (the worker's names the function): the function is the head of its
    arguments.
    """
    if not isinstance(name, str) or not name:
        return None
    if name in ("offload.dispatch", "offload.dispatch_chunk") and args:
        found = _DISPATCHED.match(args)
        if found:
            return f"{found.group(1)}.{found.group(2)}"
    return name


def _when(entry: tuple[str, float]) -> float:
    return entry[1]


def _rank(state: str) -> int:
    """Celery's precedence: a later state of a run ranks higher (PROGRESS is a running task's)."""
    state = states.STARTED if state == "PROGRESS" else state
    return len(states.PRECEDENCE) - states.PRECEDENCE.index(state) if state in states.PRECEDENCE else 0


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def literal_arguments(args: str | None, kwargs: str | None) -> tuple[list[Any], dict[str, Any]]:
    """The arguments an event showed (their reprs) as values again, for a retry.

    Messages are JSON, so the reprs are Python literals; a repr Celery cut
    short (``argsrepr_maxsize``) is not, and raises ValueError.
    """
    try:
        values = ast.literal_eval(args) if args else ()
        named = ast.literal_eval(kwargs) if kwargs else {}
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("the arguments were too long to be kept in the task's events") from None
    if not isinstance(values, (list, tuple)) or not isinstance(named, dict):
        raise ValueError("the task's events hold no arguments to send again")
    return list(values), named


class EventListener:
    """The process's one receiver of Celery events: a thread feeding a :class:`TaskLog`.

    Reconnects after the broker goes away (``connected`` says whether it is
    receiving now); started on first use, again in a forked child.
    """

    def __init__(self, celery: Any, log: TaskLog, *, retry: float = 2.0) -> None:
        self.celery, self.log, self.retry = celery, log, retry
        self.connected = False
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._receiver: Any = None
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def ensure_started(self) -> None:
        import os

        with self._lock:
            if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="offload-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        receiver = self._receiver
        if receiver is not None:
            receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                with self.celery.connection_for_read() as connection:
                    connection.ensure_connection(max_retries=1)
                    receiver = self._receiver = self.celery.events.Receiver(
                        connection, handlers={"*": self._on_event})
                    # Connected once its queue is bound and consumed, not
                    # before: an event sent in between would be missed.
                    receiver.on_consume_ready = self._consuming
                    failing = False
                    receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:  # the broker went away: try again shortly
                # Once per outage in the log, not once per attempt.
                (logger.debug if failing else logger.warning)(
                    "dashboard: event receiver cannot reach the broker (%r); retrying", exc)
                failing = True
            finally:
                self.connected = False
            self._stop.wait(self.retry)

    def _consuming(self, *args: Any, **kwargs: Any) -> None:
        self.connected = True
        self.ready.set()

    def _on_event(self, event: Mapping[str, Any]) -> None:
        try:
            self.log.on_event(event)
        except Exception:  # a malformed event: drop it, keep receiving
            logger.exception("dashboard: could not record event %r", dict(event).get("type"))


class Monitor:
    """What the dashboard of one Offload reads in one process: the record, its receiver, the poller."""

    def __init__(self, off: Any) -> None:
        from .monitor import Poller

        self.log = TaskLog(hub=off.hub)
        self.listener = EventListener(off.celery, self.log)
        self.poller = Poller(off.celery)

    def ensure_started(self) -> None:
        """Start receiving events (once per process)."""
        self.listener.ensure_started()

    def stop(self) -> None:
        self.listener.stop()
        self.poller.stop()
