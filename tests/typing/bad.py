"""What a user's type checker must refuse: each ``# E:`` line is one error.

tests/test_typing.py runs mypy on this file and expects exactly these
errors, on exactly these lines (the text after ``# E:`` is part of mypy's
message).
"""

from __future__ import annotations

from typing import Any

from offload import Future, Offload
from offload.errors import setup

off = Offload({"CELERY_ALWAYS_EAGER": True})


@off.task
def add(x: int, y: int) -> int:
    return x + y


@off.task(expose=True)
def greet(name: str) -> str:
    return f"hello {name}"


@off.task(bind=True)
def fetch(self: Any, url: str) -> bytes:
    return url.encode()


def square(x: float) -> float:
    return x * x


@off.task
async def double_later(x: int) -> int:
    return 2 * x


async def halve(x: float) -> float:
    return x / 2


# Wrong arguments for the function (submit's overloads: the reserved
# keywords' fallback has no checked arguments, so mypy names no variant).
add.submit("a", 2)  # E: No overload variant of "submit" of "Task" matches argument types "str", "int"
add.submit(1)  # E: No overload variant of "submit" of "Task" matches argument type "int"
add.submit(1, 2, 3)  # E: No overload variant of "submit" of "Task" matches argument types "int", "int", "int"
add.submit(1, z=2)  # E: No overload variant of "submit" of "Task" matches argument types "int", "int"
greet.submit(1)  # E: No overload variant of "submit" of "Task" matches argument type "int"
off.submit(add, "a", 2)  # E: No overload variant of "submit" of "Offload" matches argument types "Task[[int, int], int]", "str", "int"
off.submit(square, "x")  # E: No overload variant of "submit" of "Offload" matches argument types "Callable[[float], float]", "str"
off.submit(square)  # E: No overload variant of "submit" of "Offload" matches argument type "Callable[[float], float]"
off.options(countdown=1).submit(square, "x")  # E: No overload variant of "submit" of "_Submitter"
off.executor().submit(square, "x")  # E: No overload variant of "submit" of "Executor" matches argument types "Callable[[float], float]", "str"
fetch.submit(None, "https://example.org/")  # E: No overload variant of "submit" of "Task" matches argument types "None", "str"
add("a", 2)  # E: Argument 1 to "__call__" of "Task" has incompatible type "str"; expected "int"

# The result type flows into the future.
text: Future[str] = add.submit(1, 2)  # E: Incompatible types in assignment (expression has type "Future[int]", variable has type "Future[str]")
number: int = add.submit(1, 2).result() + "1"  # E: Unsupported operand types for + ("int" and "str")
labels: list[Future[str]] = off.map(square, [[1.0]])  # E: Argument 1 to "map" of "Offload" has incompatible type "Callable[[float], float]"
off.map(square, [[1.0]], chunksize="4")  # E: No overload variant of "map" of "Offload" matches argument types "Callable[[float], float]", "list[list[float]]", "str"

# A task is not a bag of anything.
add.name()  # E: "str" not callable
add.no_such_thing  # E: "Task[[int, int], int]" has no attribute "no_such_thing"

# An async def task is typed by what its coroutine returns, and checks its arguments.
double_later.submit("a")  # E: No overload variant of "submit" of "Task" matches argument type "str"
off.submit(halve, "x")  # E: No overload variant of "submit" of "Offload" matches argument types "Callable[[float], Coroutine[Any, Any, float]]", "str"
half: str = off.submit(halve, 1.0).result()  # E: Incompatible types in assignment (expression has type "float", variable has type "str")
awaited: str = double_later.submit(1).result()  # E: Incompatible types in assignment (expression has type "int", variable has type "str")
halves: list[Future[str]] = off.map(halve, [[1.0]])  # E: Argument 1 to "map" of "Offload" has incompatible type "Callable[[float], Coroutine[Any, Any, float]]"; expected "Callable[..., Coroutine[Any, Any, str]]"
double_later.submit(1, 2)  # E: No overload variant of "submit" of "Task" matches argument types "int", "int"
not_awaited: Future[int] = double_later.run(1)  # E: Incompatible types in assignment (expression has type "Coroutine[Any, Any, int]", variable has type "Future[int]")

# What offload's services take is an Offload (offload.interface.OffloadLike), not its settings.
setup({"CELERY_BROKER_URL": "redis://"})  # E: Argument 1 to "setup" has incompatible type "dict[str, str]"; expected "OffloadLike"
