"""An Offload made from ``django.conf.settings``.

Every uppercase setting goes to :func:`offload.config.translate`, so each
spelling the core accepts works in ``settings.py`` (``CELERY_BROKER_URL``,
``CELERY_ALWAYS_EAGER``, ``OFFLOAD_DATA_DIR``, ...); Django's own settings
(``DEBUG``, ``DATABASES``) are not Celery's and are left alone. Defaults
that depend on the project:

* ``OFFLOAD_DATA_DIR`` (the embedded broker's folder): ``BASE_DIR/instance``;
* ``OFFLOAD_ALLOW`` (what ``off.submit(fn)`` may run): the project's package
  and the installed apps that live under ``BASE_DIR``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from ..core import Offload
from ..datadir import DEFAULT_FOLDER_NAME
from ..dispatch import refusal
from . import db

__all__ = ["make_offload", "settings_mapping"]

#: How a worker process started by this app (``off.start()``, ``manage.py
#: offload cluster``) finds it: the module sets Django up, then holds ``off``.
BOOT_SPEC = "offload.django.boot:off"


def settings_mapping(settings: Any) -> dict[str, Any]:
    """The uppercase settings of a Django ``settings`` object, as a dict."""
    return {name: getattr(settings, name) for name in dir(settings) if name.isupper()}


def _project_package(settings: Any) -> str:
    module = getattr(settings, "SETTINGS_MODULE", None) or os.environ.get("DJANGO_SETTINGS_MODULE") or ""
    return module.partition(".")[0] or "__main__"


def _base_dir(settings: Any) -> str | None:
    base = getattr(settings, "BASE_DIR", None)
    return os.fspath(base) if base else None


def _project_root(settings: Any) -> str | None:
    """The folder the settings module is imported from (manage.py's folder)."""
    module = sys.modules.get(getattr(settings, "SETTINGS_MODULE", None) or "")
    path = getattr(module, "__file__", None)
    if module is None or not path:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(module.__name__.count(".")):
        folder = os.path.dirname(folder)
    return folder


def _local_apps(settings: Any, base_dir: str | None) -> list[str]:
    """The project's package and the installed apps whose code is under ``base_dir``."""
    from django.apps import apps

    packages = [_project_package(settings)]
    if base_dir and apps.apps_ready:
        root = os.path.abspath(base_dir) + os.sep
        for config in apps.get_app_configs():
            if os.path.abspath(config.path).startswith(root):
                packages.append(config.name)
    return [p for p in dict.fromkeys(packages) if refusal(p) is None]


def make_offload(settings: Any = None) -> Offload:
    """The Offload of this Django project (``offload.django.get_offload()`` keeps one).

    Raises:
        ConfigurationError: a setting offload cannot use.
    """
    if settings is None:
        from django.conf import settings as django_settings

        settings = django_settings
    config = settings_mapping(settings)
    base_dir = _base_dir(settings)
    config.setdefault("OFFLOAD_ALLOW", _local_apps(settings, base_dir))
    package = _project_package(settings)
    off = Offload(None, name=package)
    # The project, not this module, is whom the Offload belongs to.
    off.import_name = getattr(settings, "SETTINGS_MODULE", None) or package
    off.configure(config, default_data_dir=os.path.join(base_dir, DEFAULT_FOLDER_NAME) if base_dir else None)
    off.add_task_context(_request_cycle)
    off.add_commit_hook(db.on_commit)
    off.workers.app_spec = BOOT_SPEC
    root = _project_root(settings)
    if root:
        off.workers.import_folders.append(root)
    from .runner import install_runner

    install_runner(off)
    return off


@contextlib.contextmanager
def _request_cycle() -> Iterator[None]:
    """What Django does around a request, around a task: stale connections closed."""
    db.close_old_connections()
    try:
        yield
    finally:
        db.close_old_connections()
