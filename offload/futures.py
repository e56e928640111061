"""``Future``, the asyncio adapter, and the worker step that honours cancels.

A :class:`Future` is a real :class:`concurrent.futures.Future` (``wait``,
``as_completed``, ``add_done_callback``, ``await``) and one listener of the
process's :class:`~offload.hub.ResultHub`: any number of futures may follow
one task id (``off.get(id)`` twice, and the future ``submit`` returned), and
each completes.

Waiting never cancels: ``await fut`` under ``asyncio.wait_for(fut, 0.5)``
that times out, or a coroutine cancelled because its client went away, only
stops *waiting*. ``Future.cancel()`` is the one way to revoke a task.

Coroutines are woken through their event loop's :class:`LoopInbox` (no
thread per waiter, and one ``call_soon_threadsafe`` per batch of ended tasks
rather than one per waiter). asyncio code has one way to wait for a task's
end, ``await``: ``await fut``, ``await off.get(task_id)`` for a task known
by id, under ``asyncio.wait_for(..., timeout)`` for a deadline (the latest
state is then ``fut.state`` and ``fut.progress``). To see every state as it
comes (server-sent events), :class:`TaskEvents`: ``async with
TaskEvents(hub, task_id) as events: async for event in events: ...`` yields
the latest known state first, then each change (STARTED, each new PROGRESS
meta), and stops after the final one. A consumer slower than the task's
progress reports gets the newest PROGRESS, not a backlog. (``wait_event``,
a second way to wait for the end, is deprecated.)

Leaving either (a timeout, ``break``, a cancelled coroutine) stops the
waiting and leaves the task alone.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import CancelledError, InvalidStateError
from concurrent.futures import Future as _BaseFuture
# The base class's state names: a Future sets and reads its state itself.
from concurrent.futures._base import CANCELLED as _CANCELLED
from concurrent.futures._base import CANCELLED_AND_NOTIFIED as _CANCELLED_AND_NOTIFIED
from concurrent.futures._base import FINISHED as _FINISHED
from concurrent.futures._base import PENDING as _PENDING
from concurrent.futures._base import RUNNING as _RUNNING
from typing import Any, TypeVar, cast

from celery import bootsteps, states
from celery.exceptions import TaskRevokedError

from .exceptions import TaskLost
from .hub import LOST, ResultHub, Subscription, TaskEvent, state_rank

__all__ = ["Future", "LoopInbox", "SkipRevoked", "TaskEvents", "loop_inbox", "wait_event"]

logger = logging.getLogger("offload.futures")

T = TypeVar("T")


class Future(_BaseFuture[T]):
    """The future of one task: a :class:`concurrent.futures.Future`.

    ``Future[T]`` for a type checker: ``T`` is the task's result type
    (``submit`` of a ``def f(...) -> int`` gives a ``Future[int]``).

    Besides the standard API it has ``id``, ``state`` (Celery's state name,
    which never moves backwards) and ``progress`` (the latest ``progress()``
    report), and it can be awaited: ``await fut`` (under ``asyncio.wait_for``
    for a deadline) is how asyncio code waits for a task, holding no thread
    and never cancelling the task. Done-callbacks run on the hub's callback
    threads, never on the thread that follows results, so a callback that
    blocks holds up no other future.

    Examples:
        >>> from offload import Offload
        >>> off = Offload({"CELERY_ALWAYS_EAGER": True})
        >>> @off.task
        ... def add(x, y):
        ...     return x + y
        >>> fut = add.submit(1, 2)
        >>> fut.result(timeout=10), fut.done(), fut.state
        (3, True, 'SUCCESS')
    """

    def __init__(self, task_id: str, hub: ResultHub | None = None, *, app: Any = None,
                 name: str | None = None, queue: str | None = None) -> None:
        # concurrent.futures.Future's own fields (tests/test_futures.py
        # checks they are all of them), without its Condition: that is made
        # when first used (_condition below). A map of 5,000 calls made
        # 55,000 objects for the cyclic garbage collector to go through,
        # and the collections took a third of the time map spent sending.
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        # The base class's one done-callback, for every future: _on_done.
        self._done_callbacks = _ON_DONE  # type: ignore[assignment]
        self._task_id = task_id
        # For the messages of a wait that gives up: which task, on which queue.
        self._name = name
        self._queue = getattr(queue, "name", queue)  # a route may give a kombu Queue
        self._hub = hub
        self._app = app
        self._async_result: Any = None
        self._task_state: str = states.PENDING
        self._progress: Any = None
        self._subscription: Subscription | None = None
        # Done-callbacks and asyncio wakers are kept here (lists made at the
        # first one), not in the base class's list, so that they run where
        # we choose (see _on_done); under the module's _callbacks_lock.
        self._cancel_notified = False
        self._callbacks: list[Callable[[Future[T]], Any]] | None = None
        self._wakers: list[Callable[[], None]] | None = None
        self._fired = False

    @property
    def _condition(self) -> threading.Condition:
        # The base class's lock and wait, made at its first use: most
        # futures of a large map are only ever completed once and read once.
        condition = self.__dict__.get("_made_condition")
        if condition is None:
            with _conditions_lock:
                condition = self.__dict__.get("_made_condition")
                if condition is None:
                    condition = self.__dict__["_made_condition"] = threading.Condition()
        return cast(threading.Condition, condition)

    @_condition.setter
    def _condition(self, condition: threading.Condition) -> None:
        # A settable attribute, as the base class's is (and as the types of
        # concurrent.futures.wait and as_completed expect).
        self.__dict__["_made_condition"] = condition

    def __repr__(self) -> str:
        return f"<offload.Future {self.id} {self._task_state}>"

    @property
    def id(self) -> str:
        """The task id, to look the task up again with ``off.get(id)``."""
        return self._task_id

    @property
    def state(self) -> str:
        """The task's Celery state: PENDING, STARTED, PROGRESS, SUCCESS, ..."""
        return self._task_state

    @property
    def progress(self) -> Any:
        """The meta of the latest ``progress()`` report, or None."""
        return self._progress

    @property
    def async_result(self) -> Any:
        """The Celery :class:`~celery.result.AsyncResult` behind this future."""
        if self._async_result is None and self._app is not None:
            self._async_result = self._app.AsyncResult(self._task_id)
        return self._async_result

    def result(self, timeout: float | None = None) -> T:
        """The task's return value, waiting at most ``timeout`` seconds.

        Raises:
            TimeoutError: not done in time (the task goes on); the message
                names the task, its id, its queue and what to check.
            CancelledError: the task was revoked before it ran.
            Exception: what the task raised.
        """
        if self._state == _FINISHED and self._exception is None:
            return cast(T, self._result)  # ended: no lock to take (nothing changes after)
        try:
            return super().result(timeout)
        except (TimeoutError, CancelledError) as exc:
            raise self._explained(exc, timeout) from None

    # The base class reads and sets its state under its Condition, made at
    # its first use. A state is one attribute (read whole under the GIL),
    # so reading it needs none; setting the end needs none while nobody
    # waits (no Condition made yet: a waiter makes it under
    # _conditions_lock, which the fast path holds while it sets the end).
    # The hub ends thousands of futures of a map: none makes a Condition.

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def running(self) -> bool:
        return self._state == _RUNNING

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def set_result(self, result: T) -> None:
        if not self._end_unwatched(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._end_unwatched(None, exception):
            super().set_exception(exception)

    def _end_unwatched(self, result: Any, exception: BaseException | None) -> bool:
        with _conditions_lock:
            if "_made_condition" in self.__dict__:
                return False  # someone may wait: the base class's way
            if self._state in _DONE_STATES:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result, self._exception = result, exception
            self._state = _FINISHED
        self._invoke_callbacks()  # type: ignore[attr-defined]  # the base class's, as it calls it
        return True

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """What the task raised (None if it returned), waiting at most ``timeout`` seconds.

        Raises ``TimeoutError`` and ``CancelledError`` as :meth:`result` does.
        """
        try:
            return super().exception(timeout)
        except (TimeoutError, CancelledError) as exc:
            raise self._explained(exc, timeout) from None

    def _explained(self, exc: BaseException, timeout: float | None) -> BaseException:
        """``exc`` with a message that says what to check, unless the task raised it."""
        if self.done() and not self.cancelled() and super().exception(0) is exc:
            return exc  # the task's own error
        task = f"task {self._name} (id {self._task_id})" if self._name else f"task {self._task_id}"
        queue = self.queue
        on_queue = f" on queue {queue!r}" if queue else ""
        if isinstance(exc, CancelledError):
            return CancelledError(f"{task}{on_queue} was cancelled (revoked) before it ran")
        waited = f"within {timeout:g}s" if timeout is not None else "in time"
        if self._task_state == states.PENDING:
            hint = (f"It is still PENDING{on_queue}: is a worker running and consuming that queue? "
                    "`offload status` pings the workers, `offload inspect active_queues` lists the "
                    "queues each consumes (CELERY_WORKERS sets them).")
        else:
            hint = f"It is {self._task_state} on a worker: wait longer."
        return TimeoutError(f"{task} did not finish {waited}. {hint} The task was not cancelled: "
                            "future.cancel() revokes it.")

    def describe(self, name: str | None, queue: Any = None) -> None:
        """Name the task and its queue, for the messages of a wait that gives up."""
        self._name = name or self._name
        self._queue = getattr(queue, "name", queue) or self._queue

    @property
    def queue(self) -> str | None:
        """The queue the task was sent to, as far as this process can tell (None if unknown)."""
        if self._queue or self._app is None or not self._name:
            return self._queue
        try:
            queue = self._app.amqp.router.route({}, self._name, (), {}).get("queue")
        except Exception:  # noqa: BLE001 (a router of the app's own that cannot answer this)
            return None
        return getattr(queue, "name", queue)

    def follow(self, hub: ResultHub, *, grace: float = 0.0) -> Future[T]:
        """Have ``hub`` complete this future (``Offload`` calls this)."""
        self._hub = hub
        self._subscription = hub.subscribe_many([(self._task_id, self)], grace=grace,
                                                pending_known=self._task_state == states.PENDING)[0]
        return self

    @staticmethod
    def follow_all(futures: list[Future[Any]], hub: ResultHub, *, grace: float = 0.0) -> None:
        """:meth:`follow` for many futures in one call of the hub (``map``)."""
        # A future starts PENDING: the hub need not say so to each new one.
        pending = all(future._task_state == states.PENDING for future in futures)
        subscriptions = hub.subscribe_many([(future._task_id, future) for future in futures], grace=grace,
                                           pending_known=pending)
        for future, subscription in zip(futures, subscriptions):
            future._hub = hub
            future._subscription = subscription

    def unfollow(self) -> None:
        """Stop following the task (the task goes on; this future stays pending)."""
        if self._subscription is not None:
            self._subscription.close()

    def cancel(self) -> bool:
        """Revoke the task if it has not started; False if it has.

        True means the revoke is recorded in the result backend, so a worker
        that starts later skips the task too. rpc:// records nothing, so
        there ``cancel()`` returns False and sends nothing. A
        running task is never killed: ``cancel()`` returns False and the
        task runs to its end, as ``concurrent.futures`` does for a running call.
        """
        if self.cancelled():
            return True
        if self.running() or self.done():
            return False
        if self._hub is not None:
            # The hub's view may lag behind the backend by a poll.
            self._hub.refresh(self._task_id)
            if self.running() or self.done():
                return False
            if not self._hub.revoke(self._task_id):
                return False
        if not self._cancel_and_notify():
            return False
        self._task_state = states.REVOKED
        if self._subscription is not None:
            self._subscription.close()
        return True

    def add_done_callback(self, fn: Callable[..., Any]) -> None:
        """Call ``fn(future)`` when the task ends (``fn()`` is accepted too).

        On a future already done, ``fn`` runs at once in this thread, as in
        ``concurrent.futures``; otherwise on one of the hub's callback threads.
        """
        fn = _adapt_callback(fn)
        with _callbacks_lock:
            if not self._fired:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        _call(fn, self)

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        if not self.done():
            loop = asyncio.get_running_loop()
            woken: asyncio.Future[None] = loop.create_future()
            inbox = loop_inbox(loop)

            def wake() -> None:
                inbox.call(_resolve, woken)  # a closed loop: nobody waits any more

            self._add_waker(wake)
            try:
                # Cancelling this coroutine (a timeout, a client gone) ends
                # the wait here and leaves the task alone.
                await woken
            finally:
                self._remove_waker(wake)
        if self.cancelled():
            raise asyncio.CancelledError(f"task {self._task_id} was cancelled")
        return self.result()

    def _add_waker(self, wake: Callable[[], None]) -> None:
        with _callbacks_lock:
            if not self._fired:
                if self._wakers is None:
                    self._wakers = []
                self._wakers.append(wake)
                return
        wake()

    def _remove_waker(self, wake: Callable[[], None]) -> None:
        with _callbacks_lock:
            try:
                if self._wakers is not None:
                    self._wakers.remove(wake)
            except ValueError:
                pass

    def _on_done(self) -> None:
        # The base class calls this in the completing thread (the hub's):
        # wake coroutines there (non-blocking), run callbacks elsewhere.
        with _callbacks_lock:
            self._fired = True
            callbacks, self._callbacks = self._callbacks, None
            wakers, self._wakers = self._wakers, None
        for wake in wakers or ():
            wake()
        if not callbacks:
            return

        def run_all() -> None:
            for fn in callbacks:
                _call(fn, self)

        if self._hub is None:
            run_all()  # eager mode: completed in the submitting thread
        else:
            self._hub.run_callback(run_all)

    # The hub's side: offload.hub.Listener ------------------------------------

    def on_event(self, event: TaskEvent) -> None:
        """Take one state of the task (the hub calls this)."""
        if state_rank(event.state) < state_rank(self._task_state):
            return  # a late STARTED after SUCCESS: state never moves back
        if self.done():
            return
        self._task_state = event.state
        if event.state == "PROGRESS":
            self._progress = event.result
        if not event.ready:
            if state_rank(event.state) == 2 and not self.running():
                try:
                    self.set_running_or_notify_cancel()
                except RuntimeError:  # finished meanwhile
                    pass
            return
        if event.state == states.SUCCESS:
            self._finish(result=event.result)
        elif event.state == states.REVOKED and not self.running() and self._cancel_and_notify():
            pass
        elif event.state == LOST:
            self._finish(exception=TaskLost(
                f"nothing was heard of task {self._task_id} for too long: it was sent with "
                "ignore_result, it expired, or the id is unknown. off.get(id) follows it again."
            ))
        else:
            error = event.result
            if not isinstance(error, BaseException):
                error = TaskRevokedError(str(error)) if event.state == states.REVOKED else Exception(str(error))
            self._finish(exception=error)

    def _cancel_and_notify(self) -> bool:
        # The hub (a REVOKED state) and cancel() may race here: one of them
        # moves CANCELLED on to CANCELLED_AND_NOTIFIED, which is when
        # concurrent.futures.wait and as_completed count the future as done.
        with _cancel_lock:
            if not super().cancel():
                return False
            if not self._cancel_notified:
                self._cancel_notified = True
                self.set_running_or_notify_cancel()
            return True

    def _finish(self, result: Any = None, exception: BaseException | None = None) -> None:
        try:
            if exception is not None:
                self.set_exception(exception)
            else:
                self.set_result(result)
        except Exception:  # InvalidStateError: cancelled locally meanwhile
            pass


def _fire(future: _BaseFuture[Any]) -> None:
    # The base class's one done-callback (a plain function: no reference
    # from the future to a bound method of itself).
    cast(Future[Any], future)._on_done()


#: Every Future's list of done-callbacks for the base class: only _fire
#: (Future.add_done_callback keeps the others), so one shared tuple.
_ON_DONE = (_fire,)
_CANCELLED_STATES = frozenset({_CANCELLED, _CANCELLED_AND_NOTIFIED})
_DONE_STATES = _CANCELLED_STATES | {_FINISHED}
_conditions_lock = threading.Lock()
#: One lock for every future's callbacks and wakers (held for a few list
#: operations), one for the race of a cancel with the hub's REVOKED: two
#: locks per future were two more objects per call of a large map. The
#: cancel's is reentrant: a hub-less future runs its callbacks inline, and
#: one may cancel another future.
_callbacks_lock = threading.Lock()
_cancel_lock = threading.RLock()


def _fresh_locks() -> None:
    # A fork while another thread held one must not leave the child's copy held.
    global _callbacks_lock, _cancel_lock, _conditions_lock
    _callbacks_lock, _cancel_lock, _conditions_lock = threading.Lock(), threading.RLock(), threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks)


