"""The generic dispatcher task and the allow-list.

``submit(fn, ...)`` does not pickle ``fn``: it sends a *reference*
(``module:qualname``) in a JSON message to one task, ``offload.dispatch``.
The worker imports the reference only if it is allowed: a function registered
with ``@off.task``, or one defined inside a package of the allow-list. A
forged message naming ``os:system`` is refused and logged, never run.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

from .exceptions import NotAllowedError

__all__ = ["DISPATCH_TASK", "AllowList", "reference"]

logger = logging.getLogger("offload.dispatch")

#: The name of the one task that runs submitted functions.
DISPATCH_TASK = "offload.dispatch"


def _main_module_name() -> str | None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name != "__main__" else None


def reference(fn: Callable[..., Any]) -> str:
    """The ``module:qualname`` a worker can import ``fn`` back from.

    Raises:
        TypeError: for what a worker could not import: a lambda, a closure, a
            bound method of an object, a function of a script run as
            ``__main__``, or anything that is not a function.

    >>> import os.path
    >>> reference(os.path.join)
    'posixpath:join'
    """
    if isinstance(fn, type) or not callable(fn):
        raise TypeError(f"submit() takes a function, got {fn!r}")
    owner = getattr(fn, "__self__", None)
    if owner is not None and not inspect.ismodule(owner) and not isinstance(owner, type):
        raise TypeError(
            f"cannot submit {fn!r}: it is a method bound to an object, which a worker "
            "cannot rebuild. Submit a module-level function (or a classmethod or "
            "staticmethod) and pass the data it needs as arguments."
        )
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
    ref = f"{module}:{qualname}"
    try:
        found = resolve(ref)
    except (ImportError, AttributeError):
        found = None
    if found is not fn and getattr(found, "__func__", found) is not getattr(fn, "__func__", fn):
        raise TypeError(
            f"cannot submit {fn!r}: importing {ref} gives a different object (was the "
            "function replaced by a decorator without functools.wraps?)"
        )
    return ref


def resolve(ref: str) -> Any:
    """Import the object a ``module:qualname`` reference names."""
    module_name, sep, qualname = ref.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"not a function reference (module:qualname): {ref!r}")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _inside(module: str, packages: Iterable[str]) -> bool:
    return any(module == pkg or module.startswith(pkg + ".") for pkg in packages)


class AllowList:
    """Which function references a worker may run.

    A reference is allowed when it names a function registered with
    ``@off.task`` or when both the module it is imported from and the module
    the function was defined in are inside one of ``packages`` (so an allowed
    module that happens to import ``os`` does not open ``os.system``).
    """

    def __init__(self, packages: Iterable[str]) -> None:
        self.packages: tuple[str, ...] = tuple(p for p in packages if p)
        self._registered: set[str] = set()

    def register(self, fn: Callable[..., Any]) -> None:
        """Allow one function wherever it lives."""
        try:
            self._registered.add(reference(fn))
        except TypeError:
            pass

    def is_allowed(self, ref: str) -> bool:
        module = ref.partition(":")[0]
        return ref in self._registered or _inside(module, self.packages)

    def resolve(self, ref: Any) -> Callable[..., Any]:
        """The function ``ref`` names, or :class:`NotAllowedError`."""
        if not isinstance(ref, str) or not self.is_allowed(ref):
            logger.error("refused to run %r: not in the allow-list %s", ref, self.packages)
            raise NotAllowedError(
                f"{ref!r} is not allowed to run on this worker: register it with "
                "@off.task or add its package to OFFLOAD_ALLOW"
            )
        fn = resolve(ref)
        defined_in = getattr(getattr(fn, "__func__", fn), "__module__", None) or ""
        if ref not in self._registered and not _inside(defined_in, self.packages):
            logger.error("refused to run %r: defined in %r, outside the allow-list", ref, defined_in)
            raise NotAllowedError(
                f"{ref!r} resolves to a function defined in {defined_in!r}, which is "
                "outside the allow-list"
            )
        if not callable(fn):
            raise NotAllowedError(f"{ref!r} is not callable")
        return fn
