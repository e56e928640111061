"""Recognising a framework's app object by its shape, and finding its integration, without importing either.

``Offload(app)`` and the worker's boot (:mod:`offload._boot`) must tell a
Flask app from a config mapping, and find the Offload a Flask app holds,
whether Flask is installed or not; the integration itself
(:mod:`offload.flask`) builds on the same names.

The core depends on no integration: :meth:`offload.Offload.init_app` finds
the integration for an app's kind in :data:`INTEGRATIONS`, by module name
(as kombu finds a transport by its URL's scheme), and imports it only when
given such an app. The integration then hands the core what it must know
of the app as :class:`AppHooks`, which say nothing of the framework.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

__all__ = ["EXTENSION_KEY", "FACTORY_NAMES", "INTEGRATIONS", "AppHooks", "integration_for", "is_flask_app",
           "offload_of"]

EXTENSION_KEY = "offload"
"""Where an app's Offload lives: ``app.extensions[EXTENSION_KEY]``."""

FACTORY_NAMES = ("create_app", "make_app")
"""The app factories a module is searched for, as Flask's CLI does."""


def is_flask_app(obj: Any) -> bool:
    """Whether ``obj`` is a Flask app (duck-typed: Flask need not be installed).

    Examples:
        >>> is_flask_app(object())
        False
    """
    return (not isinstance(obj, type) and hasattr(obj, "extensions") and hasattr(obj, "config")
            and hasattr(obj, "app_context"))


def offload_of(app: Any) -> Any | None:
    """The Offload :func:`offload.flask.init_app` registered on the Flask ``app``, or None."""
    extensions = getattr(app, "extensions", None)
    return extensions.get(EXTENSION_KEY) if isinstance(extensions, Mapping) else None


INTEGRATIONS: tuple[tuple[Callable[[Any], bool], str], ...] = ((is_flask_app, "offload.flask"),)
"""Each kind of app ``init_app`` takes: how to recognise one, and the module whose ``init_app(off, app)`` does it."""


def integration_for(app: Any) -> Callable[[Any, Any], None] | None:
    """The ``init_app(off, app)`` of the integration for ``app``'s kind, or None for no app offload knows.

    Examples:
        >>> integration_for({"CELERY_ALWAYS_EAGER": True}) is None
        True
    """
    for recognises, module in INTEGRATIONS:
        if recognises(app):
            init_app: Callable[[Any, Any], None] = importlib.import_module(module).init_app
            return init_app
    return None


class AppHooks(Protocol):
    """What the core asks of the web app an integration configured an Offload from.

    ``off.app_hooks`` holds one (:func:`offload.flask.init_app` sets it), and
    None while the Offload is configured from a mapping alone.
    """

    def worker_spec(self) -> tuple[str, list[str]] | None:
        """How a worker process builds the same app: an ``OFFLOAD_APP`` spec and folders to import from.

        None when the app cannot be named so (the worker then finds the
        Offload by itself, :mod:`offload.workers`).
        """
        ...

    def reconfigure(self, settings: Mapping[str, Any], kept: Collection[str]) -> None:
        """In a worker: configure the Offload again through the app, with the starter's ``settings``.

        The app's own settings that are neither in ``settings`` nor ``kept``
        (those JSON could not carry) are dropped first.
        """
        ...
