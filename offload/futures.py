"""``Future`` and the per-process result watcher.

A :class:`Future` is a real :class:`concurrent.futures.Future`: it works with
``wait``, ``as_completed``, ``add_done_callback`` and ``await``. It is
completed by one :class:`ResultWatcher` per ``Offload`` per process, never by
a thread or a subscription per future: on a Redis result backend the watcher
holds one pub/sub connection (Celery publishes every state it stores), on
other backends it polls all outstanding ids in one batch, quickly at first and
more slowly while nothing changes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future as _BaseFuture
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult

__all__ = ["Future", "ResultWatcher"]

logger = logging.getLogger("offload.futures")

_RUNNING_STATES = frozenset({states.STARTED, "PROGRESS"})


class Future(_BaseFuture):
    """The future of one task: a :class:`concurrent.futures.Future`.

    Besides the standard API it has ``id``, ``state`` (Celery's state name)
    and ``progress`` (the latest ``progress()`` report), and it can be
    awaited.

    >>> fut = off.submit(add, 1, 2)          # doctest: +SKIP
    >>> fut.result(timeout=10)               # doctest: +SKIP
    3
    """

    def __init__(self, async_result: AsyncResult, watcher: ResultWatcher | None = None) -> None:
        super().__init__()
        self._async_result = async_result
        self._watcher = watcher
        self._task_state: str = states.PENDING
        self._progress: Any = None

    def __repr__(self) -> str:
        return f"<offload.Future {self.id} {self._task_state}>"

    @property
    def id(self) -> str:
        """The task id, to look the task up again with ``off.get(id)``."""
        return self._async_result.id

    @property
    def state(self) -> str:
        """The task's Celery state: PENDING, STARTED, PROGRESS, SUCCESS, ..."""
        return self._task_state

    @property
    def progress(self) -> Any:
        """The meta of the latest ``progress()`` report, or None."""
        return self._progress

    @property
    def async_result(self) -> AsyncResult:
        """The Celery :class:`~celery.result.AsyncResult` behind this future."""
        return self._async_result

    def cancel(self) -> bool:
        """Revoke the task if it has not started; False if it has.

        A running task is never killed: ``cancel()`` returns False and the
        task runs to its end, as ``concurrent.futures`` does for a running
        call.
        """
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            if self._state in (RUNNING, FINISHED):
                return False
        if self._watcher is not None:
            # The watcher's view may lag behind the backend by a poll.
            self._watcher.refresh(self)
            if self._state in (RUNNING, FINISHED):
                return False
        self._async_result.revoke()
        self._task_state = states.REVOKED
        cancelled = super().cancel()
        if self._watcher is not None:
            self._watcher.forget(self)
        return cancelled

    def add_done_callback(self, fn: Callable[..., Any]) -> None:
        """Call ``fn(future)`` when the task ends (``fn()`` is accepted too)."""
        super().add_done_callback(_adapt_callback(fn))

    def __await__(self) -> Generator[Any, None, Any]:
        # wrap_future hooks a done-callback and wakes the loop thread-safely:
        # no thread is parked per awaited future.
        return asyncio.wrap_future(self).__await__()

    # The watcher's side -------------------------------------------------

    def _apply_meta(self, meta: dict[str, Any]) -> bool:
        """Take a backend meta dict; True once the future is done."""
        state = meta.get("status") or states.PENDING
        result = meta.get("result")
        self._task_state = state
        if state == "PROGRESS":
            self._progress = result
        if self.done():
            return True
        if state in _RUNNING_STATES:
            with self._condition:
                if self._state == PENDING:
                    self._state = RUNNING
            return False
        if state == states.SUCCESS:
            self._finish(result=result)
            return True
        if state in states.EXCEPTION_STATES and state != states.RETRY:
            if state == states.REVOKED and self._state == PENDING and super().cancel():
                return True
            if not isinstance(result, BaseException):
                result = TaskRevokedError(str(result)) if state == states.REVOKED else Exception(str(result))
            self._finish(exception=result)
            return True
        return False

    def _finish(self, result: Any = None, exception: BaseException | None = None) -> None:
        try:
            if exception is not None:
                self.set_exception(exception)
            else:
                self.set_result(result)
        except Exception:  # InvalidStateError: cancelled locally meanwhile
            pass


def _adapt_callback(fn: Callable[..., Any]) -> Callable[[Future], Any]:
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


class ResultWatcher:
    """Completes every outstanding :class:`Future` of one backend in one thread."""

    _MIN_POLL = 0.002
    _MAX_POLL = 0.25
    _SAFETY_POLL = 2.0  # push backends: re-read everything this often

    def __init__(self, backend_factory: Callable[[], Any]) -> None:
        self._backend_factory = backend_factory
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._pending: dict[str, Future] = {}
        self._new: list[str] = []
        self._thread: threading.Thread | None = None
        self._strategy: Any = None

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

    def submit_options(self) -> dict[str, Any]:
        """Options every submit needs for this backend (an RPC reply queue)."""
        with self._lock:
            if self._pid != os.getpid():
                self._reset()
            return self._get_strategy().submit_options()

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def watch(self, future: Future) -> None:
        """Complete ``future`` when its task ends."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the thread stayed in the parent
                self._reset()
            self._pending[future.id] = future
            self._new.append(future.id)
            self._get_strategy()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="offload-result-watcher", daemon=True
                )
                self._thread.start()
        self._wakeup.set()

    def forget(self, future: Future) -> None:
        with self._lock:
            self._pending.pop(future.id, None)

    def refresh(self, future: Future) -> None:
        """Read ``future``'s state from the backend now."""
        backend = self._backend_factory()
        try:
            meta = backend.get_task_meta(future.id, cache=False)
        except Exception:
            logger.debug("could not refresh %s", future.id, exc_info=True)
            return
        if future._apply_meta(meta):
            self.forget(future)

    # The thread ------------------------------------------------------------

    def _take_new(self) -> list[str]:
        with self._lock:
            new, self._new = self._new, []
            return new

    def _snapshot(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def _deliver(self, task_id: str, meta: dict[str, Any] | None) -> None:
        if not meta:
            return
        future = self._pending.get(task_id)
        if future is not None and future._apply_meta(meta):
            self.forget(future)

    def _run(self) -> None:
        strategy = self._strategy
        while True:
            try:
                strategy.run(self)
            except Exception:
                logger.warning("result watcher: backend error, retrying", exc_info=True)
                strategy.reset()
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                with self._lock:
                    self._new = list(self._pending)


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
    """Reads all outstanding ids in one batch, backing off while idle."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.many = getattr(backend, "mget", None) is not None and hasattr(backend, "get_key_for_task")

    def reset(self) -> None:
        pass

    def submit_options(self) -> dict[str, Any]:
        return {}

    def fetch(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        if self.many:
            keys = [self.backend.get_key_for_task(i) for i in ids]
            values = self.backend.mget(keys)
            return {
                task_id: self.backend.decode_result(value)
                for task_id, value in zip(ids, values) if value
            }
        return {task_id: self.backend.get_task_meta(task_id, cache=False) for task_id in ids}

    def run(self, watcher: ResultWatcher) -> None:
        delay = ResultWatcher._MIN_POLL
        seen: dict[str, str] = {}
        while True:
            if watcher._take_new():
                delay = ResultWatcher._MIN_POLL
            ids = watcher._snapshot()
            if not ids:
                seen.clear()
                watcher._wakeup.wait(30)
                watcher._wakeup.clear()
                continue
            changed = False
            for start in range(0, len(ids), 500):
                for task_id, meta in self.fetch(ids[start:start + 500]).items():
                    status = meta.get("status")
                    if seen.get(task_id) != status or status == "PROGRESS":
                        changed = True
                        seen[task_id] = status
                    watcher._deliver(task_id, meta)
            delay = ResultWatcher._MIN_POLL if changed else min(delay * 1.5, ResultWatcher._MAX_POLL)
            if watcher._wakeup.wait(delay):
                watcher._wakeup.clear()


class _RedisPush:
    """One pub/sub connection: Celery's Redis backend publishes each state it stores.

    Futures submitted here get task ids that start with this process's own
    random prefix (the ids stay UUID-shaped), so one pattern subscription
    covers them all: no SUBSCRIBE/UNSUBSCRIBE per task, and no results of
    other processes. Ids from elsewhere (``off.get(id)``) are subscribed one
    by one on the same connection.
    """

    #: Take new ids (MGET what was stored before we listened) and drop
    #: finished foreign subscriptions at most this often: one round trip per
    #: batch, not per task, and the GIL left to the threads that submit.
    TICK = 0.005

    def __init__(self, backend: Any) -> None:
        import uuid

        self.backend = backend
        self.pubsub: Any = None
        self.prefix = uuid.uuid4().hex[:8]
        self.pattern_prefix = bytes(backend.get_key_for_task(self.prefix))
        self.channels: dict[bytes, str] = {}  # foreign ids, subscribed one by one
        # Until Redis confirms the pattern subscription, a result may be
        # published unheard: every id is then read back once it is confirmed.
        self.listening = False

    def new_task_id(self) -> str:
        import uuid

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

    def _manage(self, watcher: ResultWatcher) -> None:
        new = watcher._take_new()
        if new:
            foreign = {
                bytes(self.backend.get_key_for_task(i)): i for i in new if not i.startswith(self.prefix)
            }
            if foreign:
                self.channels.update(foreign)
                self.pubsub.subscribe(*foreign)
                # Anything stored before their subscription took effect.
                self._read_stored(watcher, list(foreign.values()))
        done = [ch for ch, task_id in self.channels.items() if task_id not in watcher._pending]
        if done:
            for channel in done:
                del self.channels[channel]
            self.pubsub.unsubscribe(*done)

    def _read_stored(self, watcher: ResultWatcher, ids: list[str]) -> None:
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]
            keys = [self.backend.get_key_for_task(i) for i in batch]
            for task_id, value in zip(batch, self.backend.client.mget(keys)):
                if value:
                    watcher._deliver(task_id, self.backend.decode_result(value))

    def _task_id(self, message: dict[str, Any]) -> str | None:
        channel = bytes(message["channel"])
        if message["type"] == "pmessage":
            return channel[len(self.pattern_prefix) - len(self.prefix):].decode()
        return self.channels.get(channel)

    def _confirmed(self, watcher: ResultWatcher) -> None:
        # From here on every result of this process's ids is heard; read what
        # was stored before (submitted earlier, or during a reconnect).
        self.listening = True
        self._read_stored(watcher, watcher._snapshot())

    def run(self, watcher: ResultWatcher) -> None:
        self.listening = False
        self.pubsub = self.backend.client.pubsub()
        self.pubsub.psubscribe(self.pattern_prefix + b"*")
        # After a reconnect: the ids of other processes still awaited.
        self.channels = {bytes(self.backend.get_key_for_task(i)): i
                         for i in watcher._snapshot() if not i.startswith(self.prefix)}
        if self.channels:
            self.pubsub.subscribe(*self.channels)
        last_safety = time.monotonic()
        next_tick = 0.0
        while True:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.TICK
                self._manage(watcher)
            if not watcher._pending:
                # Keep reading while idle, or subscription confirmations and
                # stray results would pile up in the socket.
                if self.pubsub.get_message(timeout=0) is not None and not self.listening:
                    self._confirmed(watcher)
                if watcher._wakeup.wait(5.0):
                    watcher._wakeup.clear()
                continue
            message = self.pubsub.get_message(timeout=max(next_tick - time.monotonic(), 0.0))
            received = 0
            while message is not None:
                kind = message.get("type")
                if kind in ("message", "pmessage"):
                    received += 1
                    task_id = self._task_id(message)
                    if task_id is not None:
                        watcher._deliver(task_id, self.backend.decode_result(message["data"]))
                elif kind == "psubscribe" and not self.listening:
                    self._confirmed(watcher)
                message = self.pubsub.get_message(timeout=0)
            if received > 1:
                # A burst of results: let the next ones pile up until the tick
                # and take them in one go, rather than waking (and taking the
                # GIL from the submitting threads) once per message. A lone
                # result is still delivered as soon as it arrives.
                time.sleep(max(next_tick - time.monotonic(), 0.0))
            if time.monotonic() - last_safety > ResultWatcher._SAFETY_POLL:
                last_safety = time.monotonic()
                self._read_stored(watcher, watcher._snapshot())


class _RpcPush:
    """RPC results (``rpc://``): one reply queue per process, one consumer.

    Celery's RPC backend sends each result to the queue named in the task's
    ``reply_to``, by default one per submitting *thread*. offload names one
    queue per process instead, so the watcher consumes every result of the
    process, whichever thread submitted it. The queue outlives a short
    disconnect (it expires after 10 idle minutes instead of auto-deleting).
    """

    def __init__(self, backend: Any) -> None:
        import uuid

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
        self._connect()

    def submit_options(self) -> dict[str, Any]:
        return {"reply_to": self.queue.name}

    def _connect(self) -> None:
        from kombu import Consumer

        self.connection = self.backend.app.connection_for_read()
        channel = self.connection.default_channel
        self.queue(channel).declare()
        self.consumer = Consumer(channel, queues=[self.queue], no_ack=True,
                                 accept=self.backend.accept, callbacks=[self._on_message])
        self.consumer.consume()
        self._watcher: ResultWatcher | None = None

    def reset(self) -> None:
        try:
            if self.connection is not None:
                self.connection.close()
        except Exception:
            pass
        self.connection = None

    def _on_message(self, body: Any, message: Any) -> None:
        task_id = message.properties.get("correlation_id") or body.get("task_id")
        if self._watcher is not None and task_id:
            self._watcher._deliver(task_id, self.backend.meta_from_decoded(dict(body)))

    def run(self, watcher: ResultWatcher) -> None:
        import socket

        if self.connection is None:
            self._connect()
        self._watcher = watcher
        while True:
            watcher._take_new()  # nothing to subscribe: every reply comes here
            try:
                self.connection.drain_events(timeout=0.25)
            except socket.timeout:
                self.connection.heartbeat_check()
