"""The dashboard's routes: ``{prefix}/dashboard``, a task's page, its actions, ``{prefix}/metrics``.

Written as the task API's routes are (generators of :class:`~offload.web.app.Call`
steps, driven by the WSGI and ASGI adapters). Every page is rendered on the
server (:mod:`offload.web.dashboard_html`); the browser script only swaps in
fresh sections, which arrive over server-sent events (``/dashboard/live``)
or, where those fail, by polling ``/dashboard/fragments``. The data comes
from the Offload's :class:`offload.events.Monitor`: one event receiver and
one inspect poller per process, however many browsers watch.

Who may look: with no ``authorize`` hook, loopback clients only (and never a
request that came through a proxy, which makes every client look local);
with one, the hook decides each route: ``authorize(request, action)`` with
action ``"dashboard"`` (every page and stream), ``"dashboard.revoke"``,
``"dashboard.retry"``, ``"dashboard.dismiss"`` or ``"metrics"``. A POST also
needs the page's CSRF token (a cookie the page set, sent back in the form).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections.abc import AsyncIterator, Generator, Iterator
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from celery import states

from ..dispatch import CHUNK_TASK, DISPATCH_TASK
from ..events import Monitor, TaskRecord, literal_arguments
from . import dashboard_html as page
from .interface import OffloadLike
from .steps import (API, Call, EventStream, Handler, HTTPError, RequestInfo, Response, Step, allow_method,
                    compact_json, parse_task_id)

__all__ = ["CSRF_COOKIE", "Dashboard", "is_loopback", "static_file"]

CSRF_COOKIE = "offload_csrf"

#: Headers a proxy adds: a request carrying one is not taken as local.
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host")

#: How long the first paint waits for the first inspect round (s).
FIRST_ROUND_WAIT = 3.0

#: The gap between two live updates of one stream (s): events of a burst of
#: tasks are sent together.
LIVE_GAP = 0.5

_STATIC = {"offload.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
_STATIC_CACHE: dict[str, bytes] = {}


def static_file(name: str) -> Response | None:
    """A file of ``offload/web/static`` the dashboard uses, or None."""
    kind = _STATIC.get(name)
    if kind is None:
        return None
    if name not in _STATIC_CACHE:
        _STATIC_CACHE[name] = resources.files("offload.web").joinpath(f"static/{name}").read_bytes()
    return Response(200, _STATIC_CACHE[name], [("Content-Type", kind), ("Cache-Control", "public, max-age=300")])


def is_loopback(request: RequestInfo) -> bool:
    """True for a client on this machine that did not come through a proxy."""
    if request.client is None or any(h in request.headers for h in _PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.client.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class Dashboard:
    """The dashboard of one :class:`TaskAPI` (``TaskAPI(off, dashboard=True)``)."""

    def __init__(self, api: API, *, failed_retention: float | None = None,
                 poll_interval: float | None = None) -> None:
        self.api = api
        self.off = api.off
        self.monitor: Monitor = api.off.monitor
        if failed_retention is not None:
            self.monitor.log.failed_retention = float(failed_retention)
        if poll_interval is not None:
            self.monitor.poller.interval = float(poll_interval)
        self.base = f"{api.prefix}/dashboard"
        self._rendered: dict[tuple[Any, ...], dict[str, str]] = {}

    # Routing ---------------------------------------------------------------

    def route(self, request: RequestInfo, parts: list[str], body: bytes) -> Handler:
        method = request.method
        if parts == ["metrics"]:
            allow_method(method, ("GET",))
            yield from self.check(request, "metrics")
            from .metrics import render_metrics

            text = yield Call(render_metrics, (self.monitor,))
            return Response(200, text, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                                        ("Cache-Control", "no-store")])
        rest = parts[1:]
        if rest in ([], [""]):
            allow_method(method, ("GET",))
            yield from self.check(request, "dashboard")
            return (yield from self._index(request))
        if rest == ["fragments"]:
            allow_method(method, ("GET",))
            yield from self.check(request, "dashboard")
            self.monitor.ensure_started()
            return _json(self.fragments(request.query))
        if rest == ["live"]:
            allow_method(method, ("GET",))
            yield from self.check(request, "dashboard")
            self.monitor.ensure_started()
            return EventStream("", source=_LiveStream(self, dict(request.query)))
        if len(rest) >= 2 and rest[0] == "tasks":
            task_id = parse_task_id(rest[1])
            if len(rest) == 2:
                allow_method(method, ("GET",))
                yield from self.check(request, "dashboard")
                return (yield from self._task_page(request, task_id))
            if rest[2:] == ["fragment"]:
                allow_method(method, ("GET",))
                yield from self.check(request, "dashboard")
                record = yield from self._find(task_id)
                return _json(self.task_fragments(record, task_id))
            if len(rest) == 3 and rest[2] in ("revoke", "retry", "dismiss"):
                allow_method(method, ("POST",))
                yield from self.check(request, f"dashboard.{rest[2]}")
                self.check_csrf(request, body)
                return (yield from getattr(self, f"_{rest[2]}")(request, task_id, body))
        raise HTTPError(404, "NotFound", f"no dashboard page at {request.path}")

    def check(self, request: RequestInfo, action: str) -> Generator[Step, Any, None]:
        """403 unless the request may see (or do) ``action``."""
        if self.api.authorize is None:
            if not is_loopback(request):
                raise HTTPError(403, "Forbidden", "the dashboard answers local clients only unless the "
                                "app gives TaskAPI an authorize hook")
            return
        if not (yield Call(self.api.authorize, (request, action))):
            raise HTTPError(403, "Forbidden", f"not allowed: {action}")

    def check_csrf(self, request: RequestInfo, body: bytes) -> None:
        """A POST must send back the token its page's cookie holds (a cross-site form cannot read it)."""
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            # A browser names the page a form came from: another site's is refused.
            raise HTTPError(403, "CrossOrigin", "this form was sent from another site")
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        cookie = _cookie(request, CSRF_COOKIE)
        sent = form.get("csrf", "")
        if not cookie or not sent or not hmac.compare_digest(cookie.encode(), sent.encode()):
            raise HTTPError(403, "BadCSRFToken", "this form is stale or came from another site; reload the page")

    # Pages -----------------------------------------------------------------

    def _index(self, request: RequestInfo) -> Handler:
        self.monitor.ensure_started()
        yield Call(_first_round, (self.monitor,))
        token, cookie = self._csrf(request)
        html = page.index(self.context(request.query), self.fragments(request.query), token)
        return _html(html, cookie)

    def _task_page(self, request: RequestInfo, task_id: str) -> Handler:
        self.monitor.ensure_started()
        record = yield from self._find(task_id)
        token, cookie = self._csrf(request)
        html = page.task_page(self.context(request.query), record, task_id, self.task_fragments(record, task_id),
                              token, self.in_failed(task_id))
        return _html(html, cookie)

    def _find(self, task_id: str) -> Generator[Step, Any, TaskRecord | None]:
        """The task's record from events, else what the result backend knows of it."""
        record = self.monitor.log.get(task_id)
        if record is None:
            record = yield Call(_from_backend, (self.off, task_id))
        return record

    def in_failed(self, task_id: str) -> bool:
        return any(r.id == task_id for r in self.monitor.log.failed(limit=self.monitor.log.max_failed))

    def context(self, query: Any) -> page.Context:
        return page.Context(prefix=self.api.prefix, base=self.base, mask=self.masked,
                            display_args=display_arguments)

    def masked(self, name: str | None) -> bool:
        """True when the task says ``mask_args=True`` (its arguments are never shown)."""
        task = self.off.celery.tasks.get(name) if name else None
        return bool(getattr(task, "mask_args", False))

    def fragments(self, query: Any) -> dict[str, str]:
        """The dashboard's sections, rendered (first paint, polling and the live stream).

        Rendered once per change of the data and filter, however many
        browsers ask: the last few renderings are kept.
        """
        log = self.monitor.log
        snap = self.monitor.poller.snapshot()
        name, exc = query.get("name") or None, query.get("exc") or None
        key = (log.changes.version, self.monitor.poller.changes.version, self.monitor.listener.connected,
               name, exc)
        cached = self._rendered.get(key)
        if cached is not None:
            return cached
        parts = page.sections(self.context(query), snap, log.recent(50), log.failed(name, exc),
                              log.failed_facets(), (name, exc), self.monitor.listener.connected)
        if len(self._rendered) >= 16:
            self._rendered.clear()
        self._rendered[key] = parts
        return parts

    def task_fragments(self, record: TaskRecord | None, task_id: str) -> dict[str, Any]:
        return {"detail": page.task_detail(self.context({}), record, task_id),
                "state": record.state if record else states.PENDING,
                "final": bool(record and record.final)}

    def _csrf(self, request: RequestInfo) -> tuple[str, str | None]:
        token = _cookie(request, CSRF_COOKIE)
        if token and len(token) == 43:
            return token, None
        token = secrets.token_urlsafe(32)
        return token, (f"{CSRF_COOKIE}={token}; Path={self.base}; HttpOnly; SameSite=Strict")

    # Actions ---------------------------------------------------------------

    def _revoke(self, request: RequestInfo, task_id: str, body: bytes) -> Handler:
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        terminate = form.get("terminate") == "1"
        yield Call(_revoke, (self.off, task_id, terminate))
        return _see_other(f"{self.base}/tasks/{quote(task_id)}")

    def _retry(self, request: RequestInfo, task_id: str, body: bytes) -> Handler:
        record = yield from self._find(task_id)
        if record is None or record.state != states.FAILURE:
            raise HTTPError(409, "NotFailed", "only a failed task can be retried")
        if record.retried_as:
            return _see_other(f"{self.base}/tasks/{quote(record.retried_as)}")
        new_id = yield Call(_retry, (self.off, record))
        self.monitor.log.link_retry(task_id, new_id, record.name, record.args, record.kwargs)
        return _see_other(f"{self.base}/tasks/{quote(new_id)}")

    def _dismiss(self, request: RequestInfo, task_id: str, body: bytes) -> Handler:
        found = yield Call(self.monitor.log.dismiss, (task_id,))
        return _see_other(f"{self.base}#failed" if found else f"{self.base}/tasks/{quote(task_id)}")


