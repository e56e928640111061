"""The ``offload.django`` app: its Offload is made when Django is ready."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class OffloadConfig(AppConfig):
    """Holds the project's Offload (``offload.django.get_offload()``)."""

    name = "offload.django"
    label = "offload"
    verbose_name = "offload"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offload: Any = None

    @property
    def offload(self) -> Any:
        if self._offload is None:
            from .conf import make_offload

            self._offload = make_offload()
        return self._offload

    def ready(self) -> None:
        # Made now, so that a bad setting fails at startup (manage.py check,
        # runserver), not at the first enqueue.
        self.offload  # noqa: B018 (made on first read)
