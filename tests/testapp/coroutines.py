"""``async def`` functions the suite sends to real workers (and eager mode)."""

from __future__ import annotations

import asyncio
import os

from offload import current_task, progress


async def loop_identity():
    """Which loop and process ran this call."""
    await asyncio.sleep(0)
    return [os.getpid(), id(asyncio.get_running_loop())]


async def add_later(x, y):
    await asyncio.sleep(0.01)
    return x + y


async def steps(n):
    """progress() and current_task from inside a coroutine."""
    for i in range(n):
        progress(i + 1, n, message="stepping")
        await asyncio.sleep(0.06)
    return [bool(current_task), current_task.request.id]


async def wait_for_cancel(started, cancelled):
    """Touch ``started``, sleep until cancelled; touch ``cancelled`` on CancelledError."""
    open(started, "w").close()
    try:
        await asyncio.sleep(120)
    except asyncio.CancelledError:
        open(cancelled, "w").close()
        raise
    return "not cancelled"


async def report_and_wait(gate, value):
    """Report progress, wait (on the loop) for ``gate``; ``[value, the task id this call ran as]``."""
    progress(value, 10, message=f"call {value}")
    while not os.path.exists(gate):
        await asyncio.sleep(0.01)
    return [value, current_task.request.id]
