"""Building an error report: what failed, where, in which request; secrets scrubbed.

A report is a plain JSON-safe dict, so it travels as a task argument and is
written to the spool as is. It carries the stack trace as frames (file, line,
function, source line) but never local variables, whose values are the
likeliest place for a password. Headers and query values whose names look
secret are replaced before the report leaves the process.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import socket
import traceback
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote_plus

__all__ = ["FILTERED", "Scrubber", "build_report", "fingerprint", "render_extra"]

#: What a scrubbed value is replaced with.
FILTERED = "[Filtered]"
_FILTERED_QUERY = quote(FILTERED)

#: Headers that always carry credentials, whatever the name patterns say.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
#: Parts of a name that mark its value as secret (headers, query and form fields).
#: (Sentry's default deny-list, as substrings: ``key`` covers api_key and
#: private_key, ``session`` covers sessionid, ``signature`` a presigned URL's.)
SECRET_NAME_PARTS = ("password", "passwd", "pwd", "secret", "token", "key", "session", "sessid",
                     "auth", "credential", "csrf", "xsrf", "signature", "jwt")

#: The CGI variables of a WSGI environ that a report reads (besides HTTP_*).
REQUEST_KEYS = frozenset({"REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
                          "REMOTE_ADDR", "CONTENT_TYPE", "CONTENT_LENGTH", "wsgi.url_scheme"})

#: Bounds that keep one report small enough for a task message.
MAX_FRAMES = 100
MAX_TEXT = 2000
MAX_DESCRIPTION = 250
MAX_TRACEBACK = 32_000

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class Scrubber:
    """Replaces the values of secret-looking names with ``[Filtered]``.

    Parameters:
        names: the parts of a name that make it secret (case-insensitive
            substrings); default :data:`SECRET_NAME_PARTS`.
        headers: header names that are always secret; default
            :data:`SECRET_HEADERS`.

    Examples:
        >>> Scrubber().query("q=shoes&api_key=abc&page=2")
        'q=shoes&api_key=%5BFiltered%5D&page=2'
        >>> Scrubber(names=["pin"]).headers({"X-Pin": "1234", "Accept": "*/*"})
        {'X-Pin': '[Filtered]', 'Accept': '*/*'}
    """

    def __init__(self, names: Iterable[str] = SECRET_NAME_PARTS,
                 headers: Iterable[str] = SECRET_HEADERS) -> None:
        if isinstance(names, str) or isinstance(headers, str):
            raise TypeError("Scrubber takes lists of names, not a single string")
        parts = [re.escape(str(name)) for name in names if str(name)]
        self._pattern = re.compile("|".join(parts), re.I) if parts else None
        self._headers = frozenset(str(name).lower() for name in headers)

    def is_secret(self, name: str) -> bool:
        """Whether a header, query or field name holds a secret."""
        lowered = name.lower()
        return lowered in self._headers or (
            self._pattern is not None and self._pattern.search(lowered) is not None)

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """``headers`` with secret ones' values replaced by ``[Filtered]`` (long values cut)."""
        return {name: FILTERED if self.is_secret(name) else _cut(value)
                for name, value in headers.items()}

    def query(self, query: str) -> str:
        """The query string with secret values replaced; the rest kept as sent."""
        if not query:
            return ""
        parts = []
        for part in query.split("&"):
            name, sep, _value = part.partition("=")
            if not sep:
                # A bare token (``?abc123``) has no name saying it is harmless.
                parts.append(_FILTERED_QUERY if part else part)
            elif self.is_secret(unquote_plus(name)):
                parts.append(f"{name}={_FILTERED_QUERY}")
            else:
                parts.append(part)
        return "&".join(parts)

    def mapping(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` (a task's keyword arguments) with secret names' values replaced."""
        return {str(k): FILTERED if self.is_secret(str(k)) else v for k, v in values.items()}


def _cut(text: Any, limit: int = MAX_TEXT) -> str:
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _cut_head(text: str, limit: int = MAX_TRACEBACK) -> str:
    # A traceback's end (the innermost frames, the exception) says the most.
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _frames(tb: TracebackType | None) -> list[dict[str, Any]]:
    summary = traceback.extract_tb(tb)
    if len(summary) > MAX_FRAMES:  # the innermost frames say the most
        summary = summary[-MAX_FRAMES:]
    return [{"file": frame.filename, "line": frame.lineno, "function": frame.name,
             "context": (frame.line or "")[:MAX_TEXT]} for frame in summary]


def fingerprint(exc_type: type[BaseException], tb: TracebackType | None) -> str:
    """A stable id for "the same error": its type and where it was raised.

    Built from the exception's type and each frame's file and function, not
    line numbers or the message, so the same bug still groups after an edit
    above it or with other values in its message.
    """
    digest = hashlib.sha1(f"{exc_type.__module__}.{exc_type.__qualname__}".encode())
    while tb is not None:
        code = tb.tb_frame.f_code
        digest.update(f"|{code.co_filename}:{code.co_name}".encode())
        tb = tb.tb_next
    return digest.hexdigest()[:16]


def request_info(environ: Mapping[str, Any], scrubber: Scrubber) -> dict[str, Any]:
    """The request part of a report from a WSGI environ (or an ASGI scope made into one)."""
    headers = {key[5:].replace("_", "-").title(): str(value)
               for key, value in environ.items() if key.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").title()] = str(environ[key])
    # Scrubbed whole, then cut: a cut must not split a secret from its name.
    query = _cut(scrubber.query(str(environ.get("QUERY_STRING") or "")))
    path = _cut(str(environ.get("SCRIPT_NAME") or "") + str(environ.get("PATH_INFO") or ""))
    host = str(environ.get("HTTP_HOST") or environ.get("SERVER_NAME") or "")
    scheme = str(environ.get("wsgi.url_scheme") or "http")
    return {
        "method": str(environ.get("REQUEST_METHOD") or ""),
        "url": f"{scheme}://{host}{path}" + (f"?{query}" if query else ""),
        "path": path,
        "query": query,
        "user_agent": _cut(environ.get("HTTP_USER_AGENT") or ""),
        "remote_addr": str(environ.get("REMOTE_ADDR") or ""),
        "headers": scrubber.headers(headers),
    }


def _where(frames: list[dict[str, Any]]) -> str:
    if not frames:
        return ""
    last = frames[-1]
    return f" at {last['file'].rsplit('/', 1)[-1]}:{last['line']} in {last['function']}"


def build_report(exc_info: ExcInfo, *, app: Mapping[str, Any], environ: Mapping[str, Any] | None = None,
                 scrubber: Scrubber | None = None, fingerprint_: str | None = None,
                 task: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-safe report of one exception (and the request or task it broke)."""
    exc_type, exc, tb = exc_info
    scrubber = scrubber or Scrubber()
    frames = _frames(tb)
    message = _cut(str(exc), MAX_TEXT)
    name = exc_type.__qualname__
    description = f"{name}: {message}" if message else name
    description = (description.splitlines() or [name])[0][:MAX_DESCRIPTION - 80] + _where(frames)
    report: dict[str, Any] = {
        "description": description[:MAX_DESCRIPTION],
        "exception": {"type": name, "module": exc_type.__module__, "message": message},
        "frames": frames,
        "traceback": _cut_head("".join(traceback.format_exception(exc_type, exc, tb, limit=-MAX_FRAMES))),
        "app": dict(app),
        "hostname": socket.gethostname(),
        "timestamp": now_iso(),
        "fingerprint": fingerprint_ or fingerprint(exc_type, tb),
        "count": 1,
    }
    if environ is not None:
        report["request"] = request_info(environ, scrubber)
    if task is not None:
        report["task"] = dict(task)
    return report


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def render_extra(report: Mapping[str, Any]) -> str:
    """The report as text: what a bug tracker shows under the title."""
    lines: list[str] = []
    count = int(report.get("count") or 1)
    if count > 1:
        lines.append(f"Occurrences: {count} (first {report.get('first_seen')}, "
                     f"last {report.get('last_seen')})")
    if report.get("extra"):
        lines.append(str(report["extra"]))
    if report.get("traceback"):
        lines.append(str(report["traceback"]).rstrip())
    request = report.get("request")
    if request:
        lines.append("")
        lines.append(f"Request: {request.get('method')} {request.get('url')}")
        lines.append(f"User agent: {request.get('user_agent')}")
        lines.append(f"Remote address: {request.get('remote_addr')}")
        lines.append("Headers:")
        lines += [f"  {name}: {value}" for name, value in (request.get("headers") or {}).items()]
    task = report.get("task")
    if task:
        lines.append("")
        lines.append(f"Task: {task.get('name')} [{task.get('id')}]")
        lines.append(f"Args: {task.get('args')}")
        lines.append(f"Kwargs: {task.get('kwargs')}")
    app = report.get("app") or {}
    lines.append("")
    lines.append(f"App: {app.get('name')} {app.get('version') or ''}".rstrip())
    lines.append(f"Host: {report.get('hostname')}")
    lines.append(f"Time: {report.get('timestamp')}")
    lines.append(f"Fingerprint: {report.get('fingerprint')}")
    return "\n".join(lines)
