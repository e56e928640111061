"""What Django's ``TaskResult`` knows beyond Celery's result, kept beside it.

Celery's result holds a task's state, return value and traceback; Django's
``TaskResult`` also has the task's path and arguments, ``enqueued_at``,
``started_at``, ``last_attempted_at``, ``finished_at``, the ids of the workers
that ran it and each attempt's error. One JSON record per task holds those,
in the same result store (one more key, ``offload-django-<id>``), so that any
process reads both. The record is written when the task is sent (which is
also what tells an id that was enqueued from one that was not), when an
attempt starts and when it ends.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["RecordStore", "UnsupportedResultBackend"]

#: The key prefix of a record in the result store.
PREFIX = "offload-django-"


class UnsupportedResultBackend(TypeError):
    """The result backend cannot hold records (it is not a key-value store)."""


class RecordStore:
    """Read and write task records in ``celery_app``'s result backend.

    Raises:
        UnsupportedResultBackend: for a backend without ``get``/``set`` of
            keys (rpc://, a SQL database backend): use the embedded default,
            Redis, or another key-value backend.
    """

    def __init__(self, celery_app: Any) -> None:
        self._app = celery_app

    @property
    def backend(self) -> Any:
        backend = self._app.backend
        if not (hasattr(backend, "get") and hasattr(backend, "set") and hasattr(backend, "mget")):
            raise UnsupportedResultBackend(
                f"offload.django.TaskBackend keeps each task's record in the result backend, "
                f"which must be a key-value store: {type(backend).__name__} is not. Leave "
                "CELERY_RESULT_BACKEND unset (the embedded store) or use redis://")
        return backend

    def read(self, task_id: str) -> dict[str, Any] | None:
        raw = self.backend.get(PREFIX + task_id)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def write(self, task_id: str, record: dict[str, Any]) -> None:
        self.backend.set(PREFIX + task_id, json.dumps(record, separators=(",", ":")))

    def forget(self, task_id: str) -> None:
        """Delete a record (of a task that could not be sent)."""
        try:
            self.backend.delete(PREFIX + task_id)
        except Exception:  # the store that refused the send may refuse this too
            pass

    def update(self, task_id: str, **changes: Any) -> dict[str, Any]:
        """Read, change and write back a record (one writer at a time: the worker running it)."""
        record = self.read(task_id) or {}
        record.update(changes)
        self.write(task_id, record)
        return record
