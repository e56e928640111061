"""One name for each piece of Django's Tasks framework, wherever it lives.

Django 6 ships it as ``django.tasks``; on Django 4.2 and 5.2 the
``django-tasks`` package is its backport, with the same API under
``django_tasks`` (and ``InvalidTaskError`` for Django's ``InvalidTask``).
``django.tasks`` wins where both exist: it is the one Django's own docs use.
"""

from __future__ import annotations

try:  # Django >= 6.0
    from django.tasks import DEFAULT_TASK_QUEUE_NAME, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import (DEFAULT_TASK_PRIORITY, TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, Task,
                                   TaskContext, TaskError, TaskResult, TaskResultStatus)
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started

    FRAMEWORK = "django.tasks"
except ImportError:  # the backport
    try:
        from django_tasks import DEFAULT_TASK_QUEUE_NAME, task_backends
        from django_tasks.backends.base import BaseTaskBackend
        from django_tasks.base import (DEFAULT_TASK_PRIORITY, TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, Task,
                                       TaskContext, TaskError, TaskResult, TaskResultStatus)
        from django_tasks.exceptions import InvalidTaskError as InvalidTask
        from django_tasks.exceptions import TaskResultDoesNotExist
        from django_tasks.signals import task_enqueued, task_finished, task_started
    except ImportError as exc:
        raise ImportError(
            "offload.django.TaskBackend needs Django's Tasks framework: Django >= 6, or on "
            "older Django the django-tasks package (pip install 'offload[django]')") from exc

    FRAMEWORK = "django_tasks"

__all__ = [
    "DEFAULT_TASK_PRIORITY", "DEFAULT_TASK_QUEUE_NAME", "FRAMEWORK", "TASK_MAX_PRIORITY", "TASK_MIN_PRIORITY",
    "BaseTaskBackend", "InvalidTask", "Task", "TaskContext", "TaskError", "TaskResult",
    "TaskResultDoesNotExist", "TaskResultStatus", "task_backends", "task_enqueued", "task_finished",
    "task_started",
]