class _LiveStream:
    """The dashboard's (or one task's) fresh sections as server-sent events, at each change."""

    def __init__(self, dashboard: Dashboard, query: dict[str, str]) -> None:
        self.dashboard, self.query = dashboard, query
        self.task_id = query.get("task") or None
        if self.task_id is not None:
            parse_task_id(self.task_id)

    def payload(self) -> bytes:
        board = self.dashboard
        if self.task_id is not None:
            data: dict[str, Any] = board.task_fragments(board.monitor.log.get(self.task_id), self.task_id)
            if data["detail"] is None:
                data = {}
        else:
            data = board.fragments(self.query)
        return f"data: {compact_json(data)}\n\n".encode()

    def _versions(self) -> tuple[int, int]:
        monitor = self.dashboard.monitor
        return monitor.log.changes.version, monitor.poller.changes.version

    def sync(self) -> Iterator[bytes]:
        """For WSGI: holds its thread at most ``max_stream`` seconds."""
        api = self.dashboard.api
        deadline = time.monotonic() + api.max_stream
        yield b"retry: 2000\n\n"
        seen = None
        while time.monotonic() < deadline:
            now = self._versions()
            if now != seen:
                seen = now
                yield self.payload()
                time.sleep(LIVE_GAP)  # a burst of events becomes one update
                continue
            log, poller = self.dashboard.monitor.log, self.dashboard.monitor.poller
            poller.snapshot()  # a watcher keeps the rounds going
            if log.changes.wait(seen[0], min(api.keepalive, poller.interval)) == seen[0] \
                    and poller.changes.version == seen[1]:
                yield b": keep-alive\n\n"

    async def async_(self) -> AsyncIterator[bytes]:
        """For ASGI: holds no thread while it waits."""
        import asyncio

        api = self.dashboard.api
        deadline = time.monotonic() + api.max_stream
        yield b"retry: 2000\n\n"
        seen = None
        while time.monotonic() < deadline:
            now = self._versions()
            if now != seen:
                seen = now
                yield self.payload()
                await asyncio.sleep(LIVE_GAP)  # a burst of events becomes one update
                continue
            log, poller = self.dashboard.monitor.log, self.dashboard.monitor.poller
            poller.snapshot()
            if await log.changes.wait_async(seen[0], min(api.keepalive, poller.interval)) == seen[0] \
                    and poller.changes.version == seen[1]:
                yield b": keep-alive\n\n"


