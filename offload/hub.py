"""The result hub: one per ``Offload`` per process, many listeners per task id.

Every part of offload that waits on a task (a :class:`~offload.Future`, a
coroutine, a web long-poll or event stream) is a :class:`Listener` of the
hub: ``hub.subscribe(task_id, listener)`` returns a :class:`Subscription`,
and the listener's ``on_event`` is called once per state change of that task
(PENDING, STARTED, each new PROGRESS meta, then the end) until the end or
until ``subscription.close()``. Any number of listeners may follow one id; a
new one is told the latest known state at once.

One thread per hub reads the result backend for every watched id: on Redis
one pub/sub connection (Celery publishes each state it stores), on rpc:// one
reply queue per process, elsewhere one batched read of all outstanding ids,
every few milliseconds while states change and backing off to 250 ms while
none does (a task sitting in PROGRESS included).

Bounds: an id leaves the hub when it ends, when its last listener goes, or
when nothing at all was heard of it for :attr:`ResultHub.pending_limit`
seconds (a task sent with ``ignore_result``, one that expired unseen, an
unknown id); its listeners are then told :data:`LOST`. The last few
thousand final states are kept so that a late subscriber is answered at once.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from celery import states

from ._resp import Subscriber
from .dispatch import batches_results, results_channel

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
    __slots__ = ("subscriptions", "latest", "since", "grace")

    def __init__(self, task_id: str, grace: float) -> None:
        self.subscriptions: list[Subscription] = []
        self.latest = TaskEvent(task_id, states.PENDING)
        self.since = time.monotonic()
        self.grace = grace  # extra patience: a countdown or eta


def _event_from_meta(task_id: str, meta: dict[str, Any]) -> TaskEvent:
    state = meta.get("status") or states.PENDING
    result = meta.get("result")
    if state in states.EXCEPTION_STATES and state != states.RETRY and not isinstance(result, BaseException):
        from celery.exceptions import TaskRevokedError

        result = TaskRevokedError(str(result)) if state == states.REVOKED else Exception(str(result))
    return TaskEvent(task_id, state, result)


_raw_decode = json.JSONDecoder().raw_decode


def _json_document(data: bytes) -> Any:
    """``json.loads(data)`` for UTF-8 JSON, without its encoding detection and
    whitespace scans when nothing surrounds the value (a tenth of a result's
    decoding and delivery in the hub)."""
    text = data.decode("utf-8")
    value, end = _raw_decode(text)
    if end != len(text):
        return json.loads(text)  # whitespace after it, or an error as json.loads raises it
    return value


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

    _MIN_POLL = 0.002
    _MAX_POLL = 0.25
    _SAFETY_POLL = 2.0  # push backends: re-read everything this often
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
        self._wakeup = threading.Event()
        #: When the backend stopped answering (monotonic), None while it answers.
        self._outage_since: float | None = None
        self._outage_retries = 0
        self._new: list[str] = []
        self._thread: threading.Thread | None = None
        self._strategy: Any = None
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

    def subscribe_many(self, pairs: list[tuple[str, Listener]], *, grace: float = 0.0) -> list[Subscription]:
        """:meth:`subscribe` for each ``(task_id, listener)``, under one lock.

        What ``map`` uses: one lock, one check of the hub's thread and one
        wake-up for the whole batch, not one per call.
        """
        subscriptions = [Subscription(self, task_id, listener) for task_id, listener in pairs]
        wake = False
        with self._lock:
            for subscription in subscriptions:
                wake = self._add(subscription, grace) or wake
            if wake:
                self._get_strategy()
                self._ensure_thread()
        if wake:
            self._wakeup.set()
        return subscriptions

    def _add(self, subscription: Subscription, grace: float) -> bool:
        # With the lock held; True when the id is new to the hub.
        task_id = subscription.task_id
        final = self._recent.get(task_id)
        if final is not None:
            subscription.closed = True
            self._notify(subscription, final)
            return False
        entry = self._entries.get(task_id)
        if entry is None:
            entry = self._entries[task_id] = _Entry(task_id, grace)
            self._new.append(task_id)
            new = True
        else:
            entry.grace = max(entry.grace, grace)
            new = False
        entry.subscriptions.append(subscription)
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
            return not isinstance(self._get_strategy(), _RpcPush)

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
        if isinstance(strategy, _RpcPush):
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
        entry.latest = event
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

    def _housekeeping(self) -> None:
        """Tell LOST to ids with no news for too long (at most once a second)."""
        now = time.monotonic()
        if now - self._last_housekeeping < self._HOUSEKEEPING:
            return
        self._last_housekeeping = now
        limit = self._pending_limit()
        with self._lock:
            lost = [
                entry for entry in self._entries.values()
                if entry.latest.state == states.PENDING and now - entry.since > limit + entry.grace
            ]
            for entry in lost:
                task_id = entry.latest.task_id
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

    def _take_new(self) -> list[str]:
        with self._lock:
            new, self._new = self._new, []
            return new

    def _ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def _count_read(self) -> None:
        self._reads += 1

    def _get_strategy(self) -> Any:
        # Called with the lock held, in the submitting thread: an RPC reply
        # queue must exist before the first result is sent to it.
        if self._strategy is None:
            backend = self._backend_factory()
            if _is_redis(backend):
                self._strategy = _RedisPush(backend)
            elif _is_rpc(backend):
                self._strategy = _RpcPush(backend)
            else:
                self._strategy = _BatchPoll(backend)
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
                    # One line per outage, and one when it ends (_answered):
                    # a store that stays down must not flood the log.
                    self._outage_since, self._outage_retries = time.monotonic(), 0
                    logger.warning("result hub: the result backend %s is unreachable (%s); retrying "
                                   "until it answers", _where(strategy), exc)
                    logger.debug("result hub: backend error", exc_info=True)
                else:
                    self._outage_retries += 1
                    logger.debug("result hub: backend still unreachable (%s), retry %d", exc, failures)
                strategy.reset()
                self._wakeup.wait(min(0.5 * 2 ** (failures - 1), self._RETRY_MAX))
                self._wakeup.clear()
                with self._lock:
                    self._new = list(self._entries)

    def _answered(self) -> None:
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


def stores_results(backend: Any) -> bool:
    """True if ``backend`` keeps states any process can read (not rpc://, not none)."""
    from celery.backends.base import DisabledBackend

    return not isinstance(backend, DisabledBackend) and not _is_rpc(backend)


def _is_redis(backend: Any) -> bool:
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # redis-py not installed
        return False
    return isinstance(backend, RedisBackend) and hasattr(backend, "client")


def _is_rpc(backend: Any) -> bool:
    from celery.backends.rpc import RPCBackend

    return isinstance(backend, RPCBackend)


class _BatchPoll:
    """Reads all outstanding ids in one batch, backing off while nothing changes."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.many = getattr(backend, "mget", None) is not None and hasattr(backend, "get_key_for_task")

    def reset(self) -> None:
        pass

    def submit_options(self) -> dict[str, Any]:
        return {"task_id": str(uuid.uuid4())}

    def fetch(self, hub: ResultHub, ids: list[str]) -> dict[str, dict[str, Any]]:
        if self.many:
            keys = [self.backend.get_key_for_task(i) for i in ids]
            hub._count_read()
            values = self.backend.mget(keys)
            return {
                task_id: self.backend.decode_result(value)
                for task_id, value in zip(ids, values) if value
            }
        metas = {}
        for task_id in ids:
            hub._count_read()
            metas[task_id] = self.backend.get_task_meta(task_id, cache=False)
        return metas

    def run(self, hub: ResultHub) -> None:
        delay = ResultHub._MIN_POLL
        while True:
            if hub._take_new():
                delay = ResultHub._MIN_POLL
            hub._housekeeping()
            ids = hub._ids()
            if not ids:
                hub._wakeup.wait(30)
                hub._wakeup.clear()
                continue
            changed = False
            for start in range(0, len(ids), 500):
                for task_id, meta in self.fetch(hub, ids[start:start + 500]).items():
                    changed = hub.deliver(task_id, meta) or changed
            hub._answered()
            # Only news keeps the poll fast: a task sitting in PROGRESS with
            # the same meta backs off like any other.
            delay = ResultHub._MIN_POLL if changed else min(delay * 1.5, ResultHub._MAX_POLL)
            if hub._wakeup.wait(delay):
                hub._wakeup.clear()


class _RedisPush:
    """One pub/sub connection: Celery's Redis backend publishes each state it stores.

    Futures submitted here get task ids that start with this process's own
    random prefix (the ids stay UUID-shaped), so one pattern subscription
    covers them all: no SUBSCRIBE/UNSUBSCRIBE per task, and no results of
    other processes. Ids from elsewhere (``off.get(id)``) are subscribed one
    by one on the same connection.

    The calls of ``map``'s chunks get ids with a second prefix, which the
    pattern does not cover: their results arrive as one message per chunk
    flush on :func:`offload.dispatch.results_channel` (one JSON array),
    rather than one pub/sub message per call.
    """

    #: Take new ids (MGET what was stored before we listened) and drop
    #: finished foreign subscriptions at most this often: one round trip per
    #: batch, not per task, and the GIL left to the threads that submit.
    TICK = 0.005
    #: Results decoded and delivered between two yields of the GIL.
    SLICE = 64
    #: This many results within one tick make a stream: from then on they are
    #: taken once per tick (two are one task's STARTED and SUCCESS).
    STREAM = 5
    #: Unsubscribe the channels of foreign ids no longer followed this often,
    #: once results have stopped streaming in for a few ticks (thousands of
    #: unsubscriptions and their confirmations in the middle of a burst
    #: delay it), and at the latest after SWEEP_LIMIT.
    SWEEP = 1.0
    SWEEP_LIMIT = 10.0

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._last_sweep = self._last_result = 0.0
        # Celery's decode_result, without kombu's per-object hook when the
        # payload holds no tagged value (see _decode).
        self._plain_json = getattr(backend, "content_type", None) == "application/json"
        self.pubsub: Any = None
        self.prefix = uuid.uuid4().hex[:8]
        self.pattern_prefix = bytes(backend.get_key_for_task(self.prefix))
        # The ids of chunked calls (new_task_ids), heard in batches.
        self.batch_prefix: str | None = None
        self.batch_channel = b""
        if batches_results(backend):
            self.batch_prefix = uuid.uuid4().hex[:8]
            while self.batch_prefix == self.prefix:
                self.batch_prefix = uuid.uuid4().hex[:8]
            self.batch_channel = results_channel(self.batch_prefix).encode()
        self.channels: dict[bytes, str] = {}  # foreign ids, subscribed one by one
        # Until Redis confirms the pattern subscription, a result may be
        # published unheard: every id is then read back once it is confirmed.
        self.listening = False

    def new_task_id(self) -> str:
        return self.prefix + str(uuid.uuid4())[8:]

    def submit_options(self) -> dict[str, Any]:
        return {"task_id": self.new_task_id()}

    def reset(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except Exception:
                pass
        self.pubsub = None
        self.channels.clear()
        self.listening = False

    def _manage(self, hub: ResultHub) -> None:
        new = hub._take_new()
        if new:
            foreign = {bytes(self.backend.get_key_for_task(i)): i for i in new if not self._own(i)}
            if foreign:
                self.channels.update(foreign)
                self.pubsub.subscribe(*foreign)
                # Anything stored before their subscription took effect.
                self._read_stored(hub, list(foreign.values()))
        now = time.monotonic()
        if self.channels and now - self._last_sweep >= self.SWEEP and (
                now - self._last_result >= 4 * self.TICK or now - self._last_sweep >= self.SWEEP_LIMIT):
            # A scan of every foreign id, so not at each tick: thousands of
            # them cost milliseconds. Until then a finished id's channel
            # stays subscribed, and what it still hears is ignored.
            self._last_sweep = now
            entries = hub._entries  # membership tests only: atomic under the GIL
            done = [ch for ch, task_id in self.channels.items() if task_id not in entries]
            if done:
                for channel in done:
                    del self.channels[channel]
                self.pubsub.unsubscribe(*done)

    def _own(self, task_id: str) -> bool:
        return task_id.startswith(self.prefix) or (
            self.batch_prefix is not None and task_id.startswith(self.batch_prefix))

    def _unpack_batch(self, data: bytes, into: list[tuple[str, dict[str, Any] | None]]) -> None:
        # One JSON array of stored metas (dispatch.store_results): one
        # decoding for the whole flush of a chunk.
        try:
            metas = json.loads(data)
        except ValueError:
            logger.warning("result hub: unreadable batch of results on %r", self.batch_channel)
            return
        if not isinstance(metas, list):
            logger.warning("result hub: a batch of results on %r is not a list", self.batch_channel)
            return
        for meta in metas:
            task_id = meta.get("task_id") if isinstance(meta, dict) else None
            if isinstance(task_id, str):
                into.append((task_id, self.backend.meta_from_decoded(meta)))

    def _read_stored(self, hub: ResultHub, ids: list[str]) -> None:
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]
            keys = [self.backend.get_key_for_task(i) for i in batch]
            hub._count_read()
            for task_id, value in zip(batch, self.backend.client.mget(keys)):
                if value:
                    hub.deliver(task_id, self.backend.decode_result(value))

    def _confirmed(self, hub: ResultHub) -> None:
        # From here on every result of this process's ids is heard; read what
        # was stored before (submitted earlier, or during a reconnect).
        self.listening = True
        self._read_stored(hub, hub._ids())

    def _unpack(self, hub: ResultHub, replies: list[Any]) -> list[tuple[str, dict[str, Any] | None]]:
        """The (task id, meta) pairs in a bulk read (None: undecodable); a confirmation on the way."""
        metas: list[tuple[str, dict[str, Any] | None]] = []
        decode = self._decode
        id_from = len(self.pattern_prefix) - len(self.prefix)  # where a key's task id starts
        for reply in replies:
            kind = reply[0] if isinstance(reply, list) and reply else None
            if kind == b"pmessage" and len(reply) == 4:
                metas.append((reply[2][id_from:].decode("utf-8", "replace"), decode(reply[3])))
            elif kind == b"message" and len(reply) == 3:
                if reply[1] == self.batch_channel:
                    self._unpack_batch(reply[2], metas)
                else:
                    task_id = self.channels.get(reply[1])
                    if task_id is not None:
                        metas.append((task_id, decode(reply[2])))
            elif kind == b"psubscribe" and not self.listening:
                self._confirmed(hub)
        return metas

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        try:
            if self._plain_json and data[:1] == b"{" and b'"__type__"' not in data:
                # What decode_result returns for it: kombu's JSON decoding
                # differs from the standard library's only by turning
                # {"__type__", "__value__"} objects into datetimes and the
                # like (none here), and a compressed payload starts with its
                # marker, not "{". A third of the hub's time, saved.
                return self.backend.meta_from_decoded(_json_document(data))
            return self.backend.decode_result(data)
        except Exception:  # not Celery's: skipped, the stream goes on
            logger.warning("result hub: an unreadable result message (%d bytes) skipped", len(data))
            return None

    def run(self, hub: ResultHub) -> None:
        self.listening = False
        self.pubsub = Subscriber(self.backend.client)
        # After a reconnect: the ids of other processes still awaited.
        self.channels = {bytes(self.backend.get_key_for_task(i)): i
                         for i in hub._ids() if not self._own(i)}
        if self.channels:
            self.pubsub.subscribe(*self.channels)
        if self.batch_channel:
            # Before the pattern: its confirmation, which reads back what was
            # stored meanwhile, then comes after this one's.
            self.pubsub.subscribe(self.batch_channel)
        self.pubsub.psubscribe(self.pattern_prefix + b"*")
        hub._answered()
        last_safety = time.monotonic()
        window_start = next_tick = 0.0
        window_count = 0
        while True:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.TICK
                self._manage(hub)
                hub._housekeeping()
            if not hub._entries:
                # Keep reading while idle, or subscription confirmations and
                # stray results would pile up in the socket.
                hub.deliver_many(self._unpack(hub, self.pubsub.read(0.0)))
                if hub._wakeup.wait(5.0):
                    hub._wakeup.clear()
                continue
            # Every reply that has arrived, in one recv: a burst of results
            # costs one system call and one lock, not one of each per result.
            replies = self.pubsub.read(next_tick - time.monotonic())
            if replies:
                metas = []
                for start in range(0, len(replies), self.SLICE):
                    if start:
                        # Let a thread that waits for the GIL (one that
                        # submits, its reply from the broker just in) run
                        # between slices, rather than after the whole burst.
                        time.sleep(0)
                    part = self._unpack(hub, replies[start:start + self.SLICE])
                    if part:
                        hub.deliver_many(part)
                        metas += part
                if metas:
                    hub._count_read()
                    now = self._last_result = time.monotonic()
                    if now - window_start > self.TICK:
                        window_start, window_count = now, 0
                    window_count += len(metas)
                    if window_count >= self.STREAM:
                        # Results keep coming (many tasks at once): let the
                        # next ones pile up until the tick and take them in
                        # one go, rather than waking (and taking the GIL from
                        # the threads that submit) once per message. A task
                        # or two at a time (a round trip, its STARTED and its
                        # SUCCESS) is still delivered as soon as it arrives.
                        time.sleep(max(next_tick - now, 0.0))
            if time.monotonic() - last_safety > ResultHub._SAFETY_POLL:
                last_safety = time.monotonic()
                self._read_stored(hub, hub._ids())


class _RpcPush:
    """RPC results (``rpc://``): one reply queue per process, one consumer.

    Celery's RPC backend sends each result to the queue named in the task's
    ``reply_to``, by default one per submitting *thread*. offload names one
    queue per process instead, so the hub consumes every result of the
    process, whichever thread submitted it. The queue outlives a short
    disconnect (it expires after 10 idle minutes instead of auto-deleting).
    """

    def __init__(self, backend: Any) -> None:
        from kombu import Queue

        self.backend = backend
        self.queue = Queue(
            f"offload.reply.{uuid.uuid4()}", exchange=backend.exchange,
            routing_key=None, durable=False, auto_delete=False,
            expires=600.0, message_ttl=None,
        )
        self.queue.routing_key = self.queue.name
        self.connection: Any = None
        self.consumer: Any = None
        self._hub: ResultHub | None = None
        self._connect()

    def submit_options(self) -> dict[str, Any]:
        return {"task_id": str(uuid.uuid4()), "reply_to": self.queue.name}

    def _connect(self) -> None:
        from kombu import Consumer

        self.connection = self.backend.app.connection_for_read()
        channel = self.connection.default_channel
        self.queue(channel).declare()
        self.consumer = Consumer(channel, queues=[self.queue], no_ack=True,
                                 accept=self.backend.accept, callbacks=[self._on_message])
        self.consumer.consume()

    def reset(self) -> None:
        try:
            if self.connection is not None:
                self.connection.close()
        except Exception:
            pass
        self.connection = None

    def _on_message(self, body: Any, message: Any) -> None:
        task_id = message.properties.get("correlation_id") or body.get("task_id")
        if self._hub is not None and task_id:
            self._hub._count_read()
            self._hub.deliver(task_id, self.backend.meta_from_decoded(dict(body)))

    def run(self, hub: ResultHub) -> None:
        if self.connection is None:
            self._connect()
        hub._answered()
        self._hub = hub
        while True:
            hub._take_new()  # nothing to subscribe: every reply comes here
            hub._housekeeping()
            try:
                self.connection.drain_events(timeout=0.25)
            except socket.timeout:
                self.connection.heartbeat_check()
