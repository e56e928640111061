"""``current_task`` and ``progress()``: what a running function sees of its task."""

from __future__ import annotations

import time
from typing import Any

from celery import current_task as _celery_current_task
from celery.local import Proxy

__all__ = ["current_task", "progress", "PROGRESS"]

#: The state a task is in while it reports progress.
PROGRESS = "PROGRESS"

#: The real Celery task running in this thread, or a falsy proxy outside one.
#:
#: ``current_task.update_state(state=..., meta=...)`` is Celery's own method,
#: so it works as Celery documents it; ``if current_task:`` is false when the
#: code runs outside a task (in a view, a test, a shell).
current_task: Any = Proxy(lambda: _celery_current_task._get_current_object())
"""The Celery task running now, falsy outside a task.

``current_task.update_state(state=..., meta=...)`` and ``current_task.request``
are Celery's own.

Examples:
    >>> from offload import current_task
    >>> bool(current_task)   # outside a task
    False
"""

# Progress is written to the result backend; a loop reporting every item would
# otherwise make one backend write per item. Intermediate reports closer than
# this are dropped; the final one (done == total) is always sent.
_MIN_INTERVAL = 0.05


def progress(done: float, total: float | None = None, *, message: str | None = None,
             **meta: Any) -> bool:
    """Report the running task's progress; a no-op outside a task.

    The task enters the ``PROGRESS`` state with ``meta`` holding ``current``,
    ``total``, ``percent`` and ``message`` plus any extra keyword arguments.
    The browser and ``Future.progress`` see the latest report.

    Parameters:
        done: how much is done.
        total: how much there is in all, if known.
        message: a short text for a person to read.

    Returns:
        True if the report was sent, False outside a task or when it was
        dropped because the previous one was less than 50 ms ago.

    Examples:
        >>> progress(1, 10)  # outside a task: nothing to report to
        False
    """
    task = _celery_current_task._get_current_object()
    if task is None or not getattr(task.request, "id", None):
        return False
    now = time.monotonic()
    final = total is not None and done >= total
    last = getattr(task.request, "_offload_progress_at", 0.0)
    if not final and now - last < _MIN_INTERVAL:
        return False
    task.request._offload_progress_at = now
    percent = round(100.0 * done / total, 2) if total else None
    task.update_state(state=PROGRESS, meta={
        "current": done, "total": total, "percent": percent, "message": message, **meta,
    })
    return True
