"""Error reporting through offload's workers: WSGI/ASGI middleware, sinks, spool.

Examples:
    >>> from offload import Offload
    >>> from offload.errors import ErrorReporter, FogBugz
    >>> def wsgi_app(environ, start_response):
    ...     start_response("200 OK", [("Content-Type", "text/plain")])
    ...     return [b"hello"]
    >>> off = Offload()
    >>> app = ErrorReporter(wsgi_app, off, sinks=[FogBugz(
    ...     "https://example.fogbugz.com/scoutSubmit.asp", user="Bug Reporter",
    ...     project="Inbox", area="Undecided")])

A failing request answers an empty 500; its report (scrubbed) is grouped with
copies of itself, published as the ``offload.errors.send`` task from a
background thread, spooled under ``OFFLOAD_DATA_DIR`` while the broker is away,
and delivered by a worker to each sink. Task failures on the workers go to the
same sinks. :func:`setup` does the wiring without a middleware (a worker
module, a Flask or Pyramid hook) and gives ``submit_error``. BugzScout's own
form works too: ``celery = offload.errors.celery`` and
``offload.errors.submit_error.delay(url, user, project, area, description, extra)``.
"""

from typing import Any

from .middleware import ASGIErrorReporter, ErrorReporter
from .service import SEND_TASK, SUBMIT_TASK, ErrorReporting, SubmitError, current, setup
from .scrub import Scrubber
from .sinks import FogBugz, Log, Sink, SinkRefused, SinkUnavailable, Webhook
from .spool import Spool

__all__ = [
    "ASGIErrorReporter",
    "ErrorReporter",
    "ErrorReporting",
    "FogBugz",
    "Log",
    "SEND_TASK",
    "SUBMIT_TASK",
    "Scrubber",
    "Sink",
    "SinkRefused",
    "SinkUnavailable",
    "Spool",
    "SubmitError",
    "Webhook",
    "celery",
    "setup",
    "submit_error",
]

submit_error = SubmitError(current)
"""BugzScout's task: ``offload.errors.submit_error.delay(url, user, project,
area, description, extra)``, through the reporting set up last (or
:func:`.reporting.default`). Never raises."""


def __getattr__(name: str) -> Any:
    # ``celery = offload.errors.celery``, as BugzScout's example sets it: the
    # Celery app its workers run. Built on first use, not at import.
    if name == "celery":
        return current().off.celery
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
