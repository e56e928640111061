import json

from django.db import transaction
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from . import tasks
from .models import Note


@csrf_exempt
def enqueue(request, name):
    body = json.loads(request.body or b"{}")
    task = getattr(tasks, name)
    if body.get("run_after"):
        import datetime

        from django.utils import timezone

        task = task.using(run_after=timezone.now() + datetime.timedelta(seconds=body["run_after"]))
    result = task.enqueue(*body.get("args", []))
    return JsonResponse({"id": result.id, "status": str(result.status)}, status=202)


def result(request, result_id):
    # The task is named by the caller; get_result reads from the result store.
    try:
        from django.tasks import default_task_backend
    except ImportError:
        from django_tasks import default_task_backend

    found = default_task_backend.get_result(result_id)
    data = {"id": found.id, "status": str(found.status), "worker_ids": found.worker_ids,
            "errors": [{"exception_class_path": e.exception_class_path, "traceback": e.traceback}
                       for e in found.errors],
            "enqueued_at": found.enqueued_at and found.enqueued_at.isoformat(),
            "started_at": found.started_at and found.started_at.isoformat(),
            "finished_at": found.finished_at and found.finished_at.isoformat(),
            "task": found.task.module_path}
    if found.status == "SUCCESSFUL":
        data["return_value"] = found.return_value
    return JsonResponse(data)


@csrf_exempt
def note_then_rollback(request):
    """A note and a task in one transaction that rolls back: neither may survive."""

    sent = {}
    try:
        with transaction.atomic():
            Note.objects.create(text="rolled back")
            sent["id"] = tasks.count_notes.using(backend="on_commit").enqueue().id
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    with transaction.atomic():
        Note.objects.create(text="committed")
        sent["committed_id"] = tasks.count_notes.using(backend="on_commit").enqueue().id
    return JsonResponse(sent)
