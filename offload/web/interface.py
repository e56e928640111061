"""What the web task API uses of an :class:`offload.Offload`: one Protocol for all its modules.

The routes (:mod:`offload.web.app`, :mod:`offload.web.dashboard`), the table
of exposed tasks (:mod:`offload.web.names`) and the waiters
(:mod:`offload.web.waiting`) take an :class:`OffloadLike`, so that none of
them imports the core to name a type, and what the web depends on is
written once. An ``Offload`` fits it as it is (``tests/typing/ok.py`` checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["HubLike", "OffloadLike"]


class HubLike(Protocol):
    """What the waiters use of the result hub (:class:`offload.hub.ResultHub`)."""

    def subscribe(self, task_id: str, listener: Any, *, grace: float = ...) -> Any: ...


class OffloadLike(Protocol):
    """What the web task API uses of an :class:`offload.Offload`."""

    @property
    def celery(self) -> Any:
        """The Celery app: tasks by name, results, revokes."""

    @property
    def hub(self) -> HubLike:
        """The result hub the waiters listen to."""

    @property
    def exposed_tasks(self) -> Mapping[str, Any]:
        """The ``expose=True`` tasks, by name."""

    @property
    def exposures(self) -> Any:
        """The marks of the calls the web may read (:class:`offload.exposure.Exposures`)."""

    @property
    def monitor(self) -> Any:
        """The dashboard's view of tasks and workers (:class:`offload.events.Monitor`)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Send a call; its :class:`offload.Future`."""

    def get(self, task_id: str) -> Any:
        """A :class:`offload.Future` of a task sent earlier."""
