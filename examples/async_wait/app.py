"""Seed 004: a handler that pauses until a task ends, with a timeout, and
resumes with its result or its exception, behind a middleware that keeps
working (it times each request and says so in a header).

    cd examples/async_wait && uvicorn app:app --port 8001

``/divide?x=1&y=2`` answers 0.5; ``/divide?x=1&y=0`` answers the task's
exception as an error page; ``/slow?seconds=5&timeout=1`` answers 504 and
cancels the task (it runs to its end if it had started). The coroutine holds
no thread while it waits. The task API is mounted at /offload.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from offload import Offload
from offload.web import TaskAPI

off = Offload({"OFFLOAD_DATA_DIR": os.environ.get("OFFLOAD_DATA_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "instance")})
celery = off.celery


@off.task(expose=True)
def divide(x: float, y: float) -> float:
    return x / y


@off.task(expose=True)
def slow(seconds: float) -> str:
    time.sleep(min(seconds, 60))
    return "finally"


class Timing:
    """A plain ASGI middleware: adds X-Elapsed-Ms to every answer, streamed or not."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = f"{(time.perf_counter() - started) * 1000:.0f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-elapsed-ms", elapsed)]}
            await send(message)

        await self.app(scope, receive, timed)


def _number(request: Request, name: str, default: float | None = None) -> float:
    raw = request.query_params.get(name)
    if raw is None and default is not None:
        return default
    return float(raw)  # ValueError -> 400 below


async def _pause_for(fut, timeout: float):
    """Pause this coroutine until the task ends: its result, or its exception raised here.

    Past ``timeout`` the view gives up on the answer, so the task is
    cancelled too: waiting alone never cancels (another waiter may want
    the result), and a task nobody waits for would still be queued, taking
    a worker's time later. ``cancel()`` revokes a task that has not started;
    one already running runs to its end.
    """
    try:
        return await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        cancelled = await asyncio.to_thread(fut.cancel)  # it asks the result store: off the loop
        raise GaveUp(fut.id, cancelled) from None


class GaveUp(Exception):
    """The view stopped waiting for task ``task_id``; ``cancelled``: it will not run."""

    def __init__(self, task_id: str, cancelled: bool) -> None:
        super().__init__(task_id)
        self.task_id = task_id
        self.cancelled = cancelled

    def page(self, timeout: float) -> HTMLResponse:
        fate = "it was cancelled" if self.cancelled else "it had started and runs to its end"
        return _error_page(504, "Too slow", f"no answer within {timeout:g} s from task {self.task_id}: {fate}")


def _error_page(status: int, title: str, text: str) -> HTMLResponse:
    return HTMLResponse(f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>", status_code=status)


async def divide_view(request: Request):
    try:
        x, y = _number(request, "x"), _number(request, "y")
        timeout = _number(request, "timeout", 10.0)
    except (TypeError, ValueError):
        return _error_page(400, "Bad request", "x, y and timeout are numbers")
    try:
        result = await _pause_for(divide.submit(x, y), timeout)
    except GaveUp as gave_up:
        return gave_up.page(timeout)
    except ZeroDivisionError as exc:  # the task's own exception, raised here
        return _error_page(500, "The task failed", f"{type(exc).__name__}: {exc}")
    return JSONResponse({"result": result})


async def slow_view(request: Request):
    try:
        seconds, timeout = _number(request, "seconds"), _number(request, "timeout", 10.0)
    except (TypeError, ValueError):
        return _error_page(400, "Bad request", "seconds and timeout are numbers")
    try:
        return JSONResponse({"result": await _pause_for(slow.submit(seconds), timeout)})
    except GaveUp as gave_up:
        return gave_up.page(timeout)


@contextlib.asynccontextmanager
async def lifespan(app):
    await asyncio.to_thread(off.start)  # a local worker while the app runs
    try:
        yield
    finally:
        await asyncio.to_thread(off.stop)


api = TaskAPI(off, prefix="/offload")
app = Starlette(
    routes=[Route("/divide", divide_view), Route("/slow", slow_view), Mount(api.prefix, app=api.asgi)],
    middleware=[Middleware(Timing)],
    lifespan=lifespan,
)
