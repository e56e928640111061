"""What a route of the web task API receives, yields and returns, for every protocol.

A route (:mod:`offload.web.app`, :mod:`offload.web.jsonrpc`,
:mod:`offload.web.dashboard`) is a generator over a :class:`RequestInfo`: it
*yields* a :class:`Wait` or a :class:`Call` and *returns* a :class:`Response`
or an :class:`EventStream`, or raises :class:`HTTPError`. The drivers
(:func:`drive_sync` here for WSGI, :mod:`offload.web.asgi` for ASGI) and the
routes meet only here and through :class:`API`, the part of
:class:`offload.web.TaskAPI` they use: so the drivers and the routes import
this module, not each other, and ``TaskAPI`` imports them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Union
from urllib.parse import parse_qsl

from ..exposure import Exposure
from ..ids import RULE, is_task_id
from . import strict_json
from .interface import OffloadLike
from .waiting import TaskSnapshot, compact_json

if TYPE_CHECKING:
    from .cors import CorsConfig
    from .names import ExposedTasks

__all__ = ["API", "Answer", "Authorize", "Call", "EventStream", "FindExposure", "HTTPError", "Handler", "RequestInfo",
           "Response", "Step", "Steps", "Wait", "allow_method", "drive_sync", "error_response", "json_response",
           "parse_json", "parse_query", "parse_task_id", "require_json", "too_many_fields"]

TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,199}")
#: A Content-Length header as HTTP defines it: digits only (no sign, no ``_``).
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")

#: The media types a request body may be sent as: JSON, and for JSON-RPC also
#: ``application/json-rpc`` (older clients' type). Anything else is 415: a
#: page on another origin can POST ``text/plain`` without a preflight.
JSON_TYPES = ("application/json",)
RPC_TYPES = ("application/json", "application/json-rpc")

Authorize = Callable[["RequestInfo", str], bool]


@dataclass(frozen=True)
class RequestInfo:
    """What the API knows of a request; ``authorize`` receives it.

    ``headers`` has lowercase names. ``raw`` is the WSGI environ or the ASGI
    scope, for an ``authorize`` that needs a framework's session or user.
    When ``authorize`` is asked about an existing task (a read or a cancel),
    ``task_id`` and ``task_name`` name it.
    """

    method: str
    """The HTTP method, uppercase (``POST``)."""
    path: str
    """The request's path, the prefix included (``/offload/tasks/add``)."""
    query: Mapping[str, str]
    """The query string's parameters (the last value of each name)."""
    headers: Mapping[str, str]
    """The request's headers, with lowercase names."""
    client: str | None = None
    """The client's address (``127.0.0.1``), when the server gives it."""
    raw: Any = None
    """The WSGI environ or the ASGI scope, for a framework's session or user."""
    task_id: str | None = None
    """The task an ``authorize`` hook is asked about (a read or a cancel), else None."""
    task_name: str | None = None
    """That task's full Celery name, when it is known."""


@dataclass
class Response:
    """A whole answer: status, headers, body."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class EventStream:
    """Answer with server-sent events following ``task_id`` (see :mod:`offload.web.sse`).

    ``source``, when given, makes the events instead: an object with
    ``sync()`` (an iterator of bytes, for WSGI) and ``async_()`` (an async
    one, for ASGI), as the dashboard's live stream.
    """

    task_id: str
    exposure: Exposure | None = None
    source: Any = None


@dataclass(frozen=True)
class Wait:
    """Step: wait until ``task_id`` ends or ``timeout`` seconds pass; sends back a snapshot."""

    task_id: str
    timeout: float


@dataclass(frozen=True)
class Call:
    """Step: run ``fn(*args)``, which may block on the network; sends back its result.

    An exception it raises is thrown back into the handler.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class FindExposure:
    """Step: the mark of ``task_id`` (:meth:`offload.exposure.Exposures.find`), or None.

    Reads the result backend. Under ASGI the lookups that wait together are
    read in one call, in one worker thread, rather than a thread each.
    """

    task_id: str


Step = Union[Wait, Call, FindExposure]
Answer = Union[Response, EventStream]
T = TypeVar("T")
#: A route, or a part of one: a generator of steps that returns a ``T``.
Steps = Generator[Step, Any, T]
#: A whole route: its steps, then the answer.
Handler = Steps[Answer]


