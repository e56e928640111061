"""Which tasks the web task API may show: a mark stored with each such task.

A task id leaks easily (a log line, a URL, a dashboard), so the web task API
(:mod:`offload.web`) answers only for tasks that were meant to be followed
over HTTP: tasks of ``@off.task(expose=True)`` and calls sent with
``off.options(expose=True)`` (a view that starts work for the browser to
follow). A result backend keeps no task's name before the task runs, so the
mark is stored beside the task's result, under a key of its own, when the
task is sent: any web process reading that backend finds it, and it expires
with the results. On rpc:// (nothing stored) only the sending process knows.

The mark also carries the exception types whose message a client may read
(``public_errors``; :class:`offload.TaskError` always may).
"""

from __future__ import annotations

import collections
import json
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["KEY_PREFIX", "Exposure", "Exposures", "type_name"]

#: The key (or, on a backend without keys, the id) a mark is stored under, before the task id.
KEY_PREFIX = "offload-exposed-"
#: Marks remembered in-process (the latest ones), so a long-poll's repeats read nothing.
_REMEMBERED = 10_000
#: Keys read in one request by :meth:`Exposures.find_many`.
_READ_AT_ONCE = 1_000


def type_name(cls: type) -> str:
    """``module:QualName`` of an exception type, as a mark stores it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> type | None:
    """The type ``module:QualName`` names, from modules already imported (never an import)."""
    module, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


@dataclass(frozen=True)
class Exposure:
    """What the mark of one task says: its name, and the error types it shows."""

    name: str
    public_errors: tuple[str, ...] = ()

    def is_public(self, exc: BaseException) -> bool:
        """Whether a client may read ``exc``'s type and message."""
        from .exceptions import TaskError

        if isinstance(exc, TaskError):
            return True
        types = tuple(t for t in map(_resolve, self.public_errors) if t is not None)
        return bool(types) and isinstance(exc, types)

    def encode(self) -> str:
        return json.dumps({"name": self.name, "public_errors": list(self.public_errors)})

    @classmethod
    def decode(cls, raw: Any) -> Exposure | None:
        try:
            data = json.loads(raw)
            return cls(str(data["name"]), tuple(str(t) for t in data.get("public_errors") or ()))
        except (TypeError, ValueError, KeyError):
            return None


class Exposures:
    """The marks of one Offload's result backend.

    Parameters:
        backend_factory: returns the current Celery result backend.
    """

    def __init__(self, backend_factory: Callable[[], Any]) -> None:
        self._backend_factory = backend_factory
        self._lock = threading.Lock()
        self._known: collections.OrderedDict[str, Exposure] = collections.OrderedDict()

    def mark(self, task_ids: Sequence[str], name: str, public_errors: Iterable[type] = ()) -> None:
        """Record that ``task_ids`` (of task ``name``) may be shown over HTTP.

        Called before the tasks are sent, so no client ever holds an id
        whose mark is not yet readable. Raises what the backend raises when
        it cannot be written.
        """
        exposure = Exposure(name, tuple(type_name(t) for t in public_errors))
        value = exposure.encode()
        backend = self._backend_factory()
        kind = _kind(backend)
        if kind == "keys":
            items = [(KEY_PREFIX + task_id, value) for task_id in task_ids]
            set_many = getattr(backend, "set_many", None)
            if set_many is not None and len(items) > 1:
                set_many(items)
            else:
                for key, item in items:
                    backend.set(key, item)
        elif kind == "results":
            for task_id in task_ids:
                backend.store_result(KEY_PREFIX + task_id, value, "SUCCESS")
        self._remember(task_ids, exposure)

    def known(self, task_id: str) -> Exposure | None:
        """The mark of ``task_id`` if this process has seen it lately (reads nothing)."""
        with self._lock:
            return self._known.get(task_id)

    def find(self, task_id: str) -> Exposure | None:
        """The mark of ``task_id``, or None when it has none (blocks on the backend)."""
        with self._lock:
            known = self._known.get(task_id)
        if known is not None:
            return known
        backend = self._backend_factory()
        kind = _kind(backend)
        raw = None
        if kind == "keys":
            raw = backend.get(KEY_PREFIX + task_id)
        elif kind == "results":
            meta = backend.get_task_meta(KEY_PREFIX + task_id)
            raw = meta.get("result") if meta.get("status") == "SUCCESS" else None
        exposure = Exposure.decode(raw) if raw else None
        if exposure is not None:
            self._remember((task_id,), exposure)
        return exposure

    def find_many(self, task_ids: Sequence[str]) -> dict[str, Exposure | None]:
        """:meth:`find` for many ids: one read of the backend where it can read many keys at once."""
        found: dict[str, Exposure | None] = {}
        missing: list[str] = []
        with self._lock:
            for task_id in task_ids:
                known = self._known.get(task_id)
                if known is not None:
                    found[task_id] = known
                else:
                    missing.append(task_id)
        if not missing:
            return found
        backend = self._backend_factory()
        raws: list[Any] | None = None
        if _kind(backend) == "keys" and len(missing) > 1:
            try:
                raws = []
                for start in range(0, len(missing), _READ_AT_ONCE):
                    raws.extend(backend.mget([KEY_PREFIX + task_id for task_id in missing[start:start + _READ_AT_ONCE]]))
            except NotImplementedError:  # a key-value backend that reads one key at a time
                raws = None
        if raws is None:
            for task_id in missing:
                found[task_id] = self.find(task_id)
            return found
        read = [(task_id, Exposure.decode(raw) if raw else None) for task_id, raw in zip(missing, raws)]
        for task_id, exposure in read:
            found[task_id] = exposure
            if exposure is not None:
                self._remember((task_id,), exposure)
        return found

    def _remember(self, task_ids: Iterable[str], exposure: Exposure) -> None:
        with self._lock:
            for task_id in task_ids:
                self._known[task_id] = exposure
                self._known.move_to_end(task_id)
            while len(self._known) > _REMEMBERED:
                self._known.popitem(last=False)


def _kind(backend: Any) -> str:
    """How marks are kept: ``keys`` (a key-value backend), ``results`` (as a result), ``memory``."""
    from celery.backends.base import DisabledBackend, KeyValueStoreBackend
    from celery.backends.rpc import RPCBackend

    if isinstance(backend, KeyValueStoreBackend):
        return "keys"
    if isinstance(backend, (RPCBackend, DisabledBackend)):
        return "memory"
    return "results"
