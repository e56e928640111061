"""A version number that waiters in threads or on event loops wait on to change.

The dashboard's record of tasks (:mod:`offload.events`) and its poller of
workers (:mod:`offload.monitor`) each bump one when their data changes, and
the dashboard's live views wait on it instead of polling.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["Changes"]


class Changes:
    """A version number that waiters in threads or on event loops can wait to change."""

    def __init__(self) -> None:
        self.version = 0
        self._cond = threading.Condition()
        self._loops: list[tuple[Any, Any]] = []

    def bump(self) -> None:
        with self._cond:
            self.version += 1
            self._cond.notify_all()
            loops, self._loops = self._loops, []
        for loop, future in loops:
            try:
                loop.call_soon_threadsafe(_settle, future)
            except RuntimeError:  # that loop is closed: its waiter is gone
                pass

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the version differs from ``seen`` or ``timeout`` passes; the version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != seen, timeout)
            return self.version

    async def wait_async(self, seen: int, timeout: float) -> int:
        """:meth:`wait` for a coroutine: holds no thread."""
        import asyncio

        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self.version != seen:
                return self.version
            self._loops.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        return self.version


def _settle(future: Any) -> None:
    if not future.done():
        future.set_result(None)
