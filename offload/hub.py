"""The result hub: one per ``Offload`` per process, many listeners per task id.

Every part of offload that waits on a task (a :class:`~offload.Future`, a
coroutine, a web long-poll or event stream) is a :class:`Listener` of the
hub: ``hub.subscribe(task_id, listener)`` returns a :class:`Subscription`,
and the listener's ``on_event`` is called once per state change of that task
(PENDING, STARTED, each new PROGRESS meta, then the end) until the end or
until ``subscription.close()``. Any number of listeners may follow one id; a
new one is told the latest known state at once.

One thread per hub reads the result backend for every watched id, through
the delivery strategy of its kind (:mod:`offload.delivery`): on Redis one
pub/sub connection (Celery publishes each state it stores), on rpc:// one
reply queue per process, elsewhere one batched read of all outstanding ids,
every few milliseconds while states change and backing off to 250 ms while
none does (a task sitting in PROGRESS included). A strategy sees the hub
only as :class:`offload.delivery.interface.Hub`: ``wakeup``, ``watched``,
``take_new``, ``ids``, ``deliver``, ``deliver_many``, ``count_read``,
``housekeeping`` and ``answered`` are public for that reason.

Bounds: an id leaves the hub when it ends, when its last listener goes, or
when nothing at all was heard of it for :attr:`ResultHub.pending_limit`
seconds (a task sent with ``ignore_result``, one that expired unseen, an
unknown id); its listeners are then told :data:`LOST`. The last few
thousand final states are kept so that a late subscriber is answered at once.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from celery import states

from .delivery import RpcPush, Strategy, strategy_for
from .delivery.interface import Wakeup
from .result_store import stores_results

__all__ = ["LOST", "HubStats", "Listener", "ResultHub", "Subscription", "TaskEvent", "random_task_ids",
           "state_rank", "stores_results"]

logger = logging.getLogger("offload.hub")

#: The hub's own final state: nothing was heard of the task for
#: ``pending_limit`` seconds, so the hub stopped following it.
LOST = "LOST"

READY_STATES = frozenset(states.READY_STATES) | {LOST}


def state_rank(state: str) -> int:
    """Order of task states: a state never gives way to one of a lower rank.

    PENDING 0, RECEIVED 1, any running state (STARTED, PROGRESS, RETRY, a
    custom state) 2, an end 3. Within rank 2 a task moves freely (a retried
    task is STARTED again after RETRY).
    """
    if state == states.PENDING:
        return 0
    if state == states.RECEIVED:
        return 1
    if state in READY_STATES:
        return 3
    return 2


@dataclass(frozen=True)
class TaskEvent:
    """One state of one task, as listeners are told of it.

    ``result`` is the return value for SUCCESS, the exception for FAILURE and
    REVOKED, the meta dict for PROGRESS (and custom states), the worker's
    ``{"pid", "hostname"}`` for STARTED, None otherwise.
    """

    task_id: str
    state: str
    result: Any = None

    @property
    def ready(self) -> bool:
        """True for a final state (SUCCESS, FAILURE, REVOKED or LOST)."""
        return self.state in READY_STATES


class Listener(Protocol):
    """What the hub calls: one method, once per state change.

    ``on_event`` runs on the hub's thread (or, with the latest known state,
    in the thread calling :meth:`ResultHub.subscribe`), with the hub's lock
    held: it must return quickly and never block or wait on another task.
    Hand slow work to another thread (``Future`` runs done-callbacks on the
    hub's callback threads; asyncio waiters go through their loop's
    :class:`offload.futures.LoopInbox`).
    """

    def on_event(self, event: TaskEvent) -> None: ...


class BackendLike(Protocol):
    """The parts of a Celery result backend the hub uses."""

    app: Any

    def get_task_meta(self, task_id: str, cache: bool = ...) -> dict[str, Any]: ...

    def mark_as_revoked(self, task_id: str, reason: str = ...) -> None: ...


class Subscription:
    """One listener following one task id; ``close()`` stops it (idempotent)."""

    __slots__ = ("task_id", "listener", "_hub", "closed")

    def __init__(self, hub: ResultHub, task_id: str, listener: Listener) -> None:
        self.task_id = task_id
        self.listener = listener
        self._hub = hub
        #: True once closed, or once the final event was delivered.
        self.closed = False

    def close(self) -> None:
        """Stop listening; no event is delivered after this returns."""
        if self.closed:
            # Ended by its final event, already delivered (the usual way a
            # waiter leaves): no need to wait for the hub's lock, which its
            # thread holds while it delivers a burst of results to others.
            return
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.task_id} {'closed' if self.closed else 'open'}>"


@dataclass(frozen=True)
class HubStats:
    """What a hub holds and has done, for tests and monitoring."""

    #: Task ids followed now.
    watching: int
    #: Listeners across them.
    listeners: int
    #: Final states kept for late subscribers (at most ``RECENT_LIMIT``).
    recent: int
    #: Reads of the result backend by the hub's thread since it was made
    #: (one per batch, per pub/sub message batch, or per drained reply).
    reads: int


class _Entry:
    __slots__ = ("task_id", "subscriptions", "_latest", "since", "grace")

    def __init__(self, task_id: str, grace: float, since: float) -> None:
        self.task_id = task_id
        self.subscriptions: list[Subscription] = []
        #: None while nothing but PENDING is known (no object per id of a
        #: large map until its first news).
        self._latest: TaskEvent | None = None
        self.since = since
        self.grace = grace  # extra patience: a countdown or eta

    @property
    def latest(self) -> TaskEvent:
        latest = self._latest
        return TaskEvent(self.task_id, states.PENDING) if latest is None else latest

    @property
    def pending(self) -> bool:
        latest = self._latest
        return latest is None or latest.state == states.PENDING


def _event_from_meta(task_id: str, meta: dict[str, Any]) -> TaskEvent:
    state = meta.get("status") or states.PENDING
    result = meta.get("result")
    if state in states.EXCEPTION_STATES and state != states.RETRY and not isinstance(result, BaseException):
        from celery.exceptions import TaskRevokedError

        result = TaskRevokedError(str(result)) if state == states.REVOKED else Exception(str(result))
    return TaskEvent(task_id, state, result)


def _advances(old: TaskEvent, new: TaskEvent) -> bool:
    old_rank, new_rank = state_rank(old.state), state_rank(new.state)
    if new_rank != old_rank:
        return new_rank > old_rank
    if old_rank in (0, 3):
        return False  # PENDING again, or a second end: nothing new
    if new.state != old.state:
        return True
    try:
        return bool(new.result != old.result)
    except Exception:  # a result type whose comparison fails: call it new
        return True


class ResultHub:
    """Follows the tasks of one Celery app for every listener of the process.

    Parameters:
        backend_factory: returns the app's result backend (Celery's
            ``app.backend`` is per thread: the hub's thread gets its own).
    """

    #: How many final states are kept for subscribers that come late.
    RECENT_LIMIT = 4096
    #: Done-callback threads (a blocking callback holds one of them).
    CALLBACK_THREADS = 8

    _HOUSEKEEPING = 1.0

    def __init__(self, backend_factory: Callable[[], BackendLike]) -> None:
        self._backend_factory = backend_factory
        #: Seconds an id may go with no state at all heard of it before its
        #: listeners are told LOST. Default: the backend's result_expires
        #: (after which no result could be read anyway), else one day.
        self.pending_limit: float | None = None
        self._entries: dict[str, _Entry] = {}
        self._recent: collections.OrderedDict[str, TaskEvent] = collections.OrderedDict()
        self._reads = 0
        self._fresh_state()
        hub_ref = weakref.ref(self)

        def before() -> None:
            hub = hub_ref()
            if hub is not None:
                hub._before_fork()

        def after_in_parent() -> None:
            hub = hub_ref()
            if hub is not None:
                hub._after_fork_in_parent()

        def after_in_child() -> None:
            hub = hub_ref()
            if hub is not None:
                hub._after_fork_in_child()

        os.register_at_fork(before=before, after_in_parent=after_in_parent,
                            after_in_child=after_in_child)

    def _fresh_state(self) -> None:
        # Everything a forked child must not share with its parent.
        self._lock = threading.RLock()
        self.wakeup = Wakeup()
        """Set to wake the hub's thread (a new id, a reconnection); the strategy clears it."""
        #: When the backend stopped answering (monotonic), None while it answers.
        self._outage_since: float | None = None
        self._outage_retries = 0
        self._new: list[str] = []
        self._thread: threading.Thread | None = None
        self._strategy: Strategy | None = None
        self._callbacks: ThreadPoolExecutor | None = None
        self._callbacks_lock = threading.Lock()
        self._last_housekeeping = time.monotonic()
        self._fork_locked = False

    # Fork safety ------------------------------------------------------------

    def _before_fork(self) -> None:
        # Hold the lock across fork(): the child then never inherits it held
        # by the hub thread in the middle of a delivery (with a future's
        # condition held too).
        self._fork_locked = self._lock.acquire(timeout=5.0)

    def _after_fork_in_parent(self) -> None:
        if self._fork_locked:
            self._fork_locked = False
            self._lock.release()

    def _after_fork_in_child(self) -> None:
        # The thread, its connection and the callback threads stayed in the
        # parent: start afresh, keeping the ids and listeners (the child's
        # copies of the parent's futures complete in the child too).
        self._fresh_state()
        self._new = list(self._entries)
        if self._entries:
            self._ensure_thread()

    # Listening ----------------------------------------------------------------

    def subscribe(self, task_id: str, listener: Listener, *, grace: float = 0.0) -> Subscription:
        """Call ``listener.on_event`` for every state change of ``task_id``.

        The latest known state (PENDING when nothing is known yet) is
        delivered before this returns; if the task already ended, that is its
        final event and the subscription is closed at once. ``grace`` adds to
        :attr:`pending_limit` for this id (a task sent with a countdown).
        """
        return self.subscribe_many([(task_id, listener)], grace=grace)[0]

    def subscribe_many(self, pairs: list[tuple[str, Listener]], *, grace: float = 0.0,
                       pending_known: bool = False) -> list[Subscription]:
        """:meth:`subscribe` for each ``(task_id, listener)``, under one lock.

        What ``map`` uses: one lock, one check of the hub's thread and one
        wake-up for the whole batch, not one per call. ``pending_known``:
        the listeners already take the task for PENDING (new futures), so
        a PENDING latest state is not delivered to them (any other is).
        """
        subscriptions = [Subscription(self, task_id, listener) for task_id, listener in pairs]
        wake = False
        now = time.monotonic()
        with self._lock:
            for subscription in subscriptions:
                wake = self._add(subscription, grace, now, pending_known) or wake
            if wake:
                strategy = self._get_strategy()
                self._ensure_thread()
                wake = strategy.needs_wakeup([subscription.task_id for subscription in subscriptions])
        if wake:
            self.wakeup.set()
        return subscriptions

    def _add(self, subscription: Subscription, grace: float, now: float, pending_known: bool = False) -> bool:
        # With the lock held; True when the id is new to the hub.
        task_id = subscription.task_id
        final = self._recent.get(task_id)
        if final is not None:
            subscription.closed = True
            self._notify(subscription, final)
            return False
        entry = self._entries.get(task_id)
        if entry is None:
            entry = self._entries[task_id] = _Entry(task_id, grace, now)
            self._new.append(task_id)
            new = True
        else:
            entry.grace = max(entry.grace, grace)
            new = False
        entry.subscriptions.append(subscription)
        if not pending_known or not entry.pending:
            self._notify(subscription, entry.latest)
        return new

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription.closed:
                return
            subscription.closed = True
            entry = self._entries.get(subscription.task_id)
            if entry is None:
                return
            try:
                entry.subscriptions.remove(subscription)
            except ValueError:
                pass
            if not entry.subscriptions:
                # Nobody listens: stop following (and reading) this id.
                del self._entries[subscription.task_id]

    def latest(self, task_id: str) -> TaskEvent | None:
        """The latest state the hub knows of ``task_id``, or None."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is not None:
                return entry.latest
            return self._recent.get(task_id)

    def knows(self, task_id: str) -> bool:
        """True if this process follows ``task_id`` or saw it end lately."""
        with self._lock:
            return task_id in self._entries or task_id in self._recent

    @property
    def follows_foreign_tasks(self) -> bool:
        """False on rpc://, where only the sending process gets a result."""
        with self._lock:
            return not isinstance(self._get_strategy(), RpcPush)

    def stats(self) -> HubStats:
        """Counts of what the hub holds, and of its backend reads."""
        with self._lock:
            return HubStats(
                watching=len(self._entries),
                listeners=sum(len(e.subscriptions) for e in self._entries.values()),
                recent=len(self._recent),
                reads=self._reads,
            )

    # Submitting and cancelling ------------------------------------------------

    def submit_options(self) -> dict[str, Any]:
        """Options for sending one task: its id (and rpc://'s reply queue).

        Subscribe to the id *before* sending, so that no state is published
        before the hub listens for it.
        """
        with self._lock:
            return self._get_strategy().submit_options()

    def new_task_ids(self, count: int) -> list[str]:
        """``count`` fresh task ids, as :meth:`submit_options` would give one by one.

        For calls that need no reply queue: the calls of a chunk, which
        report through stored results.
        """
        with self._lock:
            strategy = self._get_strategy()
        prefix = getattr(strategy, "batch_prefix", "") or getattr(strategy, "prefix", "")
        return random_task_ids(count, prefix)

    def refresh(self, task_id: str) -> TaskEvent | None:
        """Read ``task_id``'s state from the backend now (in this thread)."""
        with self._lock:
            strategy = self._get_strategy()
        if isinstance(strategy, RpcPush):
            return self.latest(task_id)  # a reply can be read once, by the hub
        try:
            meta = self._backend_factory().get_task_meta(task_id, cache=False)
        except Exception:
            logger.debug("could not refresh %s", task_id, exc_info=True)
            return self.latest(task_id)
        self.deliver(task_id, meta)
        return self.latest(task_id)

    def revoke(self, task_id: str, reason: str = "cancelled") -> bool:
        """Revoke a task that has not started; True if the revoke is recorded.

        The result backend records REVOKED, which offload's workers check
        before they start a task (:class:`offload.futures.SkipRevoked`), so
        one that starts later skips it too; live workers are told at once
        (``control.revoke``). A backend that stores nothing (rpc://, none)
        cannot keep a revoke for a worker yet to come: nothing is sent and
        this returns False (``off.celery.control.revoke(id)`` still tells the
        live workers, if that is enough).
        """
        backend = self._backend_factory()
        if not stores_results(backend):
            return False
        try:
            backend.mark_as_revoked(task_id, reason)
        except Exception:
            logger.warning("could not record the revoke of %s", task_id, exc_info=True)
            return False
        backend.app.control.revoke(task_id)
        return True

    def run_callback(self, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on one of the hub's callback threads, never its own."""
        # Not the hub's lock: a thread cancelling a future reaches here while
        # the hub's thread, holding its lock, may be delivering to that future.
        with self._callbacks_lock:
            if self._callbacks is None:
                self._callbacks = ThreadPoolExecutor(
                    self.CALLBACK_THREADS, thread_name_prefix="offload-callbacks")
            executor = self._callbacks
        executor.submit(fn)

    # Delivery (the hub's thread) ------------------------------------------------

    def deliver(self, task_id: str, meta: dict[str, Any] | None) -> bool:
        """Take a backend meta dict for ``task_id``; True if it was news.

        A state older than the one known is ignored (a late STARTED after
        SUCCESS), and so is the same state with the same meta.
        """
        return self.deliver_many([(task_id, meta)]) > 0

    def deliver_many(self, metas: list[tuple[str, dict[str, Any] | None]]) -> int:
        """:meth:`deliver` for each ``(task_id, meta)``, in order, under one lock."""
        news = 0
        with self._lock:
            entries = self._entries
            for task_id, meta in metas:
                if not meta:
                    continue
                event = _event_from_meta(task_id, meta)
                entry = entries.get(task_id)
                if entry is None:
                    if event.ready:
                        # A reply for an id nobody follows yet (rpc://): keep
                        # it for the subscriber about to come.
                        self._remember(event)
                    continue
                if _advances(entry.latest, event):
                    self._publish(entry, event)
                    news += 1
        return news

    def _publish(self, entry: _Entry, event: TaskEvent) -> None:
        entry._latest = event
        subscriptions = list(entry.subscriptions)
        if event.ready:
            del self._entries[event.task_id]
            self._remember(event)
        for subscription in subscriptions:
            self._notify(subscription, event)
            if event.ready:
                # Only once its final event is delivered: close() skips the
                # lock for a closed subscription and must then find nothing
                # more on its way.
                subscription.closed = True

    @staticmethod
    def _notify(subscription: Subscription, event: TaskEvent) -> None:
        try:
            subscription.listener.on_event(event)
        except Exception:
            logger.exception("listener %r failed on %s", subscription.listener, event)

    def _remember(self, event: TaskEvent) -> None:
        self._recent[event.task_id] = event
        self._recent.move_to_end(event.task_id)
        while len(self._recent) > self.RECENT_LIMIT:
            self._recent.popitem(last=False)

    def housekeeping(self) -> None:
        """Tell LOST to ids with no news for too long (at most once a second); strategies call it often."""
        now = time.monotonic()
        if now - self._last_housekeeping < self._HOUSEKEEPING:
            return
        self._last_housekeeping = now
        limit = self._pending_limit()
        with self._lock:
            lost = [
                entry for entry in self._entries.values()
                if entry.pending and now - entry.since > limit + entry.grace
            ]
            for entry in lost:
                task_id = entry.task_id
                logger.info("no state of task %s for %.0f s: no longer followed", task_id, limit)
                self._publish(entry, TaskEvent(task_id, LOST))

    def _pending_limit(self) -> float:
        if self.pending_limit is not None:
            return float(self.pending_limit)
        try:
            expires = self._backend_factory().app.conf.result_expires
        except Exception:
            expires = None
        if expires is None:
            return 86400.0
        return float(expires.total_seconds() if hasattr(expires, "total_seconds") else expires)

    @property
    def watched(self) -> Mapping[str, Any]:
        """The ids followed now, for membership tests without the lock (atomic under the GIL)."""
        return self._entries

    def take_new(self) -> list[str]:
        """The ids subscribed since the last call (the strategy starts following them)."""
        with self._lock:
            new, self._new = self._new, []
            return new

    def ids(self) -> list[str]:
        """Every id followed now."""
        with self._lock:
            return list(self._entries)

    def count_read(self) -> None:
        """Count one read of the backend (:meth:`stats`)."""
        self._reads += 1

    def _get_strategy(self) -> Strategy:
        # Called with the lock held, in the submitting thread: an RPC reply
        # queue must exist before the first result is sent to it.
        if self._strategy is None:
            self._strategy = strategy_for(self._backend_factory())
        return self._strategy

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="offload-result-hub", daemon=True)
            self._thread.start()

    #: Longest pause between two reconnection attempts to a backend that is down.
    _RETRY_MAX = 5.0

    def _run(self) -> None:
        with self._lock:
            strategy = self._get_strategy()
        failures = 0
        while True:
            started = time.monotonic()
            try:
                strategy.run(self)
            except Exception as exc:
                # A run that lasted a while ended an earlier streak of errors.
                failures = failures + 1 if time.monotonic() - started < self._RETRY_MAX else 1
                if self._outage_since is None:
                    # One line per outage, and one when it ends (answered):
                    # a store that stays down must not flood the log.
                    self._outage_since, self._outage_retries = time.monotonic(), 0
                    logger.warning("result hub: the result backend %s is unreachable (%s); retrying "
                                   "until it answers", _where(strategy), exc)
                    logger.debug("result hub: backend error", exc_info=True)
                else:
                    self._outage_retries += 1
                    logger.debug("result hub: backend still unreachable (%s), retry %d", exc, failures)
                strategy.reset()
                self.wakeup.wait(min(0.5 * 2 ** (failures - 1), self._RETRY_MAX))
                self.wakeup.clear()
                with self._lock:
                    self._new = list(self._entries)

    def answered(self) -> None:
        """The strategy reached the backend: log the end of an outage, once."""
        since = self._outage_since
        if since is not None:
            self._outage_since = None
            logger.warning("result hub: the result backend %s answers again, after %.1f s (%d retries)",
                           _where(self._strategy), time.monotonic() - since, self._outage_retries)


def _where(strategy: Any) -> str:
    """The strategy's backend as a URL without its password, for the log."""
    try:
        return str(strategy.backend.as_uri())
    except Exception:
        return type(getattr(strategy, "backend", strategy)).__name__


def random_task_ids(count: int, prefix: str = "") -> list[str]:
    """``count`` random version-4 UUID strings, the first characters ``prefix``.

    The same ids as ``str(uuid.uuid4())`` with the prefix put in, made from
    one ``os.urandom`` read: a few times cheaper per id for a large ``map``.
    """
    digits = os.urandom(16 * count).hex()
    start = len(prefix)
    ids = []
    for at in range(0, 32 * count, 32):
        hexid = prefix + digits[at + start:at + 32]
        ids.append(f"{hexid[:8]}-{hexid[8:12]}-4{hexid[13:16]}-"
                   f"{'89ab'[int(hexid[16], 16) & 3]}{hexid[17:20]}-{hexid[20:]}")
    return ids
