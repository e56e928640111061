"""WSGI and ASGI middleware: a failing request answers 500 and is reported.

The client gets a generic body (empty unless configured), never the trace;
the report is queued for a background thread (see :mod:`.pipeline`), so the
request neither raises because of reporting nor waits for the broker.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Protocol

from ..interface import OffloadLike
from .service import setup
from .sinks import Sink

__all__ = ["ASGIErrorReporter", "Capturing", "ErrorReporter"]


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATUS = "500 Internal Server Error"
#: What of an ASGI scope's headers a report reads.
MAX_SCOPE_HEADERS = 256
MAX_HEADER_VALUE = 8192


class Capturing(Protocol):
    """What the middleware needs of :class:`ErrorReporting`: queue one report."""

    def capture(self, exc_info: Any, environ: Mapping[str, Any] | None = None) -> None: ...


def _reporting(off: OffloadLike | Capturing, sinks: list[Sink] | None,
               options: dict[str, Any]) -> Capturing:
    if hasattr(off, "capture") and not hasattr(off, "task"):
        if sinks is not None or options:
            raise TypeError("give sinks and options to offload.errors.setup(), not with its result")
        return off
    if not hasattr(off, "celery") or not hasattr(off, "task"):
        raise TypeError(f"ErrorReporter takes an Offload (or offload.errors.setup(off, ...)), got {off!r}")
    return setup(off, sinks, **options)  # type: ignore[arg-type]  # an Offload, checked above


def _body(body: bytes | str) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    if not isinstance(body, bytes):
        raise TypeError(f"the error body is bytes or str, got {type(body).__name__}")
    return body


class ErrorReporter:
    """WSGI middleware that reports what ``app`` raises and answers 500.

    Parameters:
        app: the WSGI app.
        off: its Offload (workers send the reports), or what
            :func:`offload.errors.setup` returned.
        sinks: where reports go (see :func:`offload.errors.setup` for the
            other keyword options, passed on to it).
        body: the 500 response's body (default empty, as BugzScout's example).
        content_type: its Content-Type.

    An exception from the app call, or from iterating its body before
    anything was sent, becomes a 500. One raised after the first bytes went
    out cannot change the status: it is reported and handed to the server
    (PEP 3333), which closes the connection so the response is not taken as
    complete. The app's iterator is always closed.
    """

    def __init__(self, app: WSGIApp, off: OffloadLike | Capturing, sinks: list[Sink] | None = None,
                 *, body: bytes | str = b"", content_type: str = "text/plain; charset=utf-8",
                 **options: Any) -> None:
        if not callable(app):
            raise TypeError(f"ErrorReporter wraps a WSGI app (a callable), got {app!r}")
        self.app = app
        self.body = _body(body)
        self.reporting = _reporting(off, sinks, options)
        self.headers = [("Content-Type", content_type), ("Content-Length", str(len(self.body)))]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            result = self.app(environ, start_response)
        except Exception:
            return self._fail(environ, start_response, sys.exc_info())
        # A list has nothing left to raise, and a file wrapper must reach the
        # server as itself for its sendfile() path: both pass through.
        kind = type(result)
        if kind is list or kind is tuple:
            return result
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None and (kind is wrapper or (isinstance(wrapper, type)
                                                        and isinstance(result, wrapper))):
            return result
        return _Guarded(self, result, environ, start_response)

    def _fail(self, environ: dict[str, Any], start_response: Callable[..., Any],
              exc_info: Any) -> list[bytes]:
        self.reporting.capture(exc_info, environ)
        # With exc_info, start_response may replace headers set by the app; if
        # they were already sent it re-raises, which the server must see.
        start_response(STATUS, list(self.headers), exc_info)
        return [self.body]


class _Guarded:
    """The app's body iterable, with failures while iterating reported."""

    __slots__ = ("_reporter", "_result", "_environ", "_start_response", "_closed")

    def __init__(self, reporter: ErrorReporter, result: Iterable[bytes], environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> None:
        self._reporter = reporter
        self._result = result
        self._environ = environ
        self._start_response = start_response
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            # yield from: chunks pass at C speed, and close()/throw() reach the app's iterator.
            yield from self._result
        except Exception:
            exc_info = sys.exc_info()
            self.close()
            yield from self._reporter._fail(self._environ, self._start_response, exc_info)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                self._reporter.reporting.capture(sys.exc_info(), self._environ)


class ASGIErrorReporter:
    """The ASGI variant: reports what an ASGI ``app`` raises during an HTTP request.

    Before the response started, the client gets the 500 with the generic
    body; after, the exception is re-raised so the server aborts the
    response (it cannot be turned into a 500 any more). Lifespan and
    websocket scopes pass through.
    """

    def __init__(self, app: ASGIApp, off: OffloadLike | Capturing, sinks: list[Sink] | None = None,
                 *, body: bytes | str = b"", content_type: str = "text/plain; charset=utf-8",
                 **options: Any) -> None:
        if not callable(app):
            raise TypeError(f"ASGIErrorReporter wraps an ASGI app (a callable), got {app!r}")
        self.app = app
        self.body = _body(body)
        self.reporting = _reporting(off, sinks, options)
        self.headers = [(b"content-type", content_type.encode("latin-1")),
                        (b"content-length", str(len(self.body)).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            exc_info = sys.exc_info()
            try:
                environ = environ_of(scope)
            except Exception:  # noqa: BLE001 - a scope of the wrong shape: report without it
                environ = None
            self.reporting.capture(exc_info, environ)
            if started:
                raise
            await send({"type": "http.response.start", "status": 500, "headers": list(self.headers)})
            await send({"type": "http.response.body", "body": self.body})


def environ_of(scope: Scope) -> dict[str, Any]:
    """The WSGI-style fields of an ASGI HTTP scope that a report reads."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.get("method", ""),
        "SCRIPT_NAME": scope.get("root_path", ""),
        "PATH_INFO": scope.get("path", ""),
        "QUERY_STRING": (scope.get("query_string") or b"").decode("latin-1"),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "REMOTE_ADDR": (scope.get("client") or ("",))[0],
    }
    server = scope.get("server")
    if server:
        environ["SERVER_NAME"] = str(server[0])
    # Bounded: a report keeps the first headers and a cut of each value, so
    # a request of thousands of repeated headers costs no more than that.
    for name, value in list(scope.get("headers") or ())[:MAX_SCOPE_HEADERS]:
        key = bytes(name).decode("latin-1").upper().replace("-", "_")
        key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key
        value = bytes(value)[:MAX_HEADER_VALUE].decode("latin-1")
        if key in environ:
            value = f"{environ[key]}, {value}"[:MAX_HEADER_VALUE]
        environ[key] = value
    return environ
