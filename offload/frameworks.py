"""Recognising a framework's app object by its shape, without importing the framework.

``Offload(app)`` and the worker's boot (:mod:`offload._boot`) must tell a
Flask app from a config mapping, and find the Offload a Flask app holds,
whether Flask is installed or not; the integration itself
(:mod:`offload.flask`) builds on the same three names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["EXTENSION_KEY", "is_flask_app", "offload_of"]

EXTENSION_KEY = "offload"
"""Where an app's Offload lives: ``app.extensions[EXTENSION_KEY]``."""


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