def _first_round(monitor: Monitor) -> None:
    poller = monitor.poller
    if poller.latest.get("at") is None:
        seen = poller.changes.version
        poller.snapshot()
        poller.changes.wait(seen, FIRST_ROUND_WAIT)


def display_arguments(record: TaskRecord) -> tuple[str | None, str | None]:
    """The arguments as the user passed them: a submitted function's are inside the dispatcher's."""
    if record.args and record.name and record.args[:2] in ("['", "('"):
        try:
            values, _ = literal_arguments(record.args, None)
        except ValueError:
            return record.args, record.kwargs
        if len(values) == 3 and isinstance(values[0], str) and values[0].replace(":", ".") == record.name:
            return repr(values[1]), repr(values[2])
    return record.args, record.kwargs


def _from_backend(off: OffloadLike, task_id: str) -> TaskRecord | None:
    """A record made from the result backend (a task this process has no events of)."""
    from ..hub import READY_STATES

    backend = off.celery.backend
    if type(backend).__name__ == "RPCBackend":
        return None  # reading rpc:// would take another client's reply
    meta = backend.get_task_meta(task_id)
    state = meta.get("status") or states.PENDING
    if state == states.PENDING and not meta.get("name"):
        return None
    record = TaskRecord(task_id, name=meta.get("name"), state=state, updated=time.time())
    result = meta.get("result")
    if state == states.FAILURE:
        if isinstance(result, dict):
            record.exception = f"{result.get('exc_type')}({result.get('exc_message')!r})"
        else:
            record.exception = repr(result)
        record.traceback = meta.get("traceback")
    elif state == "PROGRESS":
        record.progress = result
    elif state in READY_STATES:
        record.result = repr(result)
    if meta.get("args") is not None:
        record.args, record.kwargs = repr(meta.get("args")), repr(meta.get("kwargs") or {})
    done = meta.get("date_done")
    record.history.append((state, done.timestamp() if hasattr(done, "timestamp") else time.time()))
    return record


