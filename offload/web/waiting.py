"""Waiting on a task from a web request: the one place ``offload.web`` waits.

Every long-poll, server-sent event stream and ``task.result`` call of the web
task API waits through this module, and nowhere else:

- :func:`wait_final` / :func:`wait_final_sync`: the task's snapshot once it
  ends, or its latest one when the timeout passes first;
- :func:`follow` / :func:`follow_sync`: each change of state or progress,
  ending with the final state.

Each waiter is a listener of the Offload's result hub (``off.hub``): one
subscription per waiter, the hub following each task id once however many
wait on it, and telling every listener of each state change (PENDING,
STARTED, each new PROGRESS meta, the end). An asyncio waiter is woken through
its event loop's :class:`offload.futures.LoopInbox`, in batches (one
``call_soon_threadsafe`` per batch of ended tasks, not per waiter): a waiting
coroutine holds no thread. A waiter that
gives up (a timeout, a client that left) closes its subscription; the task is
never revoked by it.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import states

from ..futures import loop_inbox
from ..hub import LOST, READY_STATES, TaskEvent
from .interface import OffloadLike
from .strict_json import dumps as compact_json

__all__ = [
    "TaskSnapshot",
    "compact_json",
    "follow",
    "follow_sync",
    "lookup",
    "snapshot_of",
    "wait_final",
    "wait_final_sync",
]


@dataclass(frozen=True)
class TaskSnapshot:
    """A task's state at one moment, as the web API shows it.

    ``error`` is ``(type name, message)`` for a failed, revoked or lost task;
    it never carries a traceback. ``exception`` is what the error was made
    from (the task's exception, or the backend's value for a failure that
    is none), None for an error of offload's own (revoked, lost): the web
    task API decides from it whether a client may read the message.
    """

    id: str
    """The task's id."""
    state: str
    """Celery's state name (``PENDING``, ``PROGRESS``, ``SUCCESS``, ...)."""
    progress: Any = None
    """The latest ``progress()`` report (``current``, ``total``, ``percent``, ``message``), or None."""
    result: Any = None
    """The task's return value, once it succeeded."""
    error: tuple[str, str] | None = None
    """``(type name, message)`` for a failed, revoked or lost task; never a traceback."""
    exception: Any = field(default=None, compare=False, repr=False)
    """What ``error`` was made from (the task's exception), None for offload's own errors."""

    @property
    def final(self) -> bool:
        """True once the task has ended (success, failure, revoked, lost)."""
        return self.state in READY_STATES

    def to_json(self) -> dict[str, Any]:
        """``{"id", "state", "progress", "result"}`` or ``{"id", "state", "error"}``."""
        if self.error is not None:
            return {"id": self.id, "state": self.state,
                    "error": {"type": self.error[0], "message": self.error[1]}}
        return {"id": self.id, "state": self.state, "progress": self.progress, "result": self.result}


def error_of(exc: BaseException) -> tuple[str, str]:
    """``(type name, message)`` of a task's exception, for a client to read."""
    return type(exc).__name__, str(exc)


def snapshot_of(event: TaskEvent) -> TaskSnapshot:
    """The snapshot a hub event shows."""
    task_id, state, result = event.task_id, event.state, event.result
    if state == states.SUCCESS:
        return TaskSnapshot(task_id, state, result=result)
    if state == LOST:
        return TaskSnapshot(task_id, state, error=(
            "TaskLost", "nothing was heard of this task for too long (an unknown or expired id?)"))
    if state in READY_STATES:
        if isinstance(result, BaseException):
            return TaskSnapshot(task_id, state, error=error_of(result), exception=result)
        if state == states.REVOKED:
            return TaskSnapshot(task_id, state, error=("TaskRevokedError", "the task was revoked"))
        return TaskSnapshot(task_id, state, error=(state.title(), str(result)), exception=result)
    return TaskSnapshot(task_id, state, progress=result if state == "PROGRESS" else None)


# Listeners -----------------------------------------------------------------


class _Latest:
    """Keeps the latest snapshot (the hub tells it at once on subscribe)."""

    latest: TaskSnapshot | None = None

    def on_event(self, event: TaskEvent) -> None:
        snap = snapshot_of(event)
        self.latest = snap
        self.tell(snap)

    def tell(self, snap: TaskSnapshot) -> None:
        pass


class _AsyncFollower(_Latest):
    """Every snapshot, to a coroutine on its own event loop.

    A plain loop future and a timer per wait, as :class:`_AsyncOnce`: an
    ``asyncio.wait_for`` on a queue would make a task for every wait.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.inbox = loop_inbox(loop)
        self.arrived: collections.deque[TaskSnapshot] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def tell(self, snap: TaskSnapshot) -> None:
        self.inbox.call(self.deliver, snap)

    def deliver(self, snap: TaskSnapshot) -> None:
        self.arrived.append(snap)
        _wake(self.waiter)

    async def next(self, timeout: float | None) -> TaskSnapshot | None:
        """The next snapshot, or None when ``timeout`` seconds pass without one."""
        if not self.arrived:
            waiter = self.waiter = self.loop.create_future()
            timer = None if timeout is None else self.loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
            if not self.arrived:
                return None
        return self.arrived.popleft()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _AsyncOnce(_Latest):
    """Wakes one coroutine once: at the final snapshot, or with None at its deadline.

    A plain loop future and a timer: no task per waiter, which
    ``asyncio.wait_for`` would create.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.inbox = loop_inbox(loop)
        self.future: asyncio.Future[TaskSnapshot | None] = loop.create_future()

    def tell(self, snap: TaskSnapshot) -> None:
        if snap.final:
            self.inbox.call(self.deliver, snap)

    def deliver(self, snap: TaskSnapshot | None) -> None:
        if not self.future.done():
            self.future.set_result(snap)