class HTTPError(Exception):
    """A request the API refuses; becomes ``{"error": {"type", "message"}}``."""

    def __init__(self, status: int, kind: str, message: str,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = list(headers)


def json_response(status: int, data: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, compact_json(data).encode(), [("Content-Type", "application/json"), *headers])


def error_response(status: int, kind: str, message: str,
                   headers: Iterable[tuple[str, str]] = ()) -> Response:
    return json_response(status, {"error": {"type": kind, "message": message}}, headers)


#: The most query parameters a request may carry (the API reads two).
MAX_QUERY_FIELDS = 32


def parse_query(raw: str) -> dict[str, str] | None:
    """The query string's parameters, or None when it has over :data:`MAX_QUERY_FIELDS`."""
    try:
        return dict(parse_qsl(raw, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS))
    except ValueError:
        return None


def too_many_fields() -> Response:
    return error_response(400, "BadQuery", f"a query has at most {MAX_QUERY_FIELDS} parameters")


def parse_json(body: bytes) -> Any:
    """The JSON document in ``body``, or HTTPError 400 (limits: :mod:`offload.web.strict_json`)."""
    try:
        return strict_json.loads(body)
    except strict_json.JSONError as exc:
        raise HTTPError(400, "MalformedJSON", str(exc)) from None


def require_json(request: RequestInfo, accepted: Sequence[str] = JSON_TYPES) -> None:
    """HTTPError 415 unless the body is sent as one of ``accepted`` (UTF-8)."""
    raw = request.headers.get("content-type", "")
    media, _, parameters = raw.partition(";")
    charset_ok = True
    for parameter in parameters.split(";"):
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            charset_ok = False
    if media.strip().lower() not in accepted or not charset_ok:
        shown = " or ".join(accepted)
        raise HTTPError(415, "UnsupportedMediaType",
                        f"send the body as Content-Type: {shown} (UTF-8), not {raw or 'no Content-Type'!r}")


def allow_method(method: str, allowed: Sequence[str], also: Sequence[str] = ()) -> None:
    """HTTPError 405 (with ``Allow``) unless ``method`` is one of ``allowed`` (HEAD goes with GET)."""
    if method == "HEAD" and "GET" in allowed:
        return
    if method not in allowed:
        allow = ", ".join([*allowed, *also, "OPTIONS"])
        raise HTTPError(405, "MethodNotAllowed", f"{method} is not allowed here; use {allow}",
                        [("Allow", allow)])


def parse_task_id(raw: str) -> str:
    """``raw`` if it can be a task id (:mod:`offload.ids`), else HTTPError 400 (``BadTaskId``)."""
    if not is_task_id(raw):
        raise HTTPError(400, "BadTaskId", RULE)
    return raw


class API(Protocol):
    """What the drivers and the routes use of a :class:`offload.web.TaskAPI`."""

    off: OffloadLike
    prefix: str
    cors: CorsConfig
    authorize: Authorize | None
    max_body: int
    max_wait: float
    max_stream: float
    keepalive: float
    tasks: ExposedTasks

    def handle(self, request: RequestInfo, body: bytes) -> Handler: ...

    def check_authorized(self, request: RequestInfo, name: str) -> Generator[Step, Any, None]: ...

    def find_exposed(self, request: RequestInfo, task_id: str,
                     cancel: bool = False) -> Generator[Step, Any, Exposure]: ...

    def present(self, snap: TaskSnapshot, exposure: Exposure) -> tuple[dict[str, Any], bytes]: ...

    def start(self, task: Any, args: list[Any], kwargs: dict[str, Any]) -> Steps[str]: ...

    def snapshot(self, task_id: str, wait: float) -> Steps[TaskSnapshot]: ...

    def cancel(self, request: RequestInfo, task_id: str, terminate: bool) -> Steps[dict[str, Any]]: ...


def drive_sync(api: API, handler: Handler) -> Answer:
    """Run a handler's steps in the calling thread (WSGI); each wait is bounded by its timeout."""
    from .waiting import wait_final_sync

    value: Any = None
    error: Exception | None = None
    while True:
        try:
            step = handler.throw(error) if error is not None else handler.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            if isinstance(step, Wait):
                value = wait_final_sync(api.off, step.task_id, step.timeout)
            elif isinstance(step, FindExposure):
                value = api.off.exposures.find(step.task_id)
            else:
                value = step.fn(*step.args)
        except Exception as exc:  # handed back to the handler, which decides
            error = exc
