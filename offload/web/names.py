"""Exposed tasks by short name, and their arguments checked before anything is queued.

A task declared with ``@off.task(expose=True)`` is reachable over HTTP by its
*short name*: the ``name=`` given to ``@off.task``, else the function's own
name (``add`` for ``myapp.tasks.add``). Its full Celery name is accepted too.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from ..core import exposed_name as short_name
from ..exceptions import ConfigurationError
from .interface import OffloadLike
from .schema import matches, schema_of

__all__ = ["ArgumentsError", "ExposedTasks", "short_name"]


class ArgumentsError(TypeError):
    """The arguments do not fit the task's signature; the message shows it."""


def signature_of(task: Any) -> inspect.Signature | None:
    """The signature a caller must fit (``self`` of a bound task left out)."""
    try:
        return inspect.signature(task.run, eval_str=True)
    except (NameError, SyntaxError):  # a hint naming what this module cannot see
        pass
    except (TypeError, ValueError):
        return None
    try:
        return inspect.signature(task.run)
    except (TypeError, ValueError):
        return None


class ExposedTasks:
    """The table of exposed tasks of one Offload, kept in step with it.

    Tasks may be declared after the table is made (in a module imported
    later); the table is rebuilt whenever the set of exposed tasks changes.

    Raises:
        ConfigurationError: two exposed tasks share one short name.
    """

    def __init__(self, off: OffloadLike) -> None:
        self._off = off
        self._known: frozenset[str] = frozenset()
        self._by_name: dict[str, Any] = {}
        self._short: dict[str, str] = {}
        # Signatures are read once per task: reading one may compile its
        # string annotations, work not to repeat on every request.
        self._signatures: dict[str, inspect.Signature | None] = {}
        self.refresh()

    def refresh(self) -> None:
        tasks = dict(self._off.exposed_tasks)
        if frozenset(tasks) == self._known:
            return
        by_short: dict[str, Any] = {}
        for full, task in sorted(tasks.items()):
            short = short_name(task, self._off.celery)
            other = by_short.get(short) or (tasks.get(short) if short != full else None)
            if other is not None and other is not task:
                raise ConfigurationError(
                    f"two exposed tasks answer to the name {short!r} over HTTP: {other.name!r} "
                    f"and {full!r}. Give one of them another name with "
                    f"@off.task(name=..., expose=True)."
                )
            by_short[short] = task
        self._by_name = {**tasks, **by_short}
        self._signatures = {}
        self._short = {task.name: short for short, task in by_short.items()}
        self._known = frozenset(tasks)

    def find(self, name: str) -> Any | None:
        """The exposed task called ``name`` (short or full), or None."""
        self.refresh()
        return self._by_name.get(name)

    def short(self, task: Any) -> str:
        return self._short.get(task.name, task.name)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """``(short name, task)`` pairs, sorted by short name."""
        self.refresh()
        return iter(sorted(((s, self._by_name[s]) for s in self._short.values())))

    @property
    def version(self) -> frozenset[str]:
        """Changes whenever the set of exposed tasks does (to cache what depends on it)."""
        self.refresh()
        return self._known

    def signature(self, task: Any) -> inspect.Signature | None:
        """The task's signature, read once."""
        if task.name not in self._signatures:
            self._signatures[task.name] = signature_of(task)
        return self._signatures[task.name]

    def check_arguments(self, task: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Raise :class:`ArgumentsError` (with the signature) when the call cannot bind."""
        sig = self.signature(task)
        if sig is None:
            return
        shown = f"{self.short(task)}{sig}"
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise ArgumentsError(f"{exc}: the task is {shown}") from None
        # The JSON types the type hints promise (and openapi.json publishes).
        for name, value in bound.arguments.items():
            param = sig.parameters[name]
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            schema = schema_of(param.annotation)
            if schema and not matches(value, schema):
                raise ArgumentsError(f"argument {name!r} does not fit its type hint: the task is {shown}")
        if "queue" in kwargs:
            # offload.submit reserves queue= for routing.
            raise ArgumentsError(f"an argument named 'queue' cannot be passed over HTTP: the task is {shown}")
