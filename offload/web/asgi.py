"""The task API as an ASGI application, on Starlette's request.

Waits (long-poll, event streams, ``task.result``) run on the event loop and
hold no thread: :mod:`offload.web.waiting` wakes them from the result
watcher. Steps that block on the network (sending a task, reading a state
once, an ``authorize`` hook) run in Starlette's thread pool; the marks of
tasks this process has not seen yet are read many at a time, in one of its
threads (:class:`_ExposureLookups`).

Cross-origin rules are :class:`offload.web.cors.CorsConfig`'s, the ones the
WSGI side applies, rather than Starlette's ``CORSMiddleware``: one policy for
both protocols, and no middleware re-wrapping ``send`` and re-parsing headers
for every answer (at thousands of long-polls ending together that wrapper
cost a fifth of the event loop's time).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from .steps import (
    API,
    CONTENT_LENGTH,
    Answer,
    EventStream,
    FindExposure,
    Handler,
    RequestInfo,
    Response,
    Wait,
    error_response,
    parse_query,
    too_many_fields,
)
from .sse import HEADERS as SSE_HEADERS
from .sse import async_events
from .waiting import wait_final

__all__ = ["ASGIApp", "make_asgi"]

logger = logging.getLogger("offload.web")


class _TooLarge(Exception):
    pass


class _ExposureLookups:
    """The mark lookups of one event loop, read together in one worker thread.

    A request for a task this process has not seen yet must read the task's
    mark from the result backend, which blocks. A thread-pool call each
    would start a worker thread per request arriving together (anyio keeps
    up to 40): here the ids asked for while one read runs wait for the
    next, which reads them all at once (:meth:`Exposures.find_many`), so one
    worker thread serves every lookup, and thousands of requests arriving
    together cost a few backend reads.
    """

    def __init__(self, exposures: Any) -> None:
        self.exposures = exposures
        self.asked: dict[str, list[asyncio.Future[Any]]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def find(self, task_id: str) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.asked.setdefault(task_id, []).append(future)
        if self.reader is None:
            self.reader = asyncio.ensure_future(self._read())
        return await future

    async def _read(self) -> None:
        try:
            while self.asked:
                batch, self.asked = self.asked, {}
                try:
                    found = await run_in_threadpool(self.exposures.find_many, list(batch))
                except Exception as exc:  # each request's handler decides, as with a Call
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for task_id, futures in batch.items():
                    for future in futures:
                        if not future.done():  # not cancelled (its client left)
                            future.set_result(found.get(task_id))
        finally:
            self.reader = None
            for futures in self.asked.values():  # only when the loop itself is closing
                for future in futures:
                    future.cancel()
            self.asked = {}


_LOOKUPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _ExposureLookups]] = (
    weakref.WeakKeyDictionary())


def _find_exposure(api: API, task_id: str) -> Awaitable[Any]:
    exposures = api.off.exposures
    per_loop = _LOOKUPS.setdefault(asyncio.get_running_loop(), {})
    lookups = per_loop.get(id(exposures))
    if lookups is None or lookups.exposures is not exposures:
        lookups = per_loop[id(exposures)] = _ExposureLookups(exposures)
    return lookups.find(task_id)


async def drive_async(api: API, handler: Handler) -> Answer:
    """Run a handler's steps: waits on the loop, blocking calls in a thread."""
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
                value = await wait_final(api.off, step.task_id, step.timeout)
            elif isinstance(step, FindExposure):
                value = await _find_exposure(api, step.task_id)
            else:
                value = await run_in_threadpool(step.fn, *step.args)
        except Exception as exc:  # handed back to the handler, which decides
            error = exc


