"""The routes of the web task API, once, for every protocol.

:class:`TaskAPI` holds the configuration and answers a :class:`RequestInfo`
plus its body. A handler is a generator: it *yields* what it must wait for
(:class:`Wait` on a task, :class:`Call` of something that blocks, such as
sending to the broker) and *returns* the :class:`Response` or
:class:`EventStream`. The WSGI adapter (:mod:`offload.web.wsgi`) runs those
steps in its request thread; the ASGI adapter (:mod:`offload.web.asgi`) awaits
waits on the event loop and runs calls in a worker thread. So the routes are
written once and the ASGI side holds no thread while a request waits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Generator, Sequence
from importlib import resources
from typing import Any
from urllib.parse import quote

from celery import exceptions as celery_exceptions
from celery import states

from ..exceptions import BrokerUnavailable, ConfigurationError, _ResultStoreUnreachable
from ..exposure import Exposure
from . import strict_json
from .interface import OffloadLike
from .names import ArgumentsError, ExposedTasks
from .steps import (RPC_TYPES, TASK_NAME, Authorize, Call, EventStream, FindExposure, Handler, HTTPError, RequestInfo, Response,
                    Step, Steps, Wait, allow_method, error_response, json_response, parse_json, parse_task_id, require_json)
# Defined here once; still importable from here.
from .steps import CONTENT_LENGTH, JSON_TYPES, MAX_QUERY_FIELDS, Answer, drive_sync  # noqa: F401
from .steps import parse_query, too_many_fields  # noqa: F401
from .waiting import TaskSnapshot, compact_json, lookup

__all__ = ["Call", "EventStream", "RequestInfo", "Response", "TaskAPI", "Wait"]

logger = logging.getLogger("offload.web")

#: Celery's own failures, whose messages carry nothing of the task's data.
_CELERY_PUBLIC = (celery_exceptions.TaskRevokedError, celery_exceptions.TimeLimitExceeded,
                  celery_exceptions.SoftTimeLimitExceeded, celery_exceptions.WorkerLostError)

def _backend_errors() -> tuple[type[BaseException], ...]:
    """What reading a result backend raises when it is down or busy."""
    import sqlite3

    from ..core import CONNECTION_ERRORS

    return (*CONNECTION_ERRORS, sqlite3.OperationalError)


_BACKEND_ERRORS = _backend_errors()

class TaskAPI:
    """The HTTP API of one Offload's exposed tasks, as WSGI (``.wsgi``) and ASGI (``.asgi``).

    Parameters:
        off: the :class:`offload.Offload` whose ``expose=True`` tasks are served.
        prefix: the public path the API lives under (also when mounted in
            Flask or Pyramid: mount it at this same path).
        cors_origins: origins allowed to call from a browser
            (``"https://app.example"``); ``["*"]`` allows any, but never with
            ``cors_credentials``.
        cors_credentials: allow cookies and HTTP auth on cross-origin calls.
        cors_max_age: how long a browser may cache a preflight answer (s).
        authorize: ``authorize(request_info, task_name) -> bool``, asked before
            a task is started and before one is read (its state, result or
            events): ``task_name`` is its full Celery name; and before one is
            cancelled, with ``"task.cancel"``. For a read or a cancel,
            ``request_info.task_id`` and ``request_info.task_name`` name the
            task, so an app can tie a task to its user. False answers 403.
        max_body: the largest request body accepted (bytes); larger is 413.
        max_wait: the cap of ``?wait=`` and of JSON-RPC ``task.result`` (s).
        max_stream: how long one event stream may stay open (s); the browser
            reconnects after it. Under WSGI each open stream holds a thread.
        keepalive: seconds between keep-alive comments of an event stream.
        dashboard: also serve ``{prefix}/dashboard`` and ``{prefix}/metrics``
            (:mod:`offload.web.dashboard`): loopback clients only, unless
            ``authorize`` decides (actions ``"dashboard"``,
            ``"dashboard.revoke"``, ``"dashboard.retry"``,
            ``"dashboard.dismiss"``, ``"metrics"``).
        failed_retention: how long the dashboard lists a failed task that
            nobody dismissed (s; default a week).

    Examples:
        >>> from offload import Offload
        >>> api = TaskAPI(Offload(), prefix="/offload", cors_origins=["https://app.example"])
        >>> api.prefix, api.location("c7f6a7c5-897b-4c01-89b4-e1cc3f2a30d5")
        ('/offload', '/offload/tasks/c7f6a7c5-897b-4c01-89b4-e1cc3f2a30d5')
    """

    def __init__(self, off: OffloadLike, *, prefix: str = "/offload", cors_origins: Sequence[str] = (),
                 cors_credentials: bool = False, cors_max_age: int = 600,
                 authorize: Authorize | None = None, max_body: int = 1 << 20,
                 max_wait: float = 30.0, max_stream: float = 300.0, keepalive: float = 15.0,
                 dashboard: bool = False, failed_retention: float | None = None) -> None:
        from .cors import CorsConfig

        if not isinstance(prefix, str) or (prefix and (not prefix.startswith("/") or prefix.endswith("/"))):
            raise ConfigurationError(
                f"prefix must be a path like '/offload' (leading slash, none at the end) or '', got {prefix!r}")
        for name, value in (("max_body", max_body), ("max_wait", max_wait),
                            ("max_stream", max_stream), ("keepalive", keepalive)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}")
        if authorize is not None and not callable(authorize):
            raise ConfigurationError(f"authorize must be callable(request_info, task_name), got {authorize!r}")
        from ..hub import stores_results

        if not stores_results(off.celery.backend):
            raise ConfigurationError(
                f"the task API needs results every web process can read, and the result backend "
                f"{off.celery.conf.result_backend!r} keeps none (rpc:// sends a result only to the "
                "process that sent the task). Set CELERY_RESULT_BACKEND: 'redis://...', a "
                "database ('db+postgresql://...'), or the embedded 'sqlite://' (one machine).")
        self.off = off
        """The Offload whose exposed tasks this API serves."""
        self.prefix = prefix
        """The public path the API is mounted at (``/offload``)."""
        self.cors = CorsConfig(cors_origins, credentials=cors_credentials, max_age=cors_max_age)
        self.authorize = authorize
        """The hook ``authorize(request_info, task_name) -> bool``, or None."""
        self.max_body = int(max_body)
        """The largest request body, in bytes (larger: 413)."""
        self.max_wait = float(max_wait)
        """The cap, in seconds, of ``?wait=`` and of ``task.result``."""
        self.max_stream = float(max_stream)
        """How long, in seconds, an event stream stays open under WSGI."""
        self.keepalive = float(keepalive)
        """Seconds between an event stream's keep-alive comments."""
        self.tasks = ExposedTasks(off)
        self._wsgi: Any = None
        self._asgi: Any = None
        self._openapi: tuple[frozenset[str], dict[str, Any]] | None = None
        self.dashboard: Any = None
        if dashboard:
            from .dashboard import Dashboard

            self.dashboard = Dashboard(self, failed_retention=failed_retention)

    def __repr__(self) -> str:
        return f"<TaskAPI {self.prefix or '/'} of {self.off!r}>"

    @property
    def wsgi(self) -> Callable[..., Any]:
        """The API as a WSGI application."""
        if self._wsgi is None:
            from .wsgi import WSGIApp

            self._wsgi = WSGIApp(self)
        return self._wsgi

    @property
    def asgi(self) -> Callable[..., Any]:
        """The API as an ASGI application (needs the ``web`` extra: Starlette)."""
        if self._asgi is None:
            from .asgi import make_asgi

            self._asgi = make_asgi(self)
        return self._asgi

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of this API (made again only when the exposed tasks change)."""
        from .openapi import openapi_document

        version = self.tasks.version
        if self._openapi is None or self._openapi[0] != version:
            self._openapi = (version, openapi_document(self))
        return self._openapi[1]

    def includeme(self, config: Any) -> None:
        """Pyramid: ``config.include(api.includeme, route_prefix=api.prefix)``."""
        from pyramid.wsgi import wsgiapp2

        config.add_route("offload.web", "/*subpath")
        config.add_view(wsgiapp2(self.wsgi), route_name="offload.web")

    # Routing ----------------------------------------------------------------

    def route_path(self, full_path: str) -> str | None:
        """The path inside the API (``/tasks/x``), or None when outside the prefix."""
        if not self.prefix:
            return full_path or "/"
        if full_path == self.prefix:
            return "/"
        if full_path.startswith(self.prefix + "/"):
            return full_path[len(self.prefix):]
        return None

    def handle(self, request: RequestInfo, body: bytes) -> Handler:
        """Answer one request (a generator of steps; see the module docstring)."""
        try:
            answer = yield from self._route(request, body)
            return answer
        except HTTPError as exc:
            return error_response(exc.status, exc.kind, exc.message, exc.headers)
        except _ResultStoreUnreachable as exc:  # the call's mark could not be written: not sent
            logger.warning("task API: %s", exc)
            return error_response(503, "BackendUnavailable",
                                  "the result store is unreachable or busy; try again shortly",
                                  [("Retry-After", "2")])
        except BrokerUnavailable as exc:
            logger.warning("task API: %s", exc)
            return error_response(503, "BrokerUnavailable",
                                  "the task broker is unreachable; try again shortly",
                                  [("Retry-After", "5")])
        except _BACKEND_ERRORS as exc:
            # Reading a state, or revoking: the result backend (or the
            # broker, for a revoke) did not answer. Bad luck, not a bug.
            logger.warning("task API: result backend error: %r", exc)
            return error_response(503, "BackendUnavailable",
                                  "the result store is unreachable or busy; try again shortly",
                                  [("Retry-After", "2")])

    def _route(self, request: RequestInfo, body: bytes) -> Handler:
        path = self.route_path(request.path)
        if path is None:
            raise HTTPError(404, "NotFound", f"{request.path} is outside the API at {self.prefix}")
        method = request.method
        parts = path.strip("/").split("/")
        if parts == ["tasks", parts[-1]] and len(parts) == 2 and method == "POST":
            return (yield from self._submit(request, parts[1], body))
        if len(parts) == 2 and parts[0] == "tasks":
            self._allow(method, ("GET", "DELETE"), ("POST",))
            task_id = self.parse_task_id(parts[1])
            if method == "DELETE":
                return (yield from self._cancel(request, task_id))
            return (yield from self._status(request, task_id))
        if len(parts) == 3 and parts[0] == "tasks" and parts[2] == "events":
            self._allow(method, ("GET",))
            task_id = self.parse_task_id(parts[1])
            exposure = yield from self.find_exposed(request, task_id)
            return EventStream(task_id, exposure)
        if parts == ["rpc"]:
            self._allow(method, ("POST",))
            from .jsonrpc import handle_rpc

            require_json(request, RPC_TYPES)
            return (yield from handle_rpc(self, request, body))
        if parts == ["openapi.json"]:
            self._allow(method, ("GET",))
            return json_response(200, self.openapi())
        if self.dashboard is not None and parts[0] in ("dashboard", "metrics"):
            return (yield from self.dashboard.route(request, parts, body))
        if len(parts) == 2 and parts[0] == "static" and parts[1] in ("offload.css", "dashboard.js"):
            from .dashboard import static_file

            self._allow(method, ("GET",))
            return static_file(parts[1]) or error_response(404, "NotFound", f"no file {parts[1]}")
        if len(parts) == 2 and parts[0] == "static" and parts[1] == "offload.js":
            self._allow(method, ("GET",))
            # Public: the same for everyone. The adapters add "Vary: Origin"
            # where CORS is configured, so a cache keeps each origin's copy.
            return Response(200, offload_js(), [
                ("Content-Type", "text/javascript; charset=utf-8"), ("Cache-Control", "public, max-age=300")])
        raise HTTPError(404, "NotFound", f"no route {method} {request.path}; see {self.prefix}/openapi.json")

    _allow = staticmethod(allow_method)
    parse_task_id = staticmethod(parse_task_id)

    def location(self, task_id: str) -> str:
        """The path of a task's state under this API (the ``Location`` header)."""
        return f"{self.prefix}/tasks/{quote(task_id)}"

    # Tasks ----------------------------------------------------------------

    def find_task(self, request: RequestInfo, name: str) -> Generator[Step, Any, Any]:
        """The exposed task ``name`` the request may start, or HTTPError 404/403."""
        task = self.tasks.find(name) if TASK_NAME.fullmatch(name) else None
        if task is None:
            raise HTTPError(404, "UnknownTask",
                            f"no exposed task named {name!r}; see {self.prefix}/openapi.json")
        yield from self.check_authorized(request, task.name)
        return task

    def check_authorized(self, request: RequestInfo, name: str) -> Generator[Step, Any, None]:
        """Ask the ``authorize`` hook about ``name`` (steps); HTTPError 403 when it says no."""
        # A Call: the hook may read a session store, so under ASGI it runs
        # in a worker thread, not on the event loop.
        if self.authorize is not None and not (yield Call(self.authorize, (request, name))):
            raise HTTPError(403, "Forbidden", f"not allowed to call {name!r}")

    def find_exposed(self, request: RequestInfo, task_id: str, cancel: bool = False) -> Generator[Step, Any, Exposure]:
        """The mark of a task the request may read (or cancel), or HTTPError 404/403.

        Only tasks marked for the web (:mod:`offload.exposure`) are served:
        any other id, whether a task of the server's own or no task at all,
        answers the same 404.
        """
        exposure = self.off.exposures.known(task_id)  # no step for an id seen lately
        allowed = True
        if self.authorize is not None:
            exposure, allowed = yield Call(self._exposed_and_allowed, (request, task_id, exposure, cancel))
        elif exposure is None:
            exposure = yield FindExposure(task_id)  # read with the other requests' lookups
        if exposure is None:
            raise HTTPError(404, "UnknownTaskId",
                            f"no task {task_id!r} is served here (tasks started through this API "
                            "or submitted with expose=True only)")
        if not allowed:
            raise HTTPError(403, "Forbidden", f"not allowed to {'cancel' if cancel else 'read'} "
                                              f"task {task_id!r}")
        return exposure

    def _exposed_and_allowed(self, request: RequestInfo, task_id: str, exposure: Exposure | None,
                             cancel: bool) -> tuple[Exposure | None, bool]:
        # One Call for both: under ASGI, one trip to the thread pool.
        if exposure is None:
            exposure = self.off.exposures.find(task_id)
        if exposure is None or self.authorize is None:
            return exposure, True
        info = dataclasses.replace(request, task_id=task_id, task_name=exposure.name)
        return exposure, bool(self.authorize(info, "task.cancel" if cancel else exposure.name))

    def present(self, snap: TaskSnapshot, exposure: Exposure) -> tuple[dict[str, Any], bytes]:
        """What a client is shown of a snapshot, as an object and as JSON text.

        A failure's message is shown only for an exception type the task
        declared public (``public_errors``, :class:`offload.TaskError`);
        any other answers a generic message with the task id, its details
        left to the server's log and error reports. A result or progress
        holding NaN or an infinity, which standard JSON cannot carry,
        becomes an error saying so.
        """
        data = snap.to_json()
        if snap.exception is not None and not _is_public(snap.exception, exposure):
            data["error"] = {"type": "TaskFailed",
                             "message": f"the task failed; the details are in the server's error reports "
                                        f"(task {snap.id})"}
        try:
            return data, compact_json(data).encode()
        except ValueError:
            pass
        where = strict_json.non_finite(snap.result, "result")
        if where is not None:
            data = {"id": snap.id, "state": snap.state, "error": {
                "type": "NonFiniteResult",
                "message": f"the task's {where} is NaN or an infinity, which standard JSON cannot carry"}}
        elif "progress" in data:
            data["progress"] = None  # progress with NaN: none shown rather than non-JSON
        return data, compact_json(data).encode()

    def start(self, task: Any, args: list[Any], kwargs: dict[str, Any]) -> Steps[str]:
        """Check the arguments, then send the task; its id (steps: one Call)."""
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise HTTPError(400, "BadArguments", 'the body is {"args": [...], "kwargs": {...}}')
        where = strict_json.non_finite(args, "args") or strict_json.non_finite(kwargs, "kwargs")
        if where is not None:
            raise HTTPError(422, "BadArguments",
                            f"{where} is NaN or an infinity: the API takes finite numbers only "
                            "(standard JSON has no NaN or Infinity; 1e999999 overflows to one)")
        try:
            self.tasks.check_arguments(task, args, kwargs)
        except ArgumentsError as exc:
            raise HTTPError(422, "BadArguments", str(exc)) from None
        try:
            future = yield Call(_submit, (self.off, task, args, kwargs))
        except TypeError as exc:  # not JSON-serializable
            raise HTTPError(422, "BadArguments", str(exc)) from None
        return future.id

    def _submit(self, request: RequestInfo, name: str, body: bytes) -> Handler:
        require_json(request)
        task = yield from self.find_task(request, name)
        data = parse_json(body) if body.strip() else {}
        if not isinstance(data, dict) or set(data) - {"args", "kwargs"}:
            raise HTTPError(400, "BadArguments",
                            'the body is a JSON object {"args": [...], "kwargs": {...}} (both optional)')
        task_id = yield from self.start(task, data.get("args", []), data.get("kwargs", {}))
        location = self.location(task_id)
        return json_response(202, {"id": task_id, "state": states.PENDING, "location": location},
                             [("Location", location)])

    def wait_seconds(self, raw: str | None) -> float:
        """The ``?wait=`` query value in seconds, capped by ``max_wait``; HTTPError 400 for a bad one."""
        if raw is None or raw == "":
            return 0.0
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            raise HTTPError(400, "BadWait", f"wait is a number of seconds >= 0, got {raw!r}")
        return min(seconds, self.max_wait)

    def snapshot(self, task_id: str, wait: float) -> Steps[TaskSnapshot]:
        """The task's snapshot, waiting up to ``wait`` seconds for its end."""
        if wait > 0:
            snap = yield Wait(task_id, wait)
        else:
            snap = yield Call(lookup, (self.off, task_id))
        return snap

    def _status(self, request: RequestInfo, task_id: str) -> Handler:
        wait = self.wait_seconds(request.query.get("wait"))
        exposure = yield from self.find_exposed(request, task_id)
        snap: TaskSnapshot = yield from self.snapshot(task_id, wait)
        _, body = self.present(snap, exposure)
        return Response(200, body, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])

    def cancel(self, request: RequestInfo, task_id: str, terminate: bool) -> Steps[dict[str, Any]]:
        """Revoke a task, as ``Future.cancel`` does (``terminate`` also kills it if running); its snapshot."""
        exposure = yield from self.find_exposed(request, task_id, cancel=True)
        cancelled, snap = yield Call(_cancel, (self.off, task_id, terminate))
        data, _ = self.present(snap, exposure)
        return {**data, "cancelled": cancelled}

    def _cancel(self, request: RequestInfo, task_id: str) -> Handler:
        raw = request.query.get("terminate", "false")
        if raw not in ("true", "false"):
            raise HTTPError(400, "BadTerminate", f"terminate is true or false, got {raw!r}")
        terminate = raw == "true"
        data = yield from self.cancel(request, task_id, terminate)
        return json_response(200, data)


