"""The task API as a WSGI application: a thin adapter over :mod:`offload.web.app`.

Request parsing is the standard library's (a WSGI environ is already parsed;
Werkzeug or WebOb would add a dependency for three fields). CORS follows
:class:`offload.web.cors.CorsConfig`. A long-poll or an event stream holds the
request's thread, at most ``max_wait`` / ``max_stream`` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .steps import (
    API,
    CONTENT_LENGTH,
    EventStream,
    RequestInfo,
    Response,
    drive_sync,
    error_response,
    parse_query,
    too_many_fields,
)
from .sse import HEADERS as SSE_HEADERS
from .sse import sync_events

__all__ = ["WSGIApp"]

logger = logging.getLogger("offload.web")

StartResponse = Callable[..., Any]

_REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 303: "See Other", 400: "Bad Request",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
            422: "Unprocessable Content", 500: "Internal Server Error", 503: "Service Unavailable"}


def _status_line(code: int) -> str:
    return f"{code} {_REASONS.get(code, 'Unknown')}"


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    return headers


class _TooLarge(Exception):
    pass


class _LengthRequired(Exception):
    pass


class WSGIApp:
    """``api.wsgi``: serve a :class:`TaskAPI` to any WSGI server or framework."""

    def __init__(self, api: API) -> None:
        self.api = api

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        headers = _headers(environ)
        origin = headers.get("origin")
        method = environ.get("REQUEST_METHOD", "GET").upper()
        cors = self.api.cors
        if method == "OPTIONS":
            if origin is not None and "access-control-request-method" in headers:
                status, out = cors.preflight(origin, headers)
                return self._send(start_response, Response(status, b"", out))
            return self._send(start_response, Response(204, b"", [("Allow", "GET, POST, DELETE, OPTIONS")]),
                              cors.simple(origin))
        try:
            body = self._read_body(environ, method)
        except _TooLarge:
            answer: Any = error_response(413, "TooLarge", f"the body is over {self.api.max_body} bytes")
        except ValueError:
            answer = error_response(400, "BadContentLength", "Content-Length is not a number of bytes (digits only)")
        except _LengthRequired:
            answer = error_response(411, "LengthRequired",
                                    "this server does not read chunked request bodies; send Content-Length")
        else:
            path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")) or "/"
            query = parse_query(environ.get("QUERY_STRING", ""))
            request = RequestInfo(method, path, query or {}, headers, environ.get("REMOTE_ADDR"), environ)
            try:
                answer = (drive_sync(self.api, self.api.handle(request, body)) if query is not None
                          else too_many_fields())
            except Exception:  # a bug or a hook's error: logged here, never shown
                logger.exception("task API: error answering %s %s", method, path)
                answer = error_response(500, "InternalError", "the server could not answer; see its log")
        if isinstance(answer, EventStream):
            start_response("200 OK", [*SSE_HEADERS, *cors.simple(origin)])
            return answer.source.sync() if answer.source is not None else sync_events(self.api, answer.task_id, answer.exposure)
        if method == "HEAD":
            answer.body = b""
        return self._send(start_response, answer, cors.simple(origin))

    def _read_body(self, environ: dict[str, Any], method: str) -> bytes:
        if method not in ("POST", "PUT", "PATCH"):
            return b""
        stream = environ.get("wsgi.input")
        raw_length = environ.get("CONTENT_LENGTH") or ""
        limit = self.api.max_body
        if raw_length:
            # int() would take "+14", "1_4" and " 14": HTTP allows digits only.
            if not CONTENT_LENGTH.fullmatch(raw_length):
                raise ValueError(raw_length)
            length = int(raw_length)
            if length > limit:
                raise _TooLarge
            return stream.read(length) if stream is not None and length else b""
        if stream is not None and environ.get("wsgi.input_terminated"):
            # Chunked: the server marks the end of input; read one byte past
            # the limit to know whether it was crossed.
            data = stream.read(limit + 1)
            if len(data) > limit:
                raise _TooLarge
            return data
        if environ.get("HTTP_TRANSFER_ENCODING"):
            # A body this server hands over still chunked (or not at all):
            # read as empty, it would start a task with no arguments.
            raise _LengthRequired
        return b""

    @staticmethod
    def _send(start_response: StartResponse, response: Response,
              extra: Iterable[tuple[str, str]] = ()) -> Iterator[bytes] | list[bytes]:
        headers = [*response.headers, *extra, ("Content-Length", str(len(response.body)))]
        start_response(_status_line(response.status), headers)
        return [response.body]
