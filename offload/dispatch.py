"""The generic dispatcher task and the allow-list.

``submit(fn, ...)`` does not pickle ``fn``: it sends a *reference*
(``module:qualname``) in a JSON message to one task, ``offload.dispatch``
(:func:`install_dispatcher`). A worker runs what a reference names only when
it is allowed (:class:`AllowList`): a function registered with ``@off.task``,
or a plain function defined inside a package of ``OFFLOAD_ALLOW``.

Resolving a reference is built so that a forged message can make the worker
run nothing but such a function:

* nothing is imported before the allow check, and afterwards only modules
  inside an allowed package (never ``__main__``, never anything else);
* attributes are read with :func:`inspect.getattr_static`, so no property,
  descriptor or module ``__getattr__`` runs while looking;
* only functions come out: a module-level function, or a static or class
  method. A class (whose constructor would run), a plain method (it would
  run with a forged ``self``: ``Klass.__init__``, ``Klass.method``), an
  instance, a module or a property is refused, as :func:`reference`
  refuses them at submit; so is any ``__main__`` module (importing one
  runs a program's entry point).

A chunk's calls (``off.map``) get their ids from the chunk message's own id
(:func:`chunk_call_ids`), and a chunk writes only results that have not
ended: a forged chunk cannot write over another task's result.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
import time
import traceback
import types
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from celery import signals, states
from celery.exceptions import TaskRevokedError

from .exceptions import ConfigurationError, NotAllowedError
# Defined with the other batched reads and writes of the result store; still importable from here.
from .result_store import batches_results, read_states, results_channel, store_results

__all__ = [
    "CHUNK_TASK", "DISPATCH_TASK", "RUNNABLE_OFFLOAD_MODULES", "AllowList", "batches_results",
    "check_allow", "chunk_call_ids", "default_allow", "dispatch_shape_error", "fail_calls", "install_chunk_dispatcher",
    "install_dispatcher", "lookup", "read_states", "reference", "refusal", "refused", "results_channel",
    "store_results",
]

logger = logging.getLogger("offload.dispatch")

#: The name of the one task that runs submitted functions.
DISPATCH_TASK = "offload.dispatch"

#: The task that runs several calls of one function from one message
#: (``off.map(fn, items, chunksize=n)``), each with a result of its own.
CHUNK_TASK = "offload.dispatch_chunk"

#: A running chunk stores the results it has, and reads again which of its
#: calls were cancelled, after this many seconds of work: a worker killed
#: mid-chunk runs again at most this much work that had ended.
CHUNK_FLUSH_SECONDS = 0.2


#: offload's own modules whose functions may be allowed: the demo's app
#: (``offload demo`` runs its functions). Nothing else of offload, and in
#: particular never its app discovery, may be named in a message.
RUNNABLE_OFFLOAD_MODULES = frozenset({"offload.demo.app"})

_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\Z")
#: A forged reference is logged; this much of it is enough to recognise it.
_LOGGED_CHARS = 200


def refusal(package: Any) -> str | None:
    """Why ``package`` may not be in the allow-list, or None when it may.

    >>> refusal("myapp"), refusal("os") is not None, refusal("offload") is not None
    (None, True, True)
    """
    if not isinstance(package, str) or not package.strip():
        return f"{package!r} is empty: an allow-list entry names a package (OFFLOAD_ALLOW = ['myapp'])"
    if not _DOTTED_NAME.match(package):
        return f"{package!r} is not a dotted module name such as 'myapp' or 'myapp.jobs'"
    root = package.partition(".")[0]
    if root == "__main__" or _is_main(package):
        return (f"{package!r} is the script being run, which a worker cannot import; "
                "move the functions into a module and allow its package")
    if root == "builtins" or root in sys.stdlib_module_names:
        return (f"{package!r} is part of Python's standard library: a forged message "
                "could then run os.system or eval on a worker")
    if root == "offload" and package not in RUNNABLE_OFFLOAD_MODULES:
        return f"{package!r} is offload itself, whose functions are not for messages to run"
    return None


def check_allow(packages: Iterable[Any]) -> tuple[str, ...]:
    """``packages`` as an allow-list, or ConfigurationError naming the first that may not be one.

    The one check of ``OFFLOAD_ALLOW``, made when settings are read and when
    an :class:`AllowList` is given its packages.
    """
    packages = tuple(packages)
    for package in packages:
        reason = refusal(package)
        if reason is not None:
            raise ConfigurationError(
                f"OFFLOAD_ALLOW: {reason}. List the packages of your own functions "
                "(OFFLOAD_ALLOW = ['myapp']) or register functions with @off.task.")
    return packages


def default_allow(module: str) -> tuple[str, ...]:
    """The allow-list when ``OFFLOAD_ALLOW`` is not set, for an app made in ``module``.

    The module's top-level package, unless that may not be allowed (the
    standard library, offload itself): then the module alone if it may be
    (``offload.demo.app``), else nothing (only ``@off.task`` functions run).
    """
    if module == "__main__":
        module = _main_module_name() or ""
    for candidate in (module.partition(".")[0], module):
        if refusal(candidate) is None:
            return (candidate,)
    return ()


def _is_main(module: str) -> bool:
    """True for a ``__main__`` module (``pkg.__main__``): importing it runs a program."""
    return module == "__main__" or module.endswith(".__main__")


def _main_module_name() -> str | None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name != "__main__" else None


def _split(ref: str) -> tuple[str, str]:
    module_name, sep, qualname = ref.partition(":")
    if not sep or not _DOTTED_NAME.match(module_name) or not _DOTTED_NAME.match(qualname):
        raise ValueError(f"not a function reference (module:qualname): {ref[:_LOGGED_CHARS]!r}")
    return module_name, qualname


def lookup(module: types.ModuleType, qualname: str) -> Any:
    """The function ``qualname`` names in ``module``, found without running code.

    Each step reads the attribute statically (:func:`inspect.getattr_static`);
    the steps before the last must be classes. What is found must be a
    function: a module-level one (plain or builtin), or a ``staticmethod``
    or ``classmethod`` of a class (the latter comes back bound to its
    class). A plain function found in a class is a method that needs an
    instance: refused, since a message could only forge one.

    Raises:
        AttributeError: when a name is missing.
        TypeError: when it names something other than a function (a class,
            an instance, a module, a property, ...).
    """
    found, owner = _walk(module, qualname)
    function = _as_function(found, owner)
    if function is None:
        raise TypeError(f"{module.__name__}:{qualname} is {_kind(found)}, not a function")
    return function


def _kind(obj: Any) -> str:
    """What ``obj`` is, for a message: "a class", "a module", "a property", ..."""
    if isinstance(obj, type):
        return "a class"
    if isinstance(obj, types.FunctionType) and "." in getattr(obj, "__qualname__", ""):
        return "a method that needs an instance (self)"
    if inspect.ismodule(obj):
        return "a module"
    return f"a {type(obj).__name__}"


def _walk(module: types.ModuleType, qualname: str) -> tuple[Any, Any]:
    """The raw object ``qualname`` names (descriptors unapplied) and its owner."""
    owner: Any = module
    parts = qualname.split(".")
    found: Any = module
    for depth, part in enumerate(parts):
        found = inspect.getattr_static(owner, part)
        if depth < len(parts) - 1:
            if not isinstance(found, type):
                raise TypeError(f"{part!r} in {qualname!r} is {_kind(found)}, not a class")
            owner = found
    return found, owner


def _as_function(found: Any, owner: Any) -> Callable[..., Any] | None:
    if isinstance(found, staticmethod):
        found = found.__func__
    elif isinstance(found, classmethod):
        func = found.__func__
        # Bound by hand: a classmethod wrapping another descriptor would run
        # that descriptor's __get__.
        if isinstance(func, types.FunctionType) and isinstance(owner, type):
            return types.MethodType(func, owner)
        return None
    elif isinstance(owner, type):
        return None  # a plain method (__init__ too): its `self` would be forged
    if isinstance(found, types.FunctionType):
        return found
    if isinstance(found, types.BuiltinFunctionType) and (
            found.__self__ is None or inspect.ismodule(found.__self__)):
        return found
    return None


def reference(fn: Callable[..., Any]) -> str:
    """The ``module:qualname`` a worker can find ``fn`` back from.

    Raises:
        TypeError: for what a worker could not or would not run: a lambda, a
            closure, a bound method of an object, a function of a script run
            as ``__main__``, or anything that is not a function (a class, a
            callable object, a ``functools.partial``).

    >>> import os.path
    >>> reference(os.path.join)
    'posixpath:join'
    """
    if inspect.iscoroutine(fn):
        name = getattr(fn, "__qualname__", "the function")
        fn.close()  # never awaited: no "coroutine was never awaited" warning later
        raise TypeError(
            f"submit() takes a function, got a coroutine object: pass the async function and its "
            f"arguments, off.submit({name}, 1, 2), not off.submit({name}(1, 2))")
    if isinstance(fn, type) or not callable(fn):
        raise TypeError(f"submit() takes a function, got {fn!r}")
    owner = getattr(fn, "__self__", None)
    if owner is not None and not inspect.ismodule(owner) and not isinstance(owner, type):
        raise TypeError(
            f"cannot submit {fn!r}: it is a method bound to an object, which a worker "
            "cannot rebuild. Submit a module-level function (or a classmethod or "
            "staticmethod) and pass the data it needs as arguments."
        )
    ref = _name(fn)
    module_name, qualname = ref.split(":", 1)
    # The function's own module: already imported, except for one whose
    # __module__ was set by hand. Submitting runs the user's code anyway.
    module = sys.modules.get(module_name)
    if getattr(fn, "__module__", None) == "__main__":
        module = sys.modules.get("__main__")
    try:
        if module is None:
            module = importlib.import_module(module_name)
        found = lookup(module, qualname)
    except TypeError as exc:
        raise TypeError(
            f"cannot submit {fn!r}: a worker runs only plain functions ({exc}). Wrap it "
            "in a module-level function, or register it with @off.task."
        ) from None
    except (ImportError, AttributeError):
        found = None
    if found is not fn and (getattr(found, "__func__", found) is not getattr(fn, "__func__", fn)
                            or getattr(found, "__self__", None) is not getattr(fn, "__self__", None)):
        raise TypeError(
            f"cannot submit {fn!r}: {ref} names a different object (was the function "
            "replaced by a decorator without functools.wraps?)"
        )
    return ref


def _name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` from ``fn``'s own names, checking only that they can work."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or ""
    if "<lambda>" in qualname:
        raise TypeError(
            "cannot submit a lambda: a worker imports the function by its name and a "
            "lambda has none. Define it with `def` at module level."
        )
    if not module or not qualname:
        raise TypeError(f"cannot submit {fn!r}: it has no module and name to import it by")
    if "<locals>" in qualname:
        raise TypeError(
            f"cannot submit {qualname!r}: it is defined inside another function (a "
            "closure), so a worker cannot import it. Move it to module level and pass "
            "what it captured as arguments."
        )
    if module == "__main__":
        module = _main_module_name()
        if module is None:
            raise TypeError(
                f"cannot submit {qualname!r}: it is defined in the script being run "
                "(__main__), which a worker cannot import. Move it into a module and "
                "import it from there."
            )
    return f"{module}:{qualname}"


def _inside(module: str, packages: Iterable[str]) -> bool:
    return any(module == pkg or module.startswith(pkg + ".") for pkg in packages)


class AllowList:
    """Which function references a worker may run.

    A reference is allowed when it names a function registered with
    ``@off.task``, or a plain function whose module (the one named and the
    one it was defined in) is inside one of ``packages``: an allowed module
    that imports ``os`` does not open ``os.system``.

    Raises:
        ConfigurationError: when a package may not be allowed (see :func:`refusal`).
    """

    def __init__(self, packages: Iterable[str]) -> None:
        self._packages: tuple[str, ...] = ()
        self.packages = tuple(packages)
        #: reference -> the objects found there that may run (the function, its task).
        self._registered: dict[str, tuple[Any, ...]] = {}
        #: reference -> the function it resolved to. Only allowed functions
        #: get here (they exist in the code, so it stays small); a static
        #: look-up costs several times a plain getattr, once per reference.
        self._resolved: dict[str, Callable[..., Any]] = {}

    @property
    def packages(self) -> tuple[str, ...]:
        """The allowed packages (``OFFLOAD_ALLOW``)."""
        return self._packages

    @packages.setter
    def packages(self, packages: Iterable[str]) -> None:
        self._packages = check_allow(packages)
        self._resolved = {}

    def register(self, fn: Callable[..., Any], task: Any = None) -> None:
        """Allow ``fn`` wherever it lives, found as itself or as its ``task``.

        ``@off.task`` replaces the module's function with the task, so a
        reference to it finds the task: both count as ``fn``.

        Raises:
            TypeError: when ``fn`` has no name a reference could use.
        """
        ref = _name(fn)
        known = self._registered.get(ref, ())
        self._registered[ref] = known + tuple(obj for obj in (fn, task) if obj is not None)
        self._resolved.pop(ref, None)

    def refusal_of(self, ref: str, defined_in: str | None = None) -> str | None:
        """Why the allow-list refuses to run ``ref``, or None: the one rule of what may run.

        ``ref`` may run when it is registered with ``@off.task``, or when its
        module is inside an allowed package and is no ``__main__``; and, once
        the function it names is found (``defined_in``: the module that
        function was defined in), when that module is inside one too. The
        worker asks before it imports anything (``defined_in=None``) and again
        with what it found (:meth:`resolve`).
        """
        module_name = ref.partition(":")[0]
        if any(_is_main(part) for part in module_name.split(".")):
            return "a __main__ module is a program's entry point, which importing runs"
        if ref in self._registered:
            return None
        if not _inside(module_name, self._packages):
            return "register it with @off.task or add its package to OFFLOAD_ALLOW"
        if defined_in is not None and not _inside(defined_in, self._packages):
            return f"it resolves to a function defined in {defined_in!r}, which is outside the allow-list"
        return None

    def is_allowed(self, ref: str) -> bool:
        """Whether ``ref`` may run as far as its name tells (:meth:`refusal_of` is None).

        :meth:`resolve` also checks what it finds there.
        """
        return self.refusal_of(ref) is None

    def resolve(self, ref: Any) -> Callable[..., Any]:
        """The function ``ref`` names, or :class:`NotAllowedError`."""
        try:
            return self._resolved[ref]
        except (KeyError, TypeError):  # TypeError: a forged unhashable reference
            pass
        function = self._resolve(ref)
        self._resolved[ref] = function
        return function

    def _resolve(self, ref: Any) -> Callable[..., Any]:
        if not isinstance(ref, str):
            raise self._refuse(ref, "a reference is a 'module:qualname' string")
        try:
            module_name, qualname = _split(ref)
        except ValueError as exc:
            raise self._refuse(ref, str(exc)) from None
        why = self.refusal_of(ref)
        if why is not None:
            raise self._refuse(ref, why)
        registered = self._registered.get(ref)
        module = sys.modules.get(module_name)
        if module is None and registered is None:
            # Allowed by package: importing it is what the allow-list permits.
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
                    raise self._refuse(ref, f"there is no module {module_name!r}") from None
                raise
        if module is None:
            raise self._refuse(ref, f"its module {module_name!r} is not imported on this worker")
        try:
            found, owner = _walk(module, qualname)
        except AttributeError:
            raise self._refuse(ref, f"{module_name!r} has no {qualname!r}") from None
        except TypeError as exc:
            raise self._refuse(ref, f"{exc}; only functions run") from None
        if registered is not None:
            return self._registered_function(ref, found, owner, registered)
        function = _as_function(found, owner)
        if function is None:
            raise self._refuse(ref, f"it names {_kind(found)}, not a function; only functions run")
        defined_in = getattr(getattr(function, "__func__", function), "__module__", None) or ""
        why = self.refusal_of(ref, defined_in)
        if why is not None:
            raise self._refuse(ref, why)
        return function

    def _registered_function(self, ref: str, found: Any, owner: Any,
                             registered: tuple[Any, ...]) -> Callable[..., Any]:
        function = _as_function(found, owner)
        for allowed in registered:
            if found is allowed:
                if function is not None:
                    return function
                # The task @off.task put in the function's place: run its
                # function, so that current_task stays the dispatcher's (with
                # the real task id).
                return found.run
            if function is not None and getattr(function, "__func__", function) is allowed:
                return function
        raise self._refuse(ref, "it no longer names the function registered with @off.task")

    def _refuse(self, ref: Any, why: str) -> NotAllowedError:
        return refused(ref, why, f" (allow-list: {self._packages})")


def refused(ref: Any, why: str, context: str = "") -> NotAllowedError:
    """The error of a worker that will not run ``ref``, logged with ``context``."""
    shown = repr(ref)[:_LOGGED_CHARS]
    logger.error("refused to run %s: %s%s", shown, why, context)
    return NotAllowedError(f"{shown} is not allowed to run on this worker: {why}")


def call(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)`` as a worker runs it.

    A coroutine function runs to its end on the process's event loop
    (:func:`offload.aio.run`). ``sys.exit()`` fails the call instead of
    ending the pool process (which would give the message back to run,
    and exit, again).
    """
    try:
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            from .aio import run

            value = run(value)
        return value
    except SystemExit as exc:
        from billiard.common import terminate_handler_fired

        if terminate_handler_fired():
            # The pool process is being stopped (a revoke with terminate, a
            # task cancelled after a broker connection loss), not the call:
            # let it go, so the worker hands the task back or marks it revoked.
            raise
        raise RuntimeError(f"{getattr(fn, '__qualname__', fn)!r} called sys.exit({exc.code!r}); "
                           "a task returns or raises instead") from None


