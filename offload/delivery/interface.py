"""What a delivery strategy uses of the result hub, and what the hub uses of a strategy.

The hub (:class:`offload.hub.ResultHub`) keeps the followed ids and their
listeners; a strategy runs in the hub's thread and feeds it the states it
reads from one kind of result backend. They meet only through these two
protocols.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["Hub", "Strategy", "Wakeup"]


class Wakeup(threading.Event):
    """The hub's wake-up: an event that also pokes the strategy's own sleeper.

    A strategy that sleeps on a socket (the embedded backend's writers poke
    one) attaches that socket's poke: :meth:`set` then wakes it there too,
    so one thread sleeps on both, with no thread between them.
    """

    _poke: Callable[[], None] | None = None

    def attach(self, poke: Callable[[], None] | None) -> None:
        """Call ``poke`` at each :meth:`set` from now on (None: stop)."""
        self._poke = poke

    def set(self) -> None:
        super().set()
        poke = self._poke
        if poke is not None:
            poke()


class Hub(Protocol):
    """The result hub as a strategy sees it."""

    #: Set when there is something new to follow (or after a reconnection);
    #: a strategy waits on it while idle and clears it.
    wakeup: Wakeup

    @property
    def watched(self) -> Mapping[str, Any]:
        """The ids followed now, for membership tests without the lock."""
        ...

    def take_new(self) -> list[str]:
        """The ids subscribed since the last call."""
        ...

    def ids(self) -> list[str]:
        """Every id followed now."""
        ...

    def deliver(self, task_id: str, meta: dict[str, Any] | None) -> bool:
        """Hand over a stored meta; True when it is news."""
        ...

    def deliver_many(self, metas: list[tuple[str, dict[str, Any] | None]]) -> int:
        """:meth:`deliver` for many, under one lock; how many were news."""
        ...

    def answered(self) -> None:
        """The backend answered (after an outage: the hub logs its end, once)."""
        ...

    def count_read(self) -> None:
        """Count one read of the backend."""
        ...

    def housekeeping(self) -> None:
        """Give up on ids with no news for too long (cheap: call it often)."""
        ...


class Strategy(Protocol):
    """How the hub hears of one kind of result backend."""

    backend: Any

    def submit_options(self) -> dict[str, Any]:
        """Options for ``apply_async`` so that this strategy hears of the task (its id, ``reply_to``)."""
        ...

    def needs_wakeup(self, task_ids: list[str]) -> bool:
        """Whether :meth:`run` must be woken to follow these newly subscribed ids."""
        ...

    def reset(self) -> None:
        """Drop the connection after an error; :meth:`run` makes a new one."""
        ...

    def run(self, hub: Hub) -> None:
        """Deliver states to ``hub`` until an error (the hub then resets and runs again)."""
        ...
