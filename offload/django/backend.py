"""``offload.django.TaskBackend``: Django's Tasks framework on offload's workers.

::

    TASKS = {"default": {"BACKEND": "offload.django.TaskBackend"}}

    @task
    def send_welcome(user_id): ...

    result = send_welcome.enqueue(user.pk)      # runs on `manage.py offload worker`
    send_welcome.get_result(result.id).status   # from any process

One class serves ``django.tasks`` (Django 6) and the ``django_tasks``
backport (Django 4.2/5.2): see :mod:`offload.django._compat`.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import states

from ..core import CONNECTION_ERRORS
from ..exceptions import NotAllowedError, result_store_unreachable
from ..ids import is_task_id
from . import _compat as fw
from .attempt import _class_path, _iso, _new_result, _now, _reference, _result, _status, _task_as_enqueued
from .records import RecordStore, UnsupportedResultBackend
from .runner import RUN_TASK, resolve_task

__all__ = ["TaskBackend"]

#: kombu's priorities run 0..9.
_LEVELS = 9

class TaskBackend(fw.BaseTaskBackend):
    """Run Django's tasks on offload's workers (``manage.py offload worker``).

    ``TASKS = {"default": {"BACKEND": "offload.django.TaskBackend"}}``, with
    the broker and result store of the project's offload settings (the
    embedded one under ``BASE_DIR/instance`` when none is set).

    ``QUEUES``: the queue names tasks may use (Django's default: only
    ``"default"``, which is offload's default queue). ``OPTIONS``:
    ``{"enqueue_on_commit": True}`` sends a task only once the current
    transaction commits, and never if it rolls back; ``{"expose": True}``
    lets the web task API (``offload.django.urls``, ``offload.js``) show the
    tasks by their id, for a page that follows what its view enqueued.

    Supported: ``priority`` (-100..100, mapped onto the broker's 0..9),
    ``run_after``, ``takes_context``, ``async def`` tasks, ``get_result`` from
    any process. What cannot run raises the framework's ``InvalidTask``.
    """

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        options = dict(self.options or {})
        unknown = set(options) - {"enqueue_on_commit", "expose"}
        if unknown:
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                f"TASKS[{alias!r}]['OPTIONS'] has unknown option(s) {sorted(unknown)}; "
                "offload.django.TaskBackend knows 'enqueue_on_commit' and 'expose'")
        self.enqueue_on_commit = bool(options.get("enqueue_on_commit", False))
        #: Whether the web task API (offload.django.urls) shows these tasks
        #: by their id: a page follows a task its view enqueued.
        self.expose = bool(options.get("expose", False))

    @property
    def offload(self) -> Any:
        """The project's Offload (:func:`offload.django.get_offload`)."""
        from .project import get_offload

        return get_offload()

    def validate_task(self, task: Any) -> None:
        super().validate_task(task)
        if task.func.__module__ == "__main__":
            raise fw.InvalidTask(
                f"{task.name!r} is defined in the script being run (__main__), which a worker "
                "cannot import; define tasks in a module of an installed app (myapp/tasks.py)")

    # Sending ------------------------------------------------------------------

    def celery_queue(self, queue_name: str) -> str:
        """The broker queue of Django's ``queue_name`` ("default" is offload's default queue)."""
        if queue_name == fw.DEFAULT_TASK_QUEUE_NAME:
            return str(self.offload.celery.conf.task_default_queue)
        return queue_name

    def celery_priority(self, priority: int) -> int:
        """Django's -100..100 (higher first) as the broker's 0..9.

        kombu's Redis transports take 0 first; the embedded broker and
        RabbitMQ take 9 first.
        """
        span = fw.TASK_MAX_PRIORITY - fw.TASK_MIN_PRIORITY
        level = int((priority - fw.TASK_MIN_PRIORITY) * _LEVELS / span + 0.5)
        scheme = str(self.offload.celery.conf.broker_url or "").partition("://")[0]
        transport = str(self.offload.celery.conf.broker_transport or "")
        if scheme in ("redis", "rediss") or "redis" in transport:
            return _LEVELS - level
        return level

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Send ``task(*args, **kwargs)`` to a worker; its ``TaskResult`` (READY)."""
        self.validate_task(task)
        off = self.offload
        records = RecordStore(off.celery)
        try:
            records.backend  # noqa: B018 (reading it checks the result backend)
        except UnsupportedResultBackend as exc:
            raise fw.InvalidTask(str(exc)) from None
        task_id = str(uuid.uuid4())
        result = _new_result(
            task=task, id=task_id, status=fw.TaskResultStatus.READY, enqueued_at=None, started_at=None,
            finished_at=None, last_attempted_at=None, args=list(args), kwargs=dict(kwargs),
            backend=self.alias, errors=[], worker_ids=[])
        options = {"priority": task.priority, "queue_name": task.queue_name, "backend": self.alias,
                   "run_after": _iso(task.run_after)}
        send_options: dict[str, Any] = {"task_id": task_id, "queue": self.celery_queue(task.queue_name),
                                        "priority": self.celery_priority(task.priority)}
        if task.run_after is not None:
            send_options["eta"] = task.run_after
        runner = off.celery.tasks[RUN_TASK]

        def send() -> None:
            enqueued = _now()
            object.__setattr__(result, "enqueued_at", enqueued)
            # The record first: a worker fast enough to finish before this
            # returns finds it, and an id without one was never enqueued.
            try:
                records.write(task_id, {"ref": _reference(task), "args": result.args, "kwargs": result.kwargs,
                                        "options": options, "enqueued_at": _iso(enqueued)})
            except CONNECTION_ERRORS as exc:
                raise result_store_unreachable(off.celery, exc, f"enqueue {task.module_path}") from exc
            try:
                if self.expose:
                    try:
                        off.exposures.mark([task_id], task.module_path)
                    except CONNECTION_ERRORS as exc:
                        raise result_store_unreachable(off.celery, exc, f"enqueue {task.module_path}") from exc
                off.options(**send_options).submit(runner, _reference(task), result.args, result.kwargs, options)
            except BaseException:
                records.forget(task_id)  # not sent: no id that reads as enqueued
                raise
            fw.task_enqueued.send(sender=type(self), task_result=result)

        if self.enqueue_on_commit:
            from django.db import transaction

            transaction.on_commit(send, robust=True)
        else:
            send()
        return result

    # Reading ------------------------------------------------------------------

    def get_result(self, result_id: str) -> Any:
        """The ``TaskResult`` of ``result_id``, read from the result store (any process).

        Raises:
            TaskResultDoesNotExist: no task was enqueued (and committed) under this id.
        """
        if not is_task_id(result_id):
            raise fw.TaskResultDoesNotExist(repr(result_id)[:80])
        off = self.offload
        try:
            record = RecordStore(off.celery).read(result_id)
        except UnsupportedResultBackend as exc:
            raise fw.TaskResultDoesNotExist(str(exc)) from None
        if record is None or "ref" not in record:
            raise fw.TaskResultDoesNotExist(result_id)
        options = record.get("options") or {}
        try:
            task = _task_as_enqueued(resolve_task(record["ref"]), options)
        except NotAllowedError as exc:
            raise fw.TaskResultDoesNotExist(f"{result_id}: {exc}") from None
        meta = off.celery.backend.get_task_meta(result_id)
        state = meta.get("status", states.PENDING)
        status = _status(state, record)
        errors = None
        if status == fw.TaskResultStatus.FAILED and not record.get("errors"):
            # Failed before the task's own code ran (refused, revoked, a
            # worker lost): Celery's exception is all there is.
            raised = meta.get("result")
            path = _class_path(raised) if isinstance(raised, BaseException) else "builtins.Exception"
            errors = [fw.TaskError(exception_class_path=path,
                                   traceback=str(meta.get("traceback") or raised or ""))]
        finished = record.get("finished_at") or (meta.get("date_done") if status in (
            fw.TaskResultStatus.SUCCESSFUL, fw.TaskResultStatus.FAILED) else None)
        result = _result(task, result_id, status, record, options.get("backend") or self.alias,
                         errors=errors, finished_at=finished)
        if status == fw.TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", meta.get("result"))
        return result

    def check(self, **kwargs: Any) -> Any:
        from django.core import checks

        try:
            RecordStore(self.offload.celery).backend  # noqa: B018 (reading it checks the result backend)
        except UnsupportedResultBackend as exc:
            yield checks.Error(str(exc), id="offload.E001")