class ASGIApp:
    """``api.asgi``: the routes of a :class:`TaskAPI` over ASGI, CORS included."""

    def __init__(self, api: API) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        method = request.method
        origin = request.headers.get("origin")
        cors = self.api.cors
        if method == "OPTIONS":
            if origin is not None and "access-control-request-method" in request.headers:
                status, out = cors.preflight(origin, request.headers)
                response: Any = _PlainResponse(Response(status, b"", out))
            else:
                response = _PlainResponse(Response(204, b"", [("Allow", "GET, POST, DELETE, OPTIONS")]),
                                          cors.simple(origin))
            await response(scope, receive, send)
            return
        try:
            body = await self._read_body(request)
        except _TooLarge:
            response = error_response(413, "TooLarge", f"the body is over {self.api.max_body} bytes")
        except ValueError:
            response = error_response(400, "BadContentLength", "Content-Length is not a number of bytes (digits only)")
        except ClientDisconnect:
            return
        else:
            response = await self._answer(scope, request, body)
        if isinstance(response, EventStream):
            response = _EventStreamResponse(self.api, response, cors.simple(origin))
        else:
            response = _PlainResponse(response, cors.simple(origin))
        await response(scope, receive, send)

    async def _answer(self, scope: Scope, request: Request, body: bytes) -> Answer:
        root = scope.get("root_path", "")
        path = scope["path"] if scope["path"].startswith(root) else root + scope["path"]
        query = parse_query(scope.get("query_string", b"").decode("latin-1"))
        if query is None:
            return too_many_fields()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client = request.client.host if request.client else None
        info = RequestInfo(request.method, path, query, headers, client, scope)
        try:
            answer = await drive_async(self.api, self.api.handle(info, body))
        except Exception:  # a bug or a hook's error: logged here, never shown
            logger.exception("task API: error answering %s %s", request.method, path)
            answer = error_response(500, "InternalError", "the server could not answer; see its log")
        return answer

    async def _read_body(self, request: Request) -> bytes:
        if request.method not in ("POST", "PUT", "PATCH"):
            return b""
        limit = self.api.max_body
        raw = request.headers.get("content-length")
        if raw is not None:
            if not CONTENT_LENGTH.fullmatch(raw.strip()):
                raise ValueError(raw)
            if int(raw) > limit:
                raise _TooLarge
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # chunked, or a Content-Length that lied
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)


#: Headers as ASGI sends them, by ``(name, value)``: the API's answers repeat
#: a few (``Content-Type``, ``Cache-Control``, CORS), encoded once each.
_ENCODED: dict[tuple[str, str], tuple[bytes, bytes]] = {}
_ENCODED_MAX = 256


def _encoded(*groups: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    out = []
    for headers in groups:
        for header in headers:
            encoded = _ENCODED.get(header)
            if encoded is None:
                name, value = header
                encoded = (name.lower().encode("latin-1"), value.encode("latin-1"))
                if len(_ENCODED) < _ENCODED_MAX:  # the first few seen: the constant ones
                    _ENCODED[header] = encoded
            out.append(encoded)
    return out


class _EventStreamResponse:
    """Sends a task's server-sent events; stops following when the client leaves.

    Not Starlette's ``StreamingResponse``: that one runs an anyio task group
    per response, which at thousands of open streams costs more than the
    events themselves. Here one plain task waits for ``http.disconnect``
    beside the stream.
    """

    def __init__(self, api: API, stream: EventStream, extra: list[tuple[str, str]]) -> None:
        self.api, self.stream, self.extra = api, stream, extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.current_task()

        async def hang_up() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if stream is not None:
                stream.cancel()

        watcher = asyncio.ensure_future(hang_up())
        headers = _encoded(SSE_HEADERS, self.extra)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            source = self.stream.source
            chunks = source.async_() if source is not None else async_events(self.api, self.stream.task_id, self.stream.exposure)
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if watcher.done():  # the client left: nothing more to send
                return
            raise
        except OSError:  # the connection broke while sending
            return
        finally:
            watcher.cancel()


class _PlainResponse:
    """A whole answer sent as two ASGI messages.

    Starlette's ``Response`` would rebuild and re-check headers that
    :mod:`offload.web.app` already made; at thousands of long-polls ending
    together, that per-answer work is what the clients wait on.
    """

    def __init__(self, response: Response, extra: Sequence[tuple[str, str]] = ()) -> None:
        self.status = response.status
        self.body = response.body
        self.headers = _encoded(response.headers, extra)
        self.headers.append((b"content-length", str(len(self.body)).encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else self.body})


def make_asgi(api: API) -> ASGIApp:
    """``api.asgi``."""
    return ASGIApp(api)
