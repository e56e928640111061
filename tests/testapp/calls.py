"""Functions the executor and map tests send to real workers.

``gated`` holds a worker until a file appears, so a test can keep calls
running or queued for as long as it needs without timing anything.
"""

from __future__ import annotations

import os
import time


def capture(*args, **kwargs):
    return [list(args), kwargs]


def power(x, y):
    return x**y


def quotient(x, y):
    return divmod(x, y)


def gated(gate, value=None, timeout=120.0):
    """Wait (in the worker) until the file ``gate`` exists, then return ``value``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.01)
    return value


def mark(directory, name, value=None):
    """Record that call ``name`` ran (a file in ``directory``); return ``value``."""
    with open(os.path.join(directory, str(name)), "w"):
        pass
    return value


def make_object(index):
    return {"index": index, "payload": "x" * 64}


def unsendable(x):
    """A result JSON cannot carry (a set) for even ``x``."""
    return {x} if x % 2 == 0 else x


def report_and_wait(gate, value):
    """Report progress, wait for ``gate``; ``[value, the task id this call ran as]``."""
    from offload import current_task, progress

    progress(value, 10, message=f"call {value}")
    gated(gate)
    return [value, current_task.request.id]
