"""Pyramid integration: ``config.include("offload.pyramid")``.

::

    config = Configurator(settings={"celery.broker_url": "redis://127.0.0.1:6379/0"})
    config.include("offload.pyramid")
    config.register_task(total_task)              # total_task(request, delay)
    ...
    result = request.delay_task(total_task, 5)    # a Celery AsyncResult
    request.get_task_result(result.id).ready()
    request.submit(plain_function, 1, 2)          # an offload.Future

The ``Offload`` is built from the app's settings (``celery.*`` and every other
spelling the core reads) and lives in the registry: ``config.registry.offload``
and ``request.offload``. No module global holds it, so two Pyramid apps in one
process keep two Offloads.

On a worker, every task runs inside a Pyramid environment made from the same
registry (:func:`pyramid.scripting.prepare`): a registered task gets that
``request`` as its first argument, request methods and properties added with
``config.add_request_method`` work on it, and when the app uses ``pyramid_tm``
the task runs in a transaction of ``request.tm``, committed when it returns
and aborted when it raises, as a view's would be.

Workers: ``celery -A mypkg worker`` where ``mypkg`` holds
``configure().make_celery_app()``; ``celery -A offload.pyramid worker --ini
development.ini``; or ``offload --app development.ini worker``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from kombu.exceptions import EncodeError

from .core import CONNECTION_ERRORS, Offload
from .exceptions import ConfigurationError, InvalidTaskId, OffloadError, _ResultStoreUnreachable, broker_unreachable
from .futures import Future
from .ids import check_task_id

__all__ = ["InvalidTaskId", "TaskNotRegistered", "includeme"]

#: Where the Offload lives in the registry (also ``registry.offload``).
REGISTRY_KEY = "offload"
#: Registered functions -> their Celery task, per registry.
_TASKS_KEY = "offload.pyramid.tasks"
#: The discriminator prefix of ``register_task`` actions (conflict detection).
_DISCRIMINATOR = "offload.task"
#: pyramid_tm's tween, whose transaction a task reproduces.
_TM_TWEEN = "pyramid_tm.tm_tween_factory"


class TaskNotRegistered(OffloadError, LookupError):
    """``request.delay_task`` got a function that was never registered."""


# Settings and the registry ------------------------------------------------------

def includeme(config: Any) -> None:
    """Set up offload in a Pyramid app (``config.include("offload.pyramid")``).

    Reads the app's settings into a new :class:`offload.Offload`, stores it in
    the registry, and adds the directives ``register_task`` and
    ``make_celery_app`` and the request methods ``offload``, ``delay_task``,
    ``get_task_result`` and ``submit``.

    Raises:
        ConfigurationError: a setting has a value Celery cannot use (the
            message names it and the type expected).
    """
    registry = config.registry
    if isinstance(getattr(registry, "offload", None), Offload):
        return  # included twice: one Offload per app
    # The registry's package is the app's (config.package_name, inside an
    # include, is the included module's).
    package = getattr(registry, "package_name", None) or config.package_name or "__main__"
    off = Offload(None, name=package)
    # The app's package, not this module's caller (Pyramid's include machinery),
    # decides the default allow-list and where instance/ goes.
    off.import_name = package
    off.configure(config.get_settings())
    registry[REGISTRY_KEY] = off
    registry.offload = off
    registry[_TASKS_KEY] = {}
    off.add_task_context(lambda: _task_environment(registry))
    off.add_commit_hook(_after_commit_of_current_request)

    config.add_directive("register_task", register_task)
    config.add_directive("make_celery_app", make_celery_app)
    config.add_request_method(_request_offload, "offload", reify=True)
    config.add_request_method(delay_task, "delay_task")
    config.add_request_method(get_task_result, "get_task_result")
    config.add_request_method(submit, "submit")
    config.add_exception_view(_bad_task_id, context=InvalidTaskId)


def get_offload(registry: Any) -> Offload:
    """The Offload of a Pyramid registry (``config.registry`` or ``request.registry``)."""
    off = getattr(registry, "offload", None)
    if not isinstance(off, Offload):
        raise ConfigurationError(
            "this Pyramid app has no Offload: add config.include('offload.pyramid') "
            "to its configuration")
    return off


def _request_offload(request: Any) -> Offload:
    return get_offload(request.registry)


def _bad_task_id(exc: InvalidTaskId, request: Any) -> Any:
    from pyramid.response import Response

    return Response(f"{exc}\n", status=400, content_type="text/plain", charset="utf-8")


# Directives ---------------------------------------------------------------------

def register_task(config: Any, fn: Callable[..., Any], name: str | None = None,
                  **task_options: Any) -> None:
    """Register ``fn(request, *args, **kwargs)`` as a Celery task.

    On a worker, ``fn`` gets a Pyramid request built from this app's registry
    as its first argument. ``task_options`` go to ``@off.task`` (``queue=``,
    ``schedule=``, and Celery's own task options). Two registrations under
    one name are a Pyramid configuration conflict.
    """
    from pyramid.interfaces import PHASE1_CONFIG

    if not callable(fn) or isinstance(fn, type):
        raise TypeError(f"config.register_task() takes a function, got {fn!r}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise TypeError(f"a task name is a non-empty string, got {name!r}")
    off = get_offload(config.registry)
    task_name = name or off.celery.gen_task_name(fn.__name__, fn.__module__)
    registry = config.registry

    def register() -> None:
        if task_name in off.celery.tasks:
            raise ConfigurationError(
                f"a task named {task_name!r} is already registered with this app's Celery; "
                "give one of them another name (config.register_task(fn, name=...))")
        task = off.task(_request_injecting(registry, fn), name=task_name, **task_options)
        registry[_TASKS_KEY][fn] = task

    # PHASE1: the tasks exist before the default-phase actions (views, and
    # anything else that may look them up) are executed.
    config.action((_DISCRIMINATOR, task_name), register, order=PHASE1_CONFIG)


def make_celery_app(config: Any) -> Any:
    """Commit the configuration and return the Celery app (for ``celery -A pkg worker``)."""
    config.commit()
    return get_offload(config.registry).celery


# On the worker -----------------------------------------------------------------------

def _uses_pyramid_tm(registry: Any) -> bool:
    from pyramid.interfaces import ITweens

    tweens = registry.queryUtility(ITweens)
    if tweens is None:
        return False
    names = [name for name, _factory in (tweens.explicit or tweens.implicit())]
    return _TM_TWEEN in names


@contextlib.contextmanager
def _task_environment(registry: Any) -> Iterator[Any]:
    """A request made from ``registry``, current while a task runs.

    With pyramid_tm in the app, the task runs inside ``request.tm``'s
    transaction, which is what pyramid_tm's tween gives a view: committed on
    return (aborted if doomed), aborted on an exception.
    """
    from pyramid.scripting import prepare

    with prepare(registry=registry) as env:
        request = env["request"]
        if not _uses_pyramid_tm(registry):
            yield request
            return
        manager = request.tm
        # What pyramid_tm's own helpers (is_tm_active, the tm_active view
        # predicate, request.tm in nested code) look for.
        request.environ["tm.active"] = True
        request.environ["tm.manager"] = manager
        manager.begin()
        try:
            yield request
        except BaseException:
            request.environ.pop("tm.active", None)
            manager.abort()
            raise
        request.environ.pop("tm.active", None)
        if manager.isDoomed():
            manager.abort()
        else:
            manager.commit()


def _after_commit_of_current_request(send: Callable[[], None]) -> bool:
    """``submit(..., on_commit=True)`` in a view under pyramid_tm: send once ``request.tm`` commits.

    A transaction that aborts (an exception, ``request.tm.doom()``) or whose
    commit fails sends nothing. Without a pyramid_tm transaction (no request,
    or an app without pyramid_tm) the hook declines and the task leaves at once.
    """
    from pyramid.threadlocal import get_current_request

    request = get_current_request()
    environ = getattr(request, "environ", None) or {}
    manager = environ.get("tm.manager")
    if not environ.get("tm.active") or manager is None:
        return False
    manager.get().addAfterCommitHook(lambda committed: send() if committed else None)
    return True


def _current_request(registry: Any) -> Any | None:
    from pyramid.threadlocal import get_current_request

    request = get_current_request()
    return request if request is not None and request.registry is registry else None


def _request_injecting(registry: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a task body: the current task request is passed first."""

    def run(*args: Any, **kwargs: Any) -> Any:
        request = _current_request(registry)
        if request is not None:
            return fn(request, *args, **kwargs)
        # Called outside the task context (task.run() in a test): make one.
        with _task_environment(registry) as request:
            return fn(request, *args, **kwargs)

    # Celery checks the arguments of delay() against the task's signature:
    # the signature of fn without its request.
    try:
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            params = params[1:]
        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(run, attr, getattr(fn, attr, getattr(run, attr)))
    return run


# Request methods ----------------------------------------------------------------------

def _task_for(registry: Any, fn_or_name: Callable[..., Any] | str) -> Any:
    off = get_offload(registry)
    if isinstance(fn_or_name, str):
        task = off.celery.tasks.get(fn_or_name)
        if task is not None:
            return task
    else:
        task = registry.get(_TASKS_KEY, {}).get(fn_or_name)
        if task is not None:
            return task
    what = fn_or_name if isinstance(fn_or_name, str) else getattr(fn_or_name, "__qualname__", fn_or_name)
    raise TaskNotRegistered(
        f"{what!r} is not a registered task of this app: add config.register_task({what}) "
        "to its configuration (or use request.submit() for a plain function)")


def delay_task(request: Any, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
    """Queue the registered task ``fn`` (function or name); Celery's ``AsyncResult``.

    Raises:
        TaskNotRegistered: ``fn`` was not registered with ``config.register_task``.
        TypeError: the arguments do not fit ``fn`` or are not JSON-serializable.
        BrokerUnavailable: the broker cannot be reached.
    """
    off = get_offload(request.registry)
    task = _task_for(request.registry, fn)
    if off.settings.start_local_workers:
        off.workers.ensure_started()
    try:
        return task.apply_async(args, kwargs)
    except EncodeError as exc:
        raise TypeError(f"the arguments of task {task.name!r} must be JSON-serializable: {exc}") from None
    except _ResultStoreUnreachable:  # said already, naming the store
        raise
    except CONNECTION_ERRORS as exc:
        raise broker_unreachable(off.celery, exc, f"send task {task.name!r}") from exc


def get_task_result(request: Any, task_id: str) -> Any:
    """Celery's ``AsyncResult`` for a task id (``.ready()``, ``.result``, ``.state``).

    An id the app chose (``task_id=``) is read as one Celery made, as long as
    it keeps the rule of :mod:`offload.ids`.

    Raises:
        InvalidTaskId: ``task_id`` cannot be a task id (a mistyped or forged
            URL); from a view this answers 400, as the id came from the
            client. Refused before it reaches the result backend, where it
            could only read as PENDING.
    """
    return get_offload(request.registry).celery.AsyncResult(check_task_id(task_id))


def submit(request: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
    """``request.offload.submit(fn, ...)``: run a plain (allowed) function; an :class:`offload.Future`."""
    return get_offload(request.registry).submit(fn, *args, **kwargs)


# `celery -A offload.pyramid worker --ini development.ini` ---------------------------

def _ini_from_argv(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--ini" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--ini="):
            return arg[len("--ini="):]
    return None


def _celery_from_ini() -> Any:
    """The Celery app of the Pyramid app that ``--ini`` (or ``OFFLOAD_APP``) names.

    Celery loads ``-A`` before it parses the command's options, so the ini
    file is read from the command line here; ``--ini`` is then declared as
    a preload option of that app so that Celery accepts it.
    """
    import click

    from ._boot import find_offload

    ini = _ini_from_argv(sys.argv) or os.environ.get("OFFLOAD_APP", "").strip()
    if not ini:
        raise ConfigurationError(
            "celery -A offload.pyramid needs the app's ini file: "
            "celery -A offload.pyramid worker --ini development.ini")
    off = find_offload(ini)
    preload = off.celery.user_options["preload"]
    if not any("--ini" in getattr(option, "opts", ()) for option in preload):
        preload.add(click.Option(["--ini"], help="The Pyramid app's ini file (PasteDeploy)."))
    return off.celery


def __getattr__(name: str) -> Any:
    # Lazy, so that importing offload.pyramid (config.include does) loads no app.
    if name in ("app", "celery"):
        return _celery_from_ini()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