class _SyncListener(_Latest):
    """Snapshots for a thread blocked in a WSGI request."""

    def __init__(self, every: bool) -> None:
        self.every = every
        self.queue: queue.SimpleQueue[TaskSnapshot] = queue.SimpleQueue()

    def tell(self, snap: TaskSnapshot) -> None:
        if self.every or snap.final:
            self.queue.put(snap)


def _first(listener: _Latest, task_id: str) -> TaskSnapshot:
    # The hub tells a new listener the latest known state before subscribe()
    # returns; PENDING if it told nothing (it always does).
    return listener.latest or TaskSnapshot(task_id, states.PENDING)


# The public waits -----------------------------------------------------------


async def wait_final(off: OffloadLike, task_id: str, timeout: float) -> TaskSnapshot:
    """The task's final snapshot, or its latest one after ``timeout`` seconds.

    Holds no thread while it waits. Giving up (the timeout, or the coroutine
    being cancelled because its client left) never revokes the task.
    """
    loop = asyncio.get_running_loop()
    listener = _AsyncOnce(loop)
    subscription = off.hub.subscribe(task_id, listener)
    try:
        first = _first(listener, task_id)
        if first.final or timeout <= 0:
            return first
        timer = loop.call_later(timeout, listener.deliver, None)
        try:
            ended = await listener.future
        finally:
            timer.cancel()
        return ended if ended is not None else _first(listener, task_id)
    finally:
        subscription.close()


def wait_final_sync(off: OffloadLike, task_id: str, timeout: float) -> TaskSnapshot:
    """:func:`wait_final` for a thread (WSGI): blocks at most ``timeout`` seconds."""
    listener = _SyncListener(every=False)
    subscription = off.hub.subscribe(task_id, listener)
    try:
        first = _first(listener, task_id)
        if first.final or timeout <= 0:
            return first
        try:
            return listener.queue.get(timeout=timeout)
        except queue.Empty:
            return _first(listener, task_id)
    finally:
        subscription.close()


async def follow(off: OffloadLike, task_id: str, *, timeout: float | None = None,
                 heartbeat: float | None = None) -> AsyncIterator[TaskSnapshot | None]:
    """Each new snapshot of the task, the latest known first, ending with the final one.

    Stops early, without a final snapshot, after ``timeout`` seconds in all.
    With ``heartbeat``, yields None after that many seconds without a change
    (an event stream's keep-alive). Holds no thread; leaving the loop never
    revokes the task.
    """
    loop = asyncio.get_running_loop()
    listener = _AsyncFollower(loop)
    subscription = off.hub.subscribe(task_id, listener)
    deadline = None if timeout is None else loop.time() + timeout
    last = None
    try:
        # The first snapshot also arrives through the queue: a repeat is skipped.
        snap = _first(listener, task_id)
        while True:
            if snap != last:
                last = snap
                yield snap
            if snap.final:
                return
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            wait = remaining if heartbeat is None else min(heartbeat, remaining or heartbeat)
            arrived = await listener.next(wait)
            if arrived is None:
                if wait != remaining:
                    yield None
                    continue
                return
            snap = arrived
    finally:
        subscription.close()


def follow_sync(off: OffloadLike, task_id: str, *, timeout: float,
                heartbeat: float | None = None) -> Iterator[TaskSnapshot | None]:
    """:func:`follow` for a thread (WSGI): ends after ``timeout`` seconds at most."""
    listener = _SyncListener(every=True)
    subscription = off.hub.subscribe(task_id, listener)
    deadline = time.monotonic() + timeout
    last = None
    try:
        snap = _first(listener, task_id)
        while True:
            if snap != last:
                last = snap
                yield snap
            if snap.final:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            wait = remaining if heartbeat is None else min(heartbeat, remaining)
            try:
                snap = listener.queue.get(timeout=wait)
            except queue.Empty:
                if wait != remaining:
                    yield None
                    continue
                return
    finally:
        subscription.close()


def lookup(off: OffloadLike, task_id: str) -> TaskSnapshot:
    """The task's snapshot read once from the result backend (blocks on it).

    For a look-up that does not wait: nothing is left watching the id
    afterwards, so a mistyped id costs one read.
    """
    result = off.celery.AsyncResult(task_id)
    state = result.state
    info = result.info
    if state == states.SUCCESS:
        return TaskSnapshot(task_id, state, result=info)
    if state in states.EXCEPTION_STATES and state != states.RETRY:
        if isinstance(info, BaseException):
            return TaskSnapshot(task_id, state, error=error_of(info), exception=info)
        if state == states.REVOKED:
            return TaskSnapshot(task_id, state, error=("TaskRevokedError", "the task was revoked"))
        return TaskSnapshot(task_id, state, error=(state.title(), str(info)), exception=info)
    progress = info if state == "PROGRESS" else None
    return TaskSnapshot(task_id, state, progress=progress)
