"""The type of what ``@off.task`` returns, for the user's type checker.

At run time a task is a Celery task (a subclass of ``celery.Task`` made by
each :class:`~offload.Offload`); Celery ships no types, so that class says
nothing to a checker. :class:`Task` is the static view of it: the decorated
function's parameters ``P`` and result ``R`` kept through ``__call__`` and
``submit``, Celery's own API (``delay``, ``apply_async``, signatures) left
as Celery has it, untyped::

    @off.task
    def add(x: int, y: int) -> int: ...

    add.submit(1, 2)      # Future[int]
    add.submit("a")       # error: too few arguments, "str" is not "int"
    add.delay("a")        # Celery's API: not checked

``submit``'s reserved keywords (``queue=``, ``on_commit=``) are not the
function's own; a call that gives one is checked for its result type only.

A task of an ``async def`` function is an :class:`AsyncTask`: its worker
awaits the coroutine, so its futures hold what the coroutine returns::

    @off.task
    async def fetch(url: str) -> bytes: ...

    fetch.submit("https://example.org/")   # Future[bytes]
    fetch.run("https://example.org/")      # the coroutine, as the function gives it
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

if TYPE_CHECKING:
    from .futures import Future

__all__ = ["AsyncTask", "BoundTaskDecorator", "Task", "TaskDecorator"]

P = ParamSpec("P")
R = TypeVar("R")


class Task(Protocol[P, R]):
    """A registered task of a function ``(*P) -> R`` (see the module's docstring)."""

    #: Celery's task name (``module.function`` unless ``name=`` was given).
    name: str
    #: Callable over the HTTP task API (:mod:`offload.web`).
    expose: bool
    #: Exception types whose message the HTTP task API shows.
    public_errors: tuple[type[BaseException], ...]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, in this process (Celery's ``Task.__call__``; a coroutine is awaited)."""
        ...

    def run(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """The decorated function itself."""
        ...

    @overload
    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Future[R]: ...

    @overload
    def submit(self, *args: Any, queue: str | None, **kwargs: Any) -> Future[R]: ...

    @overload
    def submit(self, *args: Any, on_commit: bool, **kwargs: Any) -> Future[R]: ...

    def submit(self, *args: Any, **kwargs: Any) -> Future[R]:
        """Send this task to a worker; an :class:`offload.Future` of its result."""
        ...

    # Celery's API, as Celery has it (untyped).

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``Task.delay``: an ``AsyncResult``."""
        ...

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    **options: Any) -> Any:
        """Celery's ``Task.apply_async``: an ``AsyncResult``."""
        ...

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Celery's ``Task.apply``: run here, an ``EagerResult``."""
        ...

    def s(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's signature shortcut (``Task.s``)."""
        ...

    def si(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's immutable signature shortcut (``Task.si``)."""
        ...

    def signature(self, args: Any = None, *starargs: Any, **starkwargs: Any) -> Any:
        """Celery's ``Task.signature``."""
        ...

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:
        """Celery's ``AsyncResult`` for a task id."""
        ...

    def retry(self, args: Any = None, kwargs: Any = None, exc: Any = None, throw: bool = True,
              eta: Any = None, countdown: Any = None, max_retries: Any = None, **options: Any) -> Any:
        """Celery's ``Task.retry`` (inside a task bound with ``bind=True``)."""
        ...

    def update_state(self, task_id: str | None = None, state: str | None = None, meta: Any = None,
                     **kwargs: Any) -> None:
        """Celery's ``Task.update_state``."""
        ...

    @property
    def request(self) -> Any:
        """Celery's context of the running call (``Task.request``)."""
        ...

    @property
    def app(self) -> Any:
        """The Celery app the task belongs to."""
        ...

    @property
    def backend(self) -> Any:
        """The task's result backend."""
        ...


class AsyncTask(Task[P, R], Protocol[P, R]):
    """A registered task of an ``async def`` function ``(*P) -> Coroutine[..., R]``.

    Its futures, and a call of the task itself, give the coroutine's result
    (the worker runs it to its end, :mod:`offload.aio`); :meth:`run` is the
    function, which makes a coroutine.
    """

    # At run time both are the same Celery task class, which an AsyncTask is
    # a Task to every caller of submit; only run, the bare function, differs
    # (seen as a Task, its result type reads R: call run on the AsyncTask).
    def run(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:  # type: ignore[override]
        """The decorated ``async def`` function itself."""
        ...


class TaskDecorator(Protocol):
    """What ``@off.task(...)`` with options returns: applied to a function, its task."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Any:
        """Register ``fn`` as a task."""
        ...


class BoundTaskDecorator(Protocol):
    """What ``@off.task(bind=True, ...)`` returns: the function's first parameter is the task itself."""

    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[Any, P], R], /) -> Task[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Any:
        """Register ``fn`` as a task bound to itself."""
        ...
