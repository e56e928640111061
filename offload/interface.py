"""What the rest of offload uses of an :class:`offload.Offload`: the one Protocol that says so.

The web task API (:mod:`offload.web`), error reporting (:mod:`offload.errors`),
the periodic-task scheduler (:mod:`offload.beat`) and the Flask integration
(:mod:`offload.flask`) take an :class:`OffloadLike` rather than an
``Offload``, so that none of them imports the core to name a type (the core
imports some of them) and what they depend on is written once, here. Each
member says who uses it. An ``Offload`` fits it as it is: ``tests/typing/ok.py``
assigns one to an ``OffloadLike``, so ``mypy`` fails when the two drift apart.

This module imports no framework and nothing of Celery.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from .frameworks import AppHooks

__all__ = ["HubLike", "OffloadLike"]


class HubLike(Protocol):
    """What the web's waiters use of the result hub (:class:`offload.hub.ResultHub`)."""

    def subscribe(self, task_id: str, listener: Any, *, grace: float = ...) -> Any: ...


class OffloadLike(Protocol):
    """What offload's integrations and services use of an :class:`offload.Offload`."""

    #: The web app the Offload was configured from, as the core sees it
    #: (:class:`offload.frameworks.AppHooks`); the Flask integration sets it.
    app_hooks: AppHooks | None

    @property
    def celery(self) -> Any:
        """The Celery app: tasks by name, results, revokes, beat, worker steps (all)."""

    @property
    def settings(self) -> Any:
        """The settings in force (:class:`offload.config.Settings`): the data folder (errors, beat)."""

    @property
    def import_name(self) -> str:
        """The module that made the Offload: the name error reports give the app."""

    @property
    def workers(self) -> Any:
        """The worker processes this Offload starts (:class:`offload.workers.Workers`): beat runs beside them."""

    @property
    def hub(self) -> HubLike:
        """The result hub the web's waiters listen to."""

    @property
    def exposed_tasks(self) -> Mapping[str, Any]:
        """The ``expose=True`` tasks, by name (web)."""

    @property
    def exposures(self) -> Any:
        """The marks of the calls the web may read (:class:`offload.exposure.Exposures`)."""

    @property
    def monitor(self) -> Any:
        """The dashboard's view of tasks and workers (:class:`offload.events.Monitor`)."""

    def configure(self, config: Mapping[str, Any] | None, *, default_data_dir: str | None = None) -> None:
        """Take settings from ``config`` (Flask: the app's config)."""

    def add_task_context(self, factory: Callable[[], AbstractContextManager[Any]]) -> None:
        """Run every task inside ``factory()`` (Flask: the app context)."""

    def remove_task_context(self, factory: Callable[[], AbstractContextManager[Any]]) -> None:
        """Stop running tasks inside ``factory()`` (Flask: a previous app's context)."""

    def add_commit_hook(self, hook: Callable[[Callable[[], None]], bool]) -> None:
        """Let ``hook`` defer ``on_commit=True`` sends to a transaction's commit (Flask-SQLAlchemy)."""

    def task(self, fn: Any = None, /, **options: Any) -> Any:
        """Register a task, as ``@off.task(...)`` (errors: its delivery tasks)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Send a call; its :class:`offload.Future` (web)."""

    def get(self, task_id: str) -> Any:
        """A :class:`offload.Future` of a task sent earlier (web)."""
