"""Flask: report the exceptions Flask itself turns into a 500.

Flask catches a view's exception, sends ``got_request_exception`` and renders
its own 500 page (never a trace outside debug mode); hooking that signal keeps
Flask's error handlers and pages as they are.

    from offload.errors.flask import report_errors
    report_errors(flask_app, off, sinks=[FogBugz(...)])
"""

from __future__ import annotations

from typing import Any

from ..interface import OffloadLike
from .service import ErrorReporting, setup
from .sinks import Sink

__all__ = ["report_errors"]


def report_errors(app: Any, off: OffloadLike | ErrorReporting, sinks: list[Sink] | None = None,
                  **options: Any) -> ErrorReporting:
    """Report ``app``'s unhandled exceptions through ``off``'s workers; the ErrorReporting."""
    try:
        from flask import got_request_exception, request
    except ImportError:  # pragma: no cover - the flask extra
        raise ImportError("offload.errors.flask needs Flask: pip install 'offload[flask]'") from None
    if not hasattr(app, "config") or not hasattr(app, "app_context"):
        raise TypeError(f"report_errors() takes a Flask app, got {app!r}")
    reporting = off if isinstance(off, ErrorReporting) else setup(off, sinks, **options)

    def on_exception(sender: Any, exception: BaseException, **extra: Any) -> None:
        tb = exception.__traceback__
        reporting.capture((type(exception), exception, tb), request.environ)

    # weak=False: the handler is a closure that nothing else keeps alive.
    got_request_exception.connect(on_exception, app, weak=False)
    app.extensions["offload.errors"] = reporting
    return reporting