def _submit(off: OffloadLike, task: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return off.submit(task, *args, **kwargs)


def _cancel(off: OffloadLike, task_id: str, terminate: bool) -> tuple[bool, TaskSnapshot]:
    """Revoke as ``Future.cancel`` does; ``terminate`` also stops running work."""
    if terminate:
        off.celery.control.revoke(task_id, terminate=True)
        cancelled = True
    else:
        cancelled = bool(off.get(task_id).cancel())
    snap = lookup(off, task_id)
    if cancelled and not snap.final:
        snap = TaskSnapshot(task_id, states.REVOKED, error=("TaskRevokedError", "the task was revoked"))
    return cancelled, snap


def _is_public(exc: Any, exposure: Exposure) -> bool:
    """Whether a client may read a failure's type and message."""
    if not isinstance(exc, BaseException):
        return False  # a failure stored as some other value: its text is the task's data
    if isinstance(exc, _CELERY_PUBLIC):
        return True
    return exposure.is_public(exc)


_OFFLOAD_JS: bytes | None = None


def offload_js() -> bytes:
    """The browser client, read once from the package."""
    global _OFFLOAD_JS
    if _OFFLOAD_JS is None:
        _OFFLOAD_JS = resources.files("offload.web").joinpath("static/offload.js").read_bytes()
    return _OFFLOAD_JS
