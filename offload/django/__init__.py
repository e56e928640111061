"""Django integration: ``INSTALLED_APPS += ["offload.django"]``.

* settings from ``django.conf.settings`` (``CELERY_*`` and ``OFFLOAD_*``,
  every spelling offload accepts; :mod:`offload.django.conf`), the embedded
  broker under ``BASE_DIR/instance`` when no broker is set;
* ``manage.py offload worker|cluster|status|inspect|flower|...``: the
  ``offload`` command for this project; workers run with Django set up and
  handle database connections around each task as Django does around a
  request;
* ``TASKS = {"default": {"BACKEND": "offload.django.TaskBackend"}}``:
  Django's Tasks framework on offload (:mod:`offload.django.backend`);
* ``path("offload/", include("offload.django.urls"))``: the web task API
  (:mod:`offload.django.views`);
* ``get_offload().submit(fn, ..., on_commit=True)``: offload's own API.
"""

from __future__ import annotations

from typing import Any

# Made and kept in offload.django.project, which the backend imports (this package imports the backend).
from .project import APP_LABEL as APP_LABEL, get_offload

__all__ = ["TaskBackend", "get_offload"]


def __getattr__(name: str) -> Any:
    # Lazy: INSTALLED_APPS imports this package before Django's Tasks
    # framework may be imported, and a project may use offload without it.
    if name == "TaskBackend":
        from .backend import TaskBackend

        return TaskBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
