"""``async def`` functions on a worker: one event loop per worker process.

Celery calls a task's function and takes what it returns; for a coroutine
function that is a coroutine object, never run. offload's dispatcher and
task class hand such a coroutine to :func:`run`, which runs it to its end on
the process's own loop: made on first use, kept for every later call (an
``aiohttp`` session or a database pool made by one call serves the next),
and made anew only in a forked child, which must not share its parent's.

The coroutine runs in the thread that runs the task, so ``current_task``
and ``progress()`` see the task as in a plain function. Celery's signals
reach it as cancellation:

* a revoke with ``terminate=True`` (SIGTERM to the pool process) cancels
  the coroutine (``CancelledError`` inside, so ``finally`` blocks run), then
  the process ends as Celery expects and the task ends REVOKED;
* a soft time limit (SIGUSR1) cancels it and the task fails with
  ``SoftTimeLimitExceeded``; a hard time limit kills the process as for
  any task.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

__all__ = ["event_loop", "run"]

#: Celery's soft time limit signal (billiard's SIG_SOFT_TIMEOUT).
_SOFT_TIMEOUT = getattr(signal, "SIGUSR1", None)


class _Loops(threading.local):
    """This thread's loop and the process it was made in."""

    loop: asyncio.AbstractEventLoop | None = None
    pid: int = 0


_loops = _Loops()


def event_loop() -> asyncio.AbstractEventLoop:
    """The loop coroutines run on in this worker process (and thread).

    A prefork pool process runs its tasks in one thread: one loop per
    process. A threads pool gets one per thread, since a loop runs in one
    thread at a time.
    """
    loop = _loops.loop
    if loop is None or loop.is_closed() or _loops.pid != os.getpid():
        loop = asyncio.new_event_loop()
        _loops.loop, _loops.pid = loop, os.getpid()
    return loop


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to its end on this process's loop; its value.

    Called where a task runs (a pool process, eager mode). When this thread
    already runs another loop (eager mode inside an async web app), the
    coroutine runs in a helper thread with its own loop, the task's
    context carried over.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_here(coro)
    return _run_beside(coro)


def _run_here(coro: Coroutine[Any, Any, Any]) -> Any:
    loop = event_loop()
    task = loop.create_task(coro)
    with _cancelled_by_signals(loop, task) as fired:
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if fired and fired[0] == _SOFT_TIMEOUT:
                raise SoftTimeLimitExceeded("soft time limit exceeded: the coroutine was cancelled") from None
            raise
    # (after the handlers are restored: see _cancelled_by_signals)


@contextmanager
def _cancelled_by_signals(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> Iterator[list[int]]:
    """While ``task`` runs, SIGTERM and the soft time limit cancel it.

    Python delivers a signal between two bytecodes, maybe inside the loop's
    own machinery: the handler only asks the loop to cancel the task. After
    a SIGTERM the previous handler is put back and the signal sent again,
    so the process ends as Celery's terminate expects.
    """
    fired: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield fired  # signals reach the main thread only
        return

    def cancel(signum: int, _frame: Any) -> None:
        fired.append(signum)
        loop.call_soon_threadsafe(task.cancel)

    wanted = [signal.SIGTERM] + ([_SOFT_TIMEOUT] if _SOFT_TIMEOUT is not None else [])
    previous = {signum: signal.signal(signum, cancel) for signum in wanted}
    try:
        yield fired
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if signal.SIGTERM in fired:
            os.kill(os.getpid(), signal.SIGTERM)


def _run_beside(coro: Coroutine[Any, Any, Any]) -> Any:
    from celery import current_task

    task = current_task._get_current_object()
    request = task.request if task is not None else None  # read here: the stack is per thread
    outcome: dict[str, Any] = {}

    def target() -> None:
        pushed = task is not None
        if pushed:
            # current_task and progress() read Celery's per-thread stacks,
            # which only celery._state names.
            from celery._state import _task_stack

            _task_stack.push(task)
            task.request_stack.push(request)
        try:
            outcome["value"] = _run_here(coro)
        except BaseException as exc:  # noqa: BLE001 (raised again in the caller's thread)
            outcome["error"] = exc
        finally:
            if pushed:
                task.request_stack.pop()
                _task_stack.pop()

    thread = threading.Thread(target=target, name="offload-aio", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
