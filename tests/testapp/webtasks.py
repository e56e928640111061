"""Exposed tasks for the web task API's tests (offload.web), on their own queue.

``python -m celery -A testapp.on_web_embedded worker`` serves them; the
test process builds the same Offload with :func:`make`.
"""

from __future__ import annotations

import threading
import time

from offload import Offload, TaskError, progress
from testapp import settings


def make(kind: str, expose: tuple[str, ...] | None = None) -> Offload:
    """The tests' Offload on ``kind``; ``expose`` limits the exposed tasks (by short name)."""
    config = dict(settings(kind))
    config["CELERY_TASK_DEFAULT_QUEUE"] += "-web"
    config["CELERY_CONTROL_EXCHANGE"] += "-web"
    off = Offload(config)
    tasks = {"add": add, "fail": fail, "slow": slow, "steps": steps, "echo": echo_text,
             "wait_for_file": wait_for_file, "leak": leak, "refuse": refuse, "non_finite": non_finite,
             "nothing": nothing}
    for short, fn in tasks.items():
        shown = expose is None or short in expose
        public = (ValueError,) if short == "fail" else ()
        off.task(name="echo" if short == "echo" else None, expose=shown, public_errors=public)(fn)
    off.task(private_mul)  # registered, never exposed
    off.task(secret_probe)  # the server's own, never exposed
    off.task(mask_args=True)(sign)  # its arguments never shown on the dashboard
    return off


def add(x: int, y: int = 0) -> int:
    """Add two integers."""
    return x + y


def fail(message: str) -> None:
    """Raise ValueError(message)."""
    raise ValueError(message)


def slow(seconds: float, value: str = "done") -> str:
    """Sleep, then answer ``value``."""
    time.sleep(seconds)
    return value


def steps(n: int, pause: float = 0.05) -> int:
    """Report progress n times."""
    for i in range(n):
        progress(i + 1, n, message=f"step {i + 1} of {n}")
        time.sleep(pause)
    return n


def echo_text(text: str, *, times: int = 1) -> str:
    """The seed's echo."""
    return text * times


def wait_for_file(path: str, timeout: float = 60.0) -> str:
    """Report progress, then wait until ``path`` exists (the test decides when the task ends)."""
    import os

    progress(1, 2, message="waiting")
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not os.path.exists(path) and time.monotonic() < deadline:
        event.wait(0.02)
    return "released" if os.path.exists(path) else "timed out"


def private_mul(x, y):
    return x * y


def leak(text: str) -> None:
    """Fail with a message a client must not read (not a public error type)."""
    raise RuntimeError(f"could not connect to postgresql://app:{text}@db.internal/app")


class OutOfStock(TaskError):
    """A failure meant for the client to read."""


def refuse(item: str) -> None:
    """Fail with an offload.TaskError subclass."""
    raise OutOfStock(f"{item} is sold out")


def non_finite(kind: str, where: str = "result") -> object:
    """A result (or progress) holding NaN or an infinity."""
    value = float(kind)
    if where == "progress":
        progress(1, 2, message="odd", extra=value)
        time.sleep(0.5)
        return "done"
    return {"values": [1.0, value]}


def nothing() -> str:
    """A task without parameters."""
    return "nothing"


def secret_probe() -> str:
    """A task the server submits for itself; its result must not be readable over HTTP."""
    return "api-key-0123456789"


def sign(secret: str, text: str) -> str:
    """A task whose arguments are secret (``mask_args=True``)."""
    return f"signed {len(text)} characters"
