"""One attempt of a Django task on a worker, and the record it keeps.

The worker's side of :mod:`offload.django.backend`: the Celery task that
:mod:`offload.django.runner` registers calls :func:`run_attempt`, which
sends Django's ``task_started`` and ``task_finished`` signals and keeps the
task's record (:mod:`offload.django.records`); the backend reads the same
record, through the helpers here, to build a ``TaskResult``.
"""

from __future__ import annotations

import datetime
import json
import traceback
from typing import Any

from celery import states

from . import _compat as fw
from .records import RecordStore

__all__ = ["run_attempt"]

_RUNNING_STATES = frozenset({states.STARTED, "PROGRESS", states.RETRY})


def _now() -> datetime.datetime:
    from django.utils import timezone

    return timezone.now()


def _parse_time(value: Any) -> datetime.datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        moment = value
    else:
        try:
            moment = datetime.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    from django.conf import settings

    if settings.USE_TZ and moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    elif not settings.USE_TZ and moment.tzinfo is not None:
        from django.utils import timezone

        moment = timezone.make_naive(moment)
    return moment


def _iso(moment: datetime.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _reference(task: Any) -> str:
    func = task.func
    return f"{func.__module__}:{func.__qualname__}"


def _class_path(exc: BaseException) -> str:
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}"


def _status(state: str, record: dict[str, Any]) -> Any:
    status = fw.TaskResultStatus
    if state == states.SUCCESS:
        return status.SUCCESSFUL
    if state in states.PROPAGATE_STATES:  # FAILURE, REVOKED
        return status.FAILED
    if state in _RUNNING_STATES or (record.get("started_at") and not record.get("finished_at")):
        return status.RUNNING
    return status.READY


def _new_result(**fields: Any) -> Any:
    """The framework's ``TaskResult``; fields a later Django adds (``metadata``) start empty."""
    for name in _EXTRA_RESULT_FIELDS:
        fields.setdefault(name, {})
    return fw.TaskResult(**fields)


def _extra_result_fields() -> tuple[str, ...]:
    import dataclasses

    known = {f.name for f in dataclasses.fields(fw.TaskResult) if f.init}
    return tuple(name for name in ("metadata", "raw_metadata") if name in known)


_EXTRA_RESULT_FIELDS = _extra_result_fields()


def _result(task: Any, task_id: str, status: Any, record: dict[str, Any], alias: str,
            errors: list[Any] | None = None, finished_at: Any = None) -> Any:
    return _new_result(
        task=task, id=task_id, status=status,
        enqueued_at=_parse_time(record.get("enqueued_at")),
        started_at=_parse_time(record.get("started_at")),
        finished_at=_parse_time(finished_at if finished_at is not None else record.get("finished_at")),
        last_attempted_at=_parse_time(record.get("last_attempted_at")),
        args=list(record.get("args", [])), kwargs=dict(record.get("kwargs", {})), backend=alias,
        errors=errors if errors is not None else [
            fw.TaskError(exception_class_path=e["exception_class_path"], traceback=e["traceback"])
            for e in record.get("errors", [])],
        worker_ids=list(record.get("worker_ids", [])),
    )


def _task_as_enqueued(task: Any, options: dict[str, Any]) -> Any:
    """The declared ``task`` with what ``.using()`` changed when it was enqueued."""
    changes: dict[str, Any] = {}
    if options.get("priority") is not None and options["priority"] != task.priority:
        changes["priority"] = options["priority"]
    if options.get("queue_name") and options["queue_name"] != task.queue_name:
        changes["queue_name"] = options["queue_name"]
    run_after = _parse_time(options.get("run_after"))
    if run_after is not None:
        changes["run_after"] = run_after
    if options.get("backend") and options["backend"] != task.backend:
        changes["backend"] = options["backend"]
    return task.using(**changes) if changes else task


def _normalize(task: Any, value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), as Django's backends store it."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the return value of {task.module_path} must be JSON-serializable "
                        f"(str, int, float, bool, None, list, dict): {exc}") from None


def run_attempt(off: Any, task: Any, request: Any, args: list[Any], kwargs: dict[str, Any],
                options: dict[str, Any]) -> Any:
    """Run one attempt of ``task`` on a worker, keeping its record (see :mod:`.records`)."""
    task = _task_as_enqueued(task, options)
    records = RecordStore(off.celery)
    task_id = request.id
    started = _now()
    record = records.read(task_id) or {"args": args, "kwargs": kwargs, "options": options}
    record.setdefault("started_at", _iso(started))
    record["last_attempted_at"] = _iso(started)
    record["worker_ids"] = [*record.get("worker_ids", []), str(request.hostname or "worker")]
    record.pop("finished_at", None)
    records.write(task_id, record)
    backend = task.get_backend()
    result = _result(task, task_id, fw.TaskResultStatus.RUNNING, record, task.backend)
    fw.task_started.send(sender=type(backend), task_result=result)
    try:
        if task.takes_context:
            value = task.call(fw.TaskContext(task_result=result), *args, **kwargs)
        else:
            value = task.call(*args, **kwargs)
        value = _normalize(task, value)
    except BaseException as exc:
        error = {"exception_class_path": _class_path(exc), "traceback": traceback.format_exc()}
        record = records.update(task_id, finished_at=_iso(_now()),
                                errors=[*record.get("errors", []), error])
        failed = _result(task, task_id, fw.TaskResultStatus.FAILED, record, task.backend)
        fw.task_finished.send(sender=type(backend), task_result=failed)
        raise
    record = records.update(task_id, finished_at=_iso(_now()))
    done = _result(task, task_id, fw.TaskResultStatus.SUCCESSFUL, record, task.backend)
    object.__setattr__(done, "_return_value", value)
    fw.task_finished.send(sender=type(backend), task_result=done)
    return value
