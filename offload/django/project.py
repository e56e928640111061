"""The project's one Offload, made from ``django.conf.settings``.

With ``offload.django`` in ``INSTALLED_APPS`` the app config holds it
(:mod:`offload.django.apps`); without (``TASKS`` names the backend and
nothing else), it is made on first use and kept here.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["APP_LABEL", "get_offload"]

#: The app's label in Django's registry.
APP_LABEL = "offload"

_standalone_lock = threading.Lock()
# Without 'offload.django' in INSTALLED_APPS (TASKS names the backend and
# nothing else), the Offload is made on first use and kept here: Django's
# settings are one per process, and so is the Offload made from them.
_standalone: list[Any] = []


def get_offload() -> Any:
    """The project's :class:`offload.Offload`, made from ``django.conf.settings``.

    In a view: ``get_offload().submit(report, 2026, on_commit=True)``
    (``report`` a function of one of the project's apps).
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
