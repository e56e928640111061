"""Pyramid: a tween that reports exceptions on their way to the exception views.

It sits under Pyramid's ``excview`` tween, so it sees every exception a view
raises, reports those that are not HTTP answers below 500 (``HTTPNotFound``
and friends are answers, not bugs), and re-raises: the app's exception views
render the response as before.

    config.include("offload.errors.pyramid")
    config.add_error_reporting(off, sinks=[FogBugz(...)])
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..interface import OffloadLike
from .service import ErrorReporting, setup
from .sinks import Sink

__all__ = ["add_error_reporting", "error_reporting_tween_factory", "includeme"]

#: Where the tween finds the ErrorReporting in the registry.
REGISTRY_KEY = "offload.errors"


def error_reporting_tween_factory(handler: Callable[[Any], Any], registry: Any) -> Callable[[Any], Any]:
    """The tween (Pyramid calls this factory once per app)."""
    from pyramid.httpexceptions import HTTPException

    def tween(request: Any) -> Any:
        try:
            return handler(request)
        except Exception as exc:
            reporting = registry.get(REGISTRY_KEY) if hasattr(registry, "get") else None
            code = getattr(exc, "code", 500) if isinstance(exc, HTTPException) else 500
            if reporting is not None and (not isinstance(code, int) or code >= 500):
                reporting.capture(sys.exc_info(), request.environ)
            raise

    return tween


def add_error_reporting(config: Any, off: OffloadLike | ErrorReporting,
                        sinks: list[Sink] | None = None, **options: Any) -> ErrorReporting:
    """Config directive: report this app's errors through ``off``'s workers."""
    reporting = off if isinstance(off, ErrorReporting) else setup(off, sinks, **options)
    config.registry[REGISTRY_KEY] = reporting
    return reporting


def includeme(config: Any) -> None:
    """``config.include("offload.errors.pyramid")``: the tween and the directive."""
    from pyramid.tweens import EXCVIEW

    config.add_directive("add_error_reporting", add_error_reporting)
    config.add_tween("offload.errors.pyramid.error_reporting_tween_factory", under=EXCVIEW)
