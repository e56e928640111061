"""Capturing an error as a report: what failed, where, in which request; secrets scrubbed.

The report's data, and nothing of delivering it (:mod:`.service` sends it
through the Offload's workers to the sinks).

A report is a plain JSON-safe dict, so it travels as a task argument and is
written to the spool as is. It carries the stack trace as frames (file, line,
function, source line) but never local variables, whose values are the
likeliest place for a password. Secrets are replaced before the report leaves
the process, by the one policy of :mod:`.scrub`.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import socket
import traceback
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from .scrub import FILTERED, SECRET_HEADERS, SECRET_NAME_PARTS, SECRET_NAMES, Scrubber, repr_safe

__all__ = ["FILTERED", "SECRET_HEADERS", "SECRET_NAMES", "SECRET_NAME_PARTS", "Scrubber",
           "build_report", "fingerprint", "render_extra"]

#: The CGI variables of a WSGI environ that a report reads (besides HTTP_*).
REQUEST_KEYS = frozenset({"REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
                          "REMOTE_ADDR", "CONTENT_TYPE", "CONTENT_LENGTH", "wsgi.url_scheme"})

#: Bounds that keep one report small enough for a task message.
MAX_FRAMES = 100
MAX_TEXT = 2000
MAX_DESCRIPTION = 250
MAX_TRACEBACK = 32_000
#: Headers a report keeps (the first ones; a request may carry hundreds).
MAX_HEADERS = 64

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _cut(text: Any, limit: int = MAX_TEXT) -> str:
    text = text if isinstance(text, str) else repr_safe(text)
    text = text if len(text) <= limit else text[:limit] + "..."
    # A lone surrogate (bytes a server decoded with surrogateescape) cannot
    # be sent as UTF-8 to a sink: it becomes "?".
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def _cut_head(text: str, limit: int = MAX_TRACEBACK) -> str:
    # A traceback's end (the innermost frames, the exception) says the most.
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _frames(tb: TracebackType | None) -> list[dict[str, Any]]:
    summary: list[traceback.FrameSummary] = list(traceback.extract_tb(tb))
    if len(summary) > MAX_FRAMES:  # the innermost frames say the most
        summary = summary[-MAX_FRAMES:]
    return [{"file": frame.filename, "line": frame.lineno, "function": frame.name,
             "context": (frame.line or "")[:MAX_TEXT]} for frame in summary]


def message_shape(message: str) -> str:
    """A message with what varies between occurrences of one bug taken out.

    Numbers, hex ids, quoted values and anything after the first line become
    placeholders, so ``no such user 42`` and ``no such user 7`` have one
    shape while ``connection refused`` and ``disk full`` have two.

    >>> message_shape("no such user 42 in 'shop-eu' (0x7f3a)")
    "no such user # in '_' (#)"
    """
    first = (message.splitlines() or [""])[0][:500]
    first = _QUOTED.sub(lambda m: m.group(0)[0] + "_" + m.group(0)[-1], first)
    return _NUMBER.sub("#", first)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\b0x[0-9a-fA-F]+\b|[0-9a-fA-F]{8}-[0-9a-fA-F-]{27}|\d+(\.\d+)?")


def fingerprint(exc_type: type[BaseException], tb: TracebackType | None, exc: BaseException | None = None) -> str:
    """A stable id for "the same error": its type, its message's shape and where it was raised.

    Built from the exception's type, the shape of its message
    (:func:`message_shape`), each frame's file and function, and where in
    the innermost function it was raised (the line counted from the
    function's first line): two different errors raised in one function are
    two reports, and the same bug still groups after an edit above its
    function or with other values in its message.
    """
    digest = hashlib.sha1(f"{exc_type.__module__}.{exc_type.__qualname__}".encode())
    if exc is not None:
        digest.update(b"|" + message_shape(text_of(exc)).encode("utf-8", "replace"))
    last = None
    while tb is not None:
        code = tb.tb_frame.f_code
        digest.update(f"|{code.co_filename}:{code.co_name}".encode("utf-8", "replace"))
        last = tb
        tb = tb.tb_next
    if last is not None:
        digest.update(f"+{last.tb_lineno - last.tb_frame.f_code.co_firstlineno}".encode())
    return digest.hexdigest()[:16]


def text_of(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder for an exception that cannot be printed."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - e.g. ValueError(10**5000): str() refuses it
        return f"<unprintable {type(exc).__name__}>"


def request_info(environ: Mapping[str, Any], scrubber: Scrubber) -> dict[str, Any]:
    """The request part of a report from a WSGI environ (or an ASGI scope made into one)."""
    headers: dict[str, str] = {}
    names = [key for key in environ if key.startswith("HTTP_")]
    for key in names[:MAX_HEADERS]:
        headers[_cut(key[5:].replace("_", "-").title(), 200)] = str(environ[key])
    if len(names) > MAX_HEADERS:
        headers["..."] = f"{len(names) - MAX_HEADERS} more headers"
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").title()] = str(environ[key])
    # Scrubbed whole, then cut: a cut must not split a secret from its name.
    query = _cut(scrubber.query(str(environ.get("QUERY_STRING") or "")))
    path = _cut(scrubber.path(str(environ.get("SCRIPT_NAME") or "") + str(environ.get("PATH_INFO") or "")))
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
    message = _cut(text_of(exc), MAX_TEXT)
    name = exc_type.__qualname__
    description = f"{name}: {message}" if message else name
    description = (description.splitlines() or [name])[0][:MAX_DESCRIPTION - 80] + _where(frames)
    report: dict[str, Any] = {
        "description": description[:MAX_DESCRIPTION],
        "exception": {"type": name, "module": exc_type.__module__, "message": message},
        "frames": frames,
        "traceback": _cut_head(_format(exc_type, exc, tb)),
        "app": dict(app),
        "hostname": socket.gethostname(),
        "timestamp": now_iso(),
        "fingerprint": fingerprint_ or fingerprint(exc_type, tb, exc),
        "count": 1,
    }
    if environ is not None:
        report["request"] = request_info(environ, scrubber)
    if task is not None:
        report["task"] = dict(task)
    return report


def _format(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> str:
    try:
        return "".join(traceback.format_exception(exc_type, exc, tb, limit=-MAX_FRAMES))
    except Exception:  # noqa: BLE001 - an exception whose str() fails, a cycle in its chain
        frames = "".join(traceback.format_list(traceback.extract_tb(tb, limit=-MAX_FRAMES)))
        return f"Traceback (most recent call last):\n{frames}{exc_type.__qualname__}: {text_of(exc)}\n"


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
