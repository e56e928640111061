"""The worker side of :class:`offload.django.TaskBackend`: one Celery task runs them all.

A message names a Django task by ``module:qualname`` with its arguments
and the options it was enqueued with. The worker runs it only if what that
name holds is a ``Task`` (what Django's ``@task`` makes): a plain function,
a class or anything else a forged message may name is refused, logged and
never called. A module not imported yet is imported only when it belongs
to an installed app (that is what Django itself would import).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any

from ..dispatch import refused as _refuse

__all__ = ["RUN_TASK", "install_runner", "resolve_task"]

#: The Celery task that runs Django tasks.
RUN_TASK = "offload.django.run"

_REFERENCE = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\Z")


def _installed_app_of(module_name: str) -> str | None:
    from django.apps import apps

    for config in apps.get_app_configs():
        if module_name == config.name or module_name.startswith(config.name + "."):
            return config.name
    return None


def resolve_task(ref: Any) -> Any:
    """The Django ``Task`` that ``ref`` (``module:qualname``) names, or :class:`offload.NotAllowedError`.

    Nothing runs while looking: attributes are read statically
    (:func:`inspect.getattr_static`), and only modules of installed apps
    are imported.
    """
    from ._compat import Task

    match = _REFERENCE.match(ref) if isinstance(ref, str) else None
    if match is None:
        raise _refuse(ref, "a Django task is named 'module:qualname'")
    module_name, qualname = match.groups()
    module = sys.modules.get(module_name)
    if module is None:
        if _installed_app_of(module_name) is None:
            raise _refuse(ref, f"{module_name!r} is not a module of an installed app")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
                raise _refuse(ref, f"there is no module {module_name!r}") from None
            raise
    found: Any = module
    try:
        for part in qualname.split("."):
            found = inspect.getattr_static(found, part)
    except AttributeError:
        raise _refuse(ref, f"{module_name!r} has no {qualname!r}") from None
    if not isinstance(found, Task):
        raise _refuse(ref, f"it names a {type(found).__name__}, not a function declared with @task")
    func = found.func
    if (getattr(func, "__module__", None), getattr(func, "__qualname__", None)) != (module_name, qualname):
        raise _refuse(ref, "the @task found there wraps another function")
    return found


def install_runner(off: Any) -> Any:
    """Register :data:`RUN_TASK` on ``off.celery``; the task."""

    def run(self: Any, ref: str, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]) -> Any:
        """Run a Django task enqueued with offload.django.TaskBackend."""
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(options, dict):
            raise TypeError(f"{RUN_TASK} takes (reference, list of args, dict of kwargs, dict of options)")
        task = resolve_task(ref)
        from .attempt import run_attempt

        return run_attempt(off, task, self.request, args, kwargs, options)

    return off.celery.task(name=RUN_TASK, bind=True, shared=False)(run)