def _revoke(off: OffloadLike, task_id: str, terminate: bool) -> None:
    if terminate:
        off.celery.control.revoke(task_id, terminate=True)
    elif not off.get(task_id).cancel():
        # Started already, or a backend that records no revoke (rpc://): the
        # workers still skip it if it has not started.
        off.celery.control.revoke(task_id)


def _retry(off: OffloadLike, record: TaskRecord) -> str:
    """Send a failed task again with the same arguments; the new id."""
    if not record.name:
        raise HTTPError(409, "UnknownTask", "the task's name is not known, so it cannot be sent again")
    try:
        args, kwargs = literal_arguments(record.args, record.kwargs)
    except ValueError as exc:
        raise HTTPError(409, "ArgumentsUnknown", str(exc)) from None
    options: dict[str, Any] = {}
    if record.queue:
        options["queue"] = record.queue
    if len(args) == 3 and isinstance(args[0], str) and args[0].replace(":", ".") == record.name:
        # A submitted function: the dispatcher's message, under the function's name.
        name, options["shadow"] = DISPATCH_TASK, record.name
    elif record.name in off.celery.tasks and record.name not in (DISPATCH_TASK, CHUNK_TASK):
        name = record.name
    else:
        raise HTTPError(409, "UnknownTask", f"{record.name!r} is not a task of this app")
    return str(off.celery.send_task(name, args=args, kwargs=kwargs, **options).id)


def _cookie(request: RequestInfo, name: str) -> str | None:
    raw = request.headers.get("cookie")
    if not raw:
        return None
    jar = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


_SECURITY_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'"),
]


def _html(text: str, cookie: str | None) -> Response:
    headers = [("Content-Type", "text/html; charset=utf-8"), *_SECURITY_HEADERS]
    if cookie:
        headers.append(("Set-Cookie", cookie))
    return Response(200, text.encode("utf-8"), headers)


def _json(data: Any) -> Response:
    return Response(200, compact_json(data).encode(), [("Content-Type", "application/json"),
                                                      ("Cache-Control", "no-store")])


def _see_other(location: str) -> Response:
    return Response(303, b"", [("Location", location), ("Cache-Control", "no-store")])