def dispatch_shape_error(name: str, args: Any, kwargs: Any) -> str | None:
    """Why a message for ``name`` with ``args``/``kwargs`` is not one offload sends, or None.

    Only offload's dispatchers are checked (other tasks' arguments are the
    task's own business): ``offload.dispatch`` takes ``(reference, list,
    dict)``, ``offload.dispatch_chunk`` ``(reference, [[list, dict], ...])``,
    neither keyword arguments.
    """
    if name == DISPATCH_TASK:
        if not (len(args) == 3 and isinstance(args[0], str) and isinstance(args[1], list)
                and isinstance(args[2], dict) and not kwargs):
            return "offload.dispatch takes (reference, list of args, dict of kwargs)"
    elif name == CHUNK_TASK:
        if not (len(args) == 2 and isinstance(args[0], str) and not kwargs and _checked_calls(args[1])
                is not None):
            return _CHUNK_SHAPE
    return None


def install_dispatcher(app: Any, allow: AllowList) -> Any:
    """Register the ``offload.dispatch`` task on the Celery ``app``; the task.

    It runs ``allow.resolve(ref)(*args, **kwargs)`` for a message
    ``(ref, args, kwargs)``, with late acknowledgement so that a worker
    killed mid-task gives the message back.
    """

    def dispatch(ref: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run an allowed function by its ``module:qualname`` reference."""
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError("offload.dispatch takes (reference, list of args, dict of kwargs)")
        return call(allow.resolve(ref), args, kwargs)

    # shared=False: Celery would otherwise add the task to every app created
    # later in the process, and two Offloads would share one.
    return app.task(name=DISPATCH_TASK, acks_late=True, reject_on_worker_lost=True, shared=False)(dispatch)


def install_chunk_dispatcher(app: Any, allow: AllowList, call_context: Callable[
        [], contextlib.AbstractContextManager[Any]] | None = None) -> Any:
    """Register the ``offload.dispatch_chunk`` task on the Celery ``app``; the task.

    A message ``(ref, [[args, kwargs], ...])`` names one function
    (resolved once, by the same allow-list as ``offload.dispatch``) and its
    calls. Each call has its own id, made from the chunk's own task id
    (:func:`chunk_call_ids`), and its own result, stored under that id
    as if it were a task of its own: one failing call does not fail the
    others, and a call whose id already has a final state (its result, or
    REVOKED by ``Future.cancel()``) is skipped and never written over. States are read in one batch
    when the chunk starts and again at each flush; results are written in
    one batch (:func:`store_results`) every :data:`CHUNK_FLUSH_SECONDS` of
    work and at the end. The message is acknowledged late, so a worker
    killed mid-chunk gives it back and the next worker runs only the calls
    without a stored result.

    While a call runs, the task's ``request.id`` is the call's id, so that
    ``progress()`` and ``current_task.update_state()`` report on the call's
    own future; each call runs inside its own ``call_context()`` (a Flask
    app context, a Pyramid request), as a task of its own would.
    """

    def dispatch_chunk(task: Any, ref: str, calls: list[Any]) -> None:
        """Run calls of an allowed function by its ``module:qualname`` reference."""
        request = task.request
        chunk_id = request.id
        pairs = _checked_calls(calls)
        if pairs is None:
            raise TypeError(_CHUNK_SHAPE)
        checked = [(call_id, args, kwargs) for call_id, (args, kwargs)
                   in zip(chunk_call_ids(chunk_id, len(pairs)), pairs)]
        backend = app.backend
        try:
            fn = allow.resolve(ref)
        except Exception as exc:
            # Every call ends with the refusal: no future waits forever.
            _fail_unended(backend, [call_id for call_id, _, _ in checked], exc)
            raise
        ended = read_states(backend, [call_id for call_id, _, _ in checked])
        finished: list[tuple[str, str, Any, str | None]] = []
        last_flush = time.monotonic()
        for index, (call_id, args, kwargs) in enumerate(checked):
            if ended.get(call_id) in states.READY_STATES:
                continue
            request.id = call_id
            request._offload_progress_at = 0.0  # progress()'s rate limit is per call
            try:
                if call_context is None:
                    value = call(fn, args, kwargs)
                else:
                    with call_context():
                        value = call(fn, args, kwargs)
                finished.append((call_id, states.SUCCESS, value, None))
            except Exception as exc:
                logger.info("call %s of %s raised %r", call_id, ref, exc)
                finished.append((call_id, states.FAILURE, exc, traceback.format_exc()))
                # As Celery does for a failed task: error reporting (and any
                # other receiver) hears of each failed call, by its own id,
                # with (ref, args, kwargs) as offload.dispatch's arguments.
                signals.task_failure.send(sender=task, task_id=call_id, exception=exc,
                                          args=[ref, args, kwargs], kwargs={},
                                          traceback=exc.__traceback__, einfo=None)
            finally:
                request.id = chunk_id
            if time.monotonic() - last_flush >= CHUNK_FLUSH_SECONDS and index + 1 < len(checked):
                store_results(backend, finished)
                finished = []
                ended = read_states(backend, [call_id for call_id, _, _ in checked[index + 1:]])
                last_flush = time.monotonic()
        store_results(backend, finished)

    def chunk_revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
        # A chunk revoked before it ran (its ``expires`` passed while it
        # waited, or its own id revoked): Celery marks the chunk's id, which
        # no future follows; each call's own id is marked here, so that its
        # future ends REVOKED instead of waiting until the hub gives up.
        # Typed Any: compared with getattr(..., None), mypy would narrow app to "Any | None".
        sender_app: Any = getattr(sender, "app", None)
        if getattr(sender, "name", None) != CHUNK_TASK or sender_app is not app:
            return
        call_ids = _call_ids_of(request)
        if not call_ids:
            return  # a malformed chunk: nothing it names can be followed
        ended = read_states(app.backend, call_ids)
        reason = TaskRevokedError("expired" if expired else "revoked")
        store_results(app.backend, [(call_id, states.REVOKED, reason, None) for call_id in call_ids
                                    if ended.get(call_id) not in states.READY_STATES])

    # Held by the app, connected weakly: the receiver goes with its app.
    app._offload_chunk_revoked = chunk_revoked
    signals.task_revoked.connect(chunk_revoked)
    return app.task(name=CHUNK_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
                    ignore_result=True, shared=False)(dispatch_chunk)


_CHUNK_SHAPE = "offload.dispatch_chunk takes (reference, [[list of args, dict of kwargs], ...])"

#: The most calls one chunk message may carry (map sends at most 128).
_MAX_CHUNK_CALLS = 10_000


def chunk_call_ids(chunk_id: str, count: int) -> list[str]:
    """The ids of a chunk's ``count`` calls: its own task id, a dash, the call's index.

    The ids come from the message's id, not from its body: a chunk can
    write only to ids of its own, never to an arbitrary task's.

    >>> chunk_call_ids("c0ffee", 2)
    ['c0ffee-0', 'c0ffee-1']
    """
    return [f"{chunk_id}-{index}" for index in range(count)]


def _checked_calls(calls: Any) -> list[tuple[list[Any], dict[str, Any]]] | None:
    """A chunk's calls as ``(args, kwargs)`` pairs, or None when they have another shape."""
    if not isinstance(calls, list) or len(calls) > _MAX_CHUNK_CALLS:
        return None
    checked = []
    for one in calls:
        if not (isinstance(one, list) and len(one) == 2 and isinstance(one[0], list)
                and isinstance(one[1], dict)):
            return None
        checked.append((one[0], one[1]))
    return checked


def _call_ids_of(request: Any) -> list[str]:
    """The call ids of the chunk a Celery request carries; [] when it is malformed."""
    try:
        calls = _checked_calls(list(request.args)[1])
    except (TypeError, IndexError, AttributeError):
        return []
    task_id = getattr(request, "id", None)
    if calls is None or not isinstance(task_id, str):
        return []
    return chunk_call_ids(task_id, len(calls))


def _fail_unended(backend: Any, call_ids: list[str], error: BaseException) -> None:
    ended = read_states(backend, call_ids)
    store_results(backend, [(call_id, states.FAILURE, error, None) for call_id in call_ids
                            if ended.get(call_id) not in states.READY_STATES])


def fail_calls(task: Any, task_id: str, args: Any, error: BaseException) -> None:
    """When ``task`` is offload's chunk dispatcher: fail each call of the chunk that has not ended.

    For a chunk the worker gives up on (:class:`offload.intake.Request`):
    its calls' futures end with ``error`` instead of waiting.
    """
    if getattr(task, "name", None) != CHUNK_TASK or not isinstance(task_id, str):
        return
    calls = _checked_calls(list(args)[1]) if isinstance(args, (list, tuple)) and len(args) == 2 else None
    if calls:
        try:
            _fail_unended(task.backend, chunk_call_ids(task_id, len(calls)), error)
        except Exception:
            logger.warning("could not fail the calls of chunk %s", task_id, exc_info=True)
