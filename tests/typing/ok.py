"""What a user's type checker sees of offload: every line here type-checks.

Checked by ``mypy`` (tests/test_typing.py), never imported by pytest.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Coroutine
from typing import Any

from typing_extensions import assert_type

from offload import Future, Offload
from offload.task import AsyncTask, Task
from offload.interface import OffloadLike
from offload.web import interface as web

off = Offload({"CELERY_ALWAYS_EAGER": True})


@off.task
def add(x: int, y: int) -> int:
    return x + y


@off.task(queue="high", expose=True, public_errors=(ValueError,))
def greet(name: str, *, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


@off.task(bind=True, max_retries=3)
def fetch(self: Any, url: str) -> bytes:
    return url.encode()


def square(x: float) -> float:
    return x * x


@off.task
async def double_later(x: int) -> int:
    return 2 * x


@off.task(queue="slow", expose=True)
async def label(n: int, *, unit: str = "s") -> str:
    return f"{n}{unit}"


@off.task(bind=True)
async def fetch_later(self: Any, url: str) -> bytes:
    return url.encode()


async def halve(x: float) -> float:
    return x / 2


# @off.task keeps the function: bare and with options.
typed: Task[[int, int], int] = add
assert_type(add(1, 2), int)
assert_type(add.submit(1, 2), Future[int])
assert_type(add.submit(x=1, y=2), Future[int])
assert_type(greet.submit("ada", punctuation="?"), Future[str])
assert_type(add.run(1, 2), int)
assert_type(fetch.submit("https://example.org/"), Future[bytes])  # bind=True: no self to give
assert_type(add.name, str)

# The reserved keywords: the result type is kept.
assert_type(add.submit(1, 2, queue="high"), Future[int])
assert_type(off.submit(add, 1, 2, queue="high"), Future[int])
assert_type(off.submit(add, 1, 2, on_commit=True), Future[int])

# Celery's own API stays as Celery has it (untyped).
assert_type(add.delay("not", "checked"), Any)
assert_type(add.apply_async((1, 2), countdown=5), Any)

# off.submit and off.map of a task or of a plain function.
assert_type(off.submit(add, 1, 2), Future[int])
assert_type(off.submit(square, 1.5), Future[float])
assert_type(off.submit(square, 2), Future[float])
assert_type(off.map(square, [[1.0], [2.0]]), list[Future[float]])
assert_type(off.map(add, [[1, 2], {"x": 3, "y": 4}], chunksize=8), list[Future[int]])
assert_type(off.options(countdown=1).submit(square, 3.0), Future[float])
assert_type(off.options(countdown=1).map(square, [[3.0]]), list[Future[float]])
assert_type(off.get("some-id"), Future[Any])

# async def: the worker awaits the coroutine, the future holds its result.
typed_async: AsyncTask[[int], int] = double_later
assert_type(double_later.submit(21), Future[int])
assert_type(double_later(21), int)  # calling the task runs the coroutine to its end
coroutines = [assert_type(double_later.run(21), Coroutine[Any, Any, int])]  # run: the function itself
assert_type(label.submit(3, unit="ms"), Future[str])
assert_type(label.submit(3, queue="high"), Future[str])
assert_type(fetch_later.submit("https://example.org/"), Future[bytes])
assert_type(off.submit(halve, 3.0), Future[float])
assert_type(off.submit(halve, 3.0, queue="high"), Future[float])
assert_type(off.submit(halve, 3.0, on_commit=True), Future[float])
assert_type(off.submit(double_later, 4), Future[int])
assert_type(off.map(halve, [[1.0], {"x": 2.0}]), list[Future[float]])
assert_type(off.map(double_later, [[1], [2]], chunksize=2), list[Future[int]])
assert_type(off.options(countdown=1).submit(halve, 3.0), Future[float])
assert_type(off.options(countdown=1).map(halve, [[3.0]]), list[Future[float]])

# Future is a concurrent.futures.Future of the result type.
fut = off.submit(add, 1, 2)
base: concurrent.futures.Future[int] = fut
assert_type(fut.result(timeout=1), int)
assert_type(fut.id, str)
assert_type(fut.state, str)
assert_type(fut.cancel(), bool)
for done in concurrent.futures.as_completed([fut]):
    assert_type(done, concurrent.futures.Future[int])


async def waits() -> None:
    assert_type(await fut, int)


# The executor: the standard library's types.
with off.executor() as ex:
    assert_type(ex.submit(add, 1, 2), Future[int])
    assert_type(list(ex.map(square, [1.0, 2.0])), list[float])
    assert_type(ex.submit(halve, 1.0), Future[float])


# An Offload is what the web task API, error reporting, beat and the Flask
# integration take (offload.interface: one Protocol for all, which the web
# re-exports); a member of it that drifts from Offload's fails here.
any_side: OffloadLike = off
web_side: web.OffloadLike = off
