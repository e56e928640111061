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

import threading
from typing import Any

__all__ = ["TaskBackend", "get_offload"]

#: The app's label in Django's registry.
APP_LABEL = "offload"

_standalone_lock = threading.Lock()
# Without 'offload.django' in INSTALLED_APPS (TASKS names the backend and
# nothing else), the Offload is made on first use and kept here: Django's
# settings are one per process, and so is the Offload made from them.
_standalone: list[Any] = []


def get_offload() -> Any:
    """The project's :class:`offload.Offload`, made from ``django.conf.settings``.

    >>> from offload.django import get_offload      # doctest: +SKIP
    >>> get_offload().submit(report, 2026).id        # doctest: +SKIP
    """
    from django.apps import apps

    if apps.apps_ready and apps.is_installed("offload.django"):
        config = apps.get_app_config(APP_LABEL)
        return config.offload
    with _standalone_lock:
        if not _standalone:
            from .conf import make_offload

            _standalone.append(make_offload())
        return _standalone[0]


def __getattr__(name: str) -> Any:
    # Lazy: INSTALLED_APPS imports this package before Django's Tasks
    # framework may be imported, and a project may use offload without it.
    if name == "TaskBackend":
        from .backend import TaskBackend

        return TaskBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