def _resolve(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def _call(fn: Callable[[Future[T]], Any], future: Future[T]) -> None:
    try:
        fn(future)
    except Exception:
        logger.exception("done-callback %r of %r raised", fn, future)


def _adapt_callback(fn: Callable[..., Any]) -> Callable[[Future[Any]], Any]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    takes_arg = any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )
    if takes_arg:
        return fn
    return lambda _future: fn()


# asyncio -----------------------------------------------------------------------


class LoopInbox:
    """Calls handed to one event loop from other threads, run there in batches.

    ``call_soon_threadsafe`` writes to the loop's wake-up socket and queues
    one handle per call: when thousands of tasks end together, one per
    waiting coroutine is thousands of wake-ups. An inbox wakes its loop once
    for whatever piles up before the loop gets to it, and runs those calls
    in order in one callback. Get a loop's inbox with :func:`loop_inbox`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the loop soon (from any thread); False if the loop is closed."""
        with self._lock:
            self._pending.append((fn, args))
            first = len(self._pending) == 1
        if not first:
            return True  # the loop is already asked to drain
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            with self._lock:
                self._pending.clear()
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for fn, args in batch:
            try:
                fn(*args)
            except Exception as exc:  # one bad call must not hold back the others
                self.loop.call_exception_handler(
                    {"message": f"LoopInbox call {fn!r} failed", "exception": exc})


_INBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopInbox] = weakref.WeakKeyDictionary()
_INBOXES_LOCK = threading.Lock()


def loop_inbox(loop: asyncio.AbstractEventLoop) -> LoopInbox:
    """The one :class:`LoopInbox` of ``loop`` (made on first use)."""
    inbox = _INBOXES.get(loop)
    if inbox is None:
        with _INBOXES_LOCK:
            inbox = _INBOXES.get(loop)
            if inbox is None:
                inbox = _INBOXES[loop] = LoopInbox(loop)
    return inbox


class TaskEvents:
    """An async iterator over one task's states, for one coroutine.

    A hub listener that hands each event to its event loop's
    :class:`LoopInbox`. Yields the latest known state first and stops
    after the final one. Between two reads of a slow consumer, successive
    PROGRESS reports collapse into the newest; no state change is dropped.
    Use it as an async context manager (or call :meth:`close`) so that the
    subscription ends with the coroutine.
    """

    #: Pending events kept for a slow reader, beyond which the oldest
    #: non-final one goes (a task that retries in a loop).
    MAX_PENDING = 64

    def __init__(self, hub: ResultHub, task_id: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox = loop_inbox(self._loop)
        self._pending: collections.deque[TaskEvent] = collections.deque()
        self._arrived = asyncio.Event()
        self._finished = False
        #: The newest event seen (PENDING until the hub says otherwise).
        self.latest: TaskEvent = TaskEvent(task_id, states.PENDING)
        self._subscription = hub.subscribe(task_id, self)

    def on_event(self, event: TaskEvent) -> None:
        """The hub's side (any thread): pass the event to the loop."""
        if not self._inbox.call(self._push, event):  # the loop is closed: nobody reads any more
            self._stop_listening()

    def _stop_listening(self) -> None:
        # Called from inside the hub's delivery: closing is re-entrant there.
        subscription = getattr(self, "_subscription", None)
        if subscription is not None:
            subscription.close()

    def _push(self, event: TaskEvent) -> None:
        self.latest = event
        pending = self._pending
        if pending and pending[-1].state == event.state == "PROGRESS":
            pending[-1] = event
        else:
            pending.append(event)
            if len(pending) > self.MAX_PENDING:
                pending.popleft()
        self._arrived.set()

    def __aiter__(self) -> AsyncIterator[TaskEvent]:
        return self

    async def __anext__(self) -> TaskEvent:
        if self._finished:
            raise StopAsyncIteration
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        event = self._pending.popleft()
        if event.ready:
            self._finished = True
            self.close()
        return event

    async def wait_ready(self, timeout: float | None) -> TaskEvent:
        """Deprecated: ``await asyncio.wait_for(off.get(task_id), timeout)`` waits for the end.

        The final event, or the latest one once ``timeout`` seconds pass.
        """
        warnings.warn(_DEPRECATED_WAIT.format(name="TaskEvents.wait_ready()"), DeprecationWarning, stacklevel=2)
        return await self._wait_ready(timeout)

    async def _wait_ready(self, timeout: float | None) -> TaskEvent:
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout
        while not self.latest.ready:
            self._arrived.clear()
            if self.latest.ready:
                break
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            try:
                # Only our own Event is cancelled on timeout, never the task.
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self.latest

    def close(self) -> None:
        """Stop listening (the task goes on)."""
        self._subscription.close()

    async def __aenter__(self) -> TaskEvents:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


_DEPRECATED_WAIT = (
    "{name} is deprecated and will be removed: await the task's future instead, "
    "`await asyncio.wait_for(off.get(task_id), timeout)` (asyncio.TimeoutError when the time "
    "is up, the task left alone; its latest state is then the future's .state and .progress)")


async def wait_event(hub: ResultHub, task_id: str, timeout: float | None) -> TaskEvent:
    """Deprecated: ``await asyncio.wait_for(off.get(task_id), timeout)`` is the one way to wait.

    The final event of ``task_id``, or its latest after ``timeout`` seconds.
    Giving up (the timeout, or this coroutine being cancelled) never revokes
    the task.
    """
    warnings.warn(_DEPRECATED_WAIT.format(name="offload.futures.wait_event()"), DeprecationWarning,
                  stacklevel=2)
    async with TaskEvents(hub, task_id) as events:
        return await events._wait_ready(timeout)


# The worker's side ----------------------------------------------------------------


class SkipRevoked(bootsteps.StartStopStep):
    """A consumer step: skip a received task whose result says REVOKED.

    ``Future.cancel()`` records REVOKED in the result backend besides telling
    the live workers. A worker that was not running then never heard of it:
    this step reads the backend for each task it receives (one read, before
    the task is queued for the pool) and, if the task was revoked, marks it
    revoked in the worker, which then skips and acknowledges it as Celery
    does for any revoked task. Result backends that store nothing (rpc://,
    none) are skipped, and so are the tasks whose STARTED store reads the
    state in the pool process instead (on Redis,
    :class:`offload.result_store.OneCallStore`; the embedded store's own).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._consumer: Any = None

    def start(self, c: Any) -> None:
        from celery import signals

        from .hub import stores_results

        if not stores_results(c.app.backend):
            return
        self._consumer = c
        signals.task_received.connect(self._on_received, sender=c, weak=False)

    def _on_received(self, sender: Any = None, request: Any = None, **kwargs: Any) -> None:
        from celery.worker import state as worker_state

        task = request.task
        if (getattr(task.backend, "checks_revoked_on_start", False) and task.track_started
                and not (getattr(request, "ignore_result", False) or task.ignore_result)):
            # The pool process's STARTED store reads the state anyway, and
            # skips the task if it was revoked (offload.result_store.OneCallStore):
            # no read here, on the consumer's one thread, for every task.
            return
        try:
            meta = request.task.backend.get_task_meta(request.id, cache=False)
        except Exception:
            logger.debug("could not read the state of %s", request.id, exc_info=True)
            return
        if meta.get("status") == states.REVOKED:
            # Celery's own revoked set: the request is skipped before it runs.
            worker_state.revoked.add(request.id)

    def stop(self, c: Any) -> None:
        from celery import signals

        if self._consumer is not None:
            signals.task_received.disconnect(self._on_received, sender=self._consumer)
            self._consumer = None

    shutdown = stop
