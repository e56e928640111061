"""``off.executor()``: a :class:`concurrent.futures.Executor` on offload's workers.

Code written for ``ProcessPoolExecutor`` takes it unchanged where its
functions are importable (and allowed, see ``OFFLOAD_ALLOW``): ``submit``,
``map`` with results in order and a ``timeout`` counted from the call,
``shutdown(wait, cancel_futures)`` and the ``with`` block behave as the
standard library's executors do. The differences come from where the work
runs: the pool is the Offload's workers (shared with everything else it
sends), arguments and results travel as JSON (a tuple comes back as a list),
and ``shutdown`` stops accepting work for this executor without stopping
any worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent import futures
from typing import Any, ParamSpec, Protocol, TypeVar, overload

from .futures import Future

__all__ = ["CallSender", "Executor"]

P = ParamSpec("P")
R = TypeVar("R")


class CallSender(Protocol):
    """What the executor needs from ``off.options(...)``: send calls as they are."""

    def submit_call(self, fn: Callable[..., R], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Future[R]:
        """Send ``fn(*args, **kwargs)``; no keyword is reserved."""
        ...

    def map_calls(self, fn: Callable[..., R], calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                  *, chunksize: int | None = None) -> list[Future[R]]:
        """Send one call per ``(args, kwargs)`` through one producer, ``chunksize`` per message."""
        ...


class Executor(futures.Executor):
    """A ``concurrent.futures.Executor`` whose pool is the Offload's workers.

    Make one with ``off.executor(**options)`` (options as in
    ``off.options``: ``queue``, ``countdown``, ``expires``, ...).

    >>> with off.executor() as ex:                      # doctest: +SKIP
    ...     list(ex.map(add, [1, 2], [10, 20]))
    [11, 22]
    """

    def __init__(self, sender: CallSender) -> None:
        self._sender = sender
        # Held while sending, as the standard library's executors hold
        # theirs: a submit that passed the shutdown check is in _pending
        # before shutdown() reads it, so shutdown(wait=True) waits for it.
        self._lock = threading.Lock()
        self._shutdown = False
        # Calls not known to be done, for shutdown(). Done ones are pruned
        # while submitting (amortised) and as map's iterator yields them; no
        # done-callback, whose queued closure would hold each future (and
        # its result) until the hub's callback thread got to it.
        self._pending: set[Future[Any]] = set()
        self._prune_at = 64

    # An async def function: the worker awaits the coroutine, the future holds its result.
    @overload
    def submit(self, fn: Callable[P, Coroutine[Any, Any, R]], /, *args: P.args,
               **kwargs: P.kwargs) -> Future[R]: ...

    @overload
    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]: ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker; its :class:`offload.Future`.

        Every keyword goes to ``fn`` (``queue=`` included: set the queue with
        ``off.executor(queue=...)``).

        Raises:
            RuntimeError: after ``shutdown()``.
            TypeError: ``fn`` cannot be sent (a lambda, a closure, a builtin)
                or an argument is not JSON-serializable.
            BrokerUnavailable: the broker cannot be reached.
        """
        with self._lock:
            self._check_open()
            future = self._sender.submit_call(fn, args, kwargs)
            self._track([future])
        return future

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[R]:
        """``fn`` over the zipped iterables, results in order, as ``builtins.map``.

        Every call is sent before this returns (through one producer), as
        the standard library's executors do; ``timeout`` counts from this
        call, and ``TimeoutError`` comes from ``next()`` on the iterator
        when a result is not there in time. Leaving the iterator early (an
        exception, ``break`` then garbage collection) cancels the calls that
        have not started. ``chunksize`` (>= 1), as for
        ``ProcessPoolExecutor``, sends that many calls per message (see
        ``off.map(..., chunksize=n)``); each call keeps its own future.

        Raises:
            ValueError: ``chunksize`` < 1.
            RuntimeError: after ``shutdown()``.
            TypeError: ``fn`` cannot be sent, or an item's arguments are not
                JSON-serializable (then nothing is sent).
        """
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else time.monotonic() + timeout
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [(args, {}) for args in zip(*iterables)]
        with self._lock:
            self._check_open()
            sent = self._sender.map_calls(fn, calls, chunksize=chunksize)
            self._track(sent)
        return _results_in_order(sent, end_time, self._forget)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more calls; optionally cancel those not started, and wait.

        ``cancel_futures=True`` cancels (revokes) every call of this executor
        that has not started; ``wait=True`` then waits for the others to
        end. Calling it again is harmless. Workers keep running: they belong
        to the Offload (``off.stop()`` stops local ones).
        """
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            futures.wait(pending)

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _track(self, futures: list[Future[Any]]) -> None:
        # Called with the lock held.
        self._pending.update(futures)
        if len(self._pending) >= self._prune_at:
            self._pending = {future for future in self._pending if not future.done()}
            self._prune_at = max(64, 2 * len(self._pending))

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)


def _results_in_order(sent: list[Future[R]], end_time: float | None,
                      forget: Callable[[Future[Any]], None]) -> Iterator[R]:
    # A generator of its own (not map's body) so that the calls are sent
    # when map() is called, not at the first next().
    sent.reverse()  # pop() from the end: a yielded result is held by no one here
    try:
        while sent:
            if end_time is None:
                yield _result_or_cancel(sent.pop(), None, forget)
            else:
                yield _result_or_cancel(sent.pop(), end_time - time.monotonic(), forget)
    finally:
        for future in sent:
            future.cancel()


def _result_or_cancel(future: Future[R], timeout: float | None, forget: Callable[[Future[Any]], None]) -> R:
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()  # a timeout: this call is not waited for any more
        raise
    finally:
        # The done-callback that forgets it runs on the hub's callback
        # thread, maybe later: a yielded result must not stay held meanwhile.
        if future.done():
            forget(future)
