"""Finding the user's Offload from a spec, for the CLI and for worker processes.

``celery -A offload._boot:app worker`` imports this module; its ``app`` is the
Celery app of the Offload that ``OFFLOAD_APP`` (else ``FLASK_APP``) names. The
``offload`` CLI and :mod:`offload.workers` use the same :func:`find_offload`,
so a worker process finds the app exactly the way the command line does:

* ``module`` or ``module:attr``: an ``Offload``; a Flask app (its Offload is
  the one :func:`offload.flask.init_app` registered); or an app factory (called without arguments);
  a bare module is scanned for an ``Offload``, then a Flask app, then a
  ``create_app``/``make_app`` factory;
* ``path/to/file.py[:attr]``: the same, importing the file's module;
* ``path/to/settings.ini[#name]``: a Pyramid app loaded with ``pyramid.paster``,
  its Offload found in the registry.

When ``OFFLOAD_PARENT_PID`` is set (local workers started by
:class:`offload.workers.LocalWorkers`), importing this module also starts the
watchdog that takes the worker down when the process that started it is gone.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import json
import os
import signal
import sys
import threading
from types import ModuleType
from typing import Any

from .exceptions import ConfigurationError
from .frameworks import FACTORY_NAMES, is_flask_app, offload_of

__all__ = ["AppNotFound", "find_offload", "spec_from_env"]
#: Attribute names a bare module is searched for first.
APP_NAMES = ("off", "offload", "app", "application")

#: Seconds between two checks of the parent pid, and seconds a warm shutdown
#: gets before the worker's whole process group is killed. Together they keep
#: "the parent died" -> "no worker left" well under ten seconds.
WATCHDOG_INTERVAL = 0.5
WATCHDOG_GRACE = 6.0


class AppNotFound(ConfigurationError):
    """No Offload could be found from the given spec; the message says what was tried."""


def _is_offload(obj: Any) -> bool:
    from .core import Offload

    return isinstance(obj, Offload)


def _owner(obj: Any) -> Any | None:
    """The Offload whose Celery app ``obj`` is, when it says so (``celery = offload.errors.celery``)."""
    from celery import Celery

    owner = getattr(obj, "offload", None) if isinstance(obj, Celery) else None
    return owner if _is_offload(owner) else None


def _is_wsgi_app(obj: Any) -> bool:
    import inspect

    try:
        names = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["environ", "start_response"]


def _from_object(obj: Any, where: str, tried: list[str], call: bool = True) -> Any | None:
    """The Offload ``obj`` is or holds (Flask app, factory), else None."""
    if _is_offload(obj):
        return obj
    if _owner(obj) is not None:
        return _owner(obj)
    if is_flask_app(obj):
        found = offload_of(obj)
        if _is_offload(found):
            return found
        tried.append(f"{where} is a Flask app, but no Offload is registered on it "
                     "(call off.init_app(app) in it)")
        return None
    if call and _is_wsgi_app(obj):
        tried.append(f"{where} is a WSGI app (it takes environ, start_response), not an Offload "
                     "or an app factory: name the module alone (--app "
                     f"{where.partition(':')[0]}) or the Offload (or Celery app) in it")
        return None
    if call and callable(obj) and not isinstance(obj, type):
        try:
            inspect.signature(obj).bind()
        except TypeError as exc:
            tried.append(f"{where}() could not be called without arguments: {exc}")
            return None
        except ValueError:  # no signature to read (a builtin): let the call say
            pass
        try:
            made = obj()
        except Exception as exc:
            # The factory's own bug: shown as it is, with its traceback.
            if sys.version_info >= (3, 11):  # no notes on Python 3.10: the traceback still shows where
                exc.add_note(f"(raised inside the app factory {where}(), called to find the Offload)")
            raise
        return _from_object(made, f"{where}()", tried, call=False)
    tried.append(f"{where} is {type(obj).__name__}, not an Offload, a Flask app or an app factory")
    return None


def _scan_module(module: ModuleType, tried: list[str]) -> Any | None:
    name = module.__name__
    for attr in APP_NAMES:
        obj = getattr(module, attr, None)
        if obj is not None and (_is_offload(obj) or is_flask_app(obj)):
            return _from_object(obj, f"{name}:{attr}", tried, call=False)
    offloads = [v for v in vars(module).values() if _is_offload(v)]
    offloads = offloads or [o for o in map(_owner, vars(module).values()) if o is not None]
    if len({id(v) for v in offloads}) == 1:
        return offloads[0]
    if offloads:
        tried.append(f"{name} holds several Offload objects; name one as {name}:attr")
        return None
    flasks = [v for v in vars(module).values() if is_flask_app(v)]
    if len({id(v) for v in flasks}) == 1:
        return _from_object(flasks[0], f"{name} (its Flask app)", tried, call=False)
    for attr in FACTORY_NAMES:
        factory = getattr(module, attr, None)
        if callable(factory):
            return _from_object(factory, f"{name}:{attr}", tried)
    tried.append(f"module {name} has no Offload, Flask app or {'/'.join(FACTORY_NAMES)} factory")
    return None


def _import(module_name: str, tried: list[str]) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        # Only "this very module is missing" means the spec is wrong; an
        # ImportError raised *inside* the user's module is their bug, shown as is.
        missing = getattr(exc, "name", None)
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            tried.append(f"import {module_name!r}: no such module (searched from {os.getcwd()})")
            return None
        raise


def _from_ini(path: str, tried: list[str]) -> Any | None:
    path, _, name = path.partition("#")
    if not os.path.isfile(path):
        tried.append(f"{path}: no such ini file")
        return None
    try:
        from pyramid.paster import bootstrap
    except ImportError:
        tried.append(f"{path} is an ini file, but Pyramid is not installed (pip install offload[pyramid])")
        return None
    env = bootstrap(f"{os.path.abspath(path)}#{name or 'main'}")
    registry = env["registry"]
    # Duck-typed: offload.pyramid keeps its Offload in the registry under
    # "offload" (a dict key or an attribute); scan the values as a fallback.
    for candidate in (_safe_get(registry, "offload"), getattr(registry, "offload", None)):
        if _is_offload(candidate):
            return candidate
    values = registry.values() if hasattr(registry, "values") else ()
    for value in values:
        if _is_offload(value):
            return value
    tried.append(f"{path}: the Pyramid app loads, but its registry holds no Offload "
                 "(add config.include('offload.pyramid') to its main())")
    return None


def _safe_get(mapping: Any, key: str) -> Any:
    try:
        return mapping[key]
    except (KeyError, TypeError):
        return None


def find_offload(spec: str) -> Any:
    """The Offload a spec names (see the module docstring for the forms).

    Raises:
        AppNotFound: with every attempt and how to fix the spec.

    >>> find_offload("myproject.tasks:off")  # doctest: +SKIP
    <Offload myproject.tasks broker='redis://...'>
    """
    spec = spec.strip()
    tried: list[str] = []
    # Like `celery -A` and `flask --app`: the current directory is importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    found = None
    if spec.partition("#")[0].endswith(".ini"):
        found = _from_ini(spec, tried)
    else:
        module_name, _, attr = spec.partition(":")
        if module_name.endswith(".py"):
            folder, filename = os.path.split(os.path.abspath(module_name))
            if folder not in sys.path:
                sys.path.insert(0, folder)
            module_name = filename[:-3]
        module = _import(module_name, tried) if module_name else None
        if not module_name:
            tried.append(f"{spec!r} names no module")
        elif module is not None and attr:
            call = attr.endswith("()")
            attr = attr[:-2] if call else attr
            if not hasattr(module, attr):
                tried.append(f"module {module_name} has no attribute {attr!r}")
            else:
                found = _from_object(getattr(module, attr), f"{module_name}:{attr}", tried)
        elif module is not None:
            found = _scan_module(module, tried)
    if found is None:
        raise AppNotFound(
            f"could not find an Offload from {spec!r}:\n  - " + "\n  - ".join(tried) + "\n"
            "Point to it with --app (or OFFLOAD_APP) as module:attr naming an Offload, "
            "a Flask app or app factory (module:create_app), or a Pyramid ini file, "
            "e.g. `offload --app myproject.tasks:off status`."
        )
    return found


def spec_from_env() -> str | None:
    """``OFFLOAD_APP``, else ``FLASK_APP``, else None."""
    for key in ("OFFLOAD_APP", "FLASK_APP"):
        value = os.environ.get(key, "").strip()
        if value:
            return value
    return None


def _flask_autodetect() -> Any | None:
    """Flask's own discovery (``wsgi.py``/``app.py`` in the current folder)."""
    try:
        from flask.cli import NoAppException, ScriptInfo
    except ImportError:
        return None
    try:
        app = ScriptInfo().load_app()
    except NoAppException:
        return None
    found = offload_of(app)
    return found if _is_offload(found) else None


def load_default() -> Any:
    """The Offload from the environment (``OFFLOAD_APP``, ``FLASK_APP``, Flask's detection)."""
    spec = spec_from_env()
    if spec:
        return find_offload(spec)
    found = _flask_autodetect()
    if found is None:
        raise AppNotFound(
            "no app given: pass --app module:attr (an Offload, a Flask app or factory, "
            "or a Pyramid .ini file) or set OFFLOAD_APP (or FLASK_APP)."
        )
    return found


# The worker side ----------------------------------------------------------------

def _watch_parent(parent_pid: int) -> None:
    """Take this worker down once the process that started it has gone.

    Runs as a daemon thread in the worker's main process. A changed
    ``getppid()`` means the parent died (we were reparented), whatever killed
    it, SIGKILL included. First a warm shutdown (SIGTERM: Celery finishes or
    gives back the running tasks), then SIGKILL to the whole process group so
    that pool processes and anything the tasks spawned go too.
    """
    stop = threading.Event()
    while os.getppid() == parent_pid:
        stop.wait(WATCHDOG_INTERVAL)
    # An idle worker's warm shutdown ends this process (and this thread)
    # before the grace period is over; what its tasks started must go all
    # the same, so the group is killed on the way out too.
    atexit.register(_kill_group)
    os.kill(os.getpid(), signal.SIGTERM)
    stop.wait(WATCHDOG_GRACE)
    _kill_group()


def _kill_group() -> None:
    """SIGKILL this process's whole group, this process included."""
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _start_watchdog() -> None:
    # Popped, so that pool processes and programs the tasks run do not
    # inherit it; and only a group leader (LocalWorkers starts each worker in
    # a session of its own) watches, so a stray copy can never kill a group
    # that is not its own.
    value = os.environ.pop("OFFLOAD_PARENT_PID", "")
    if not value.isdigit() or os.getpgid(0) != os.getpid():
        return
    threading.Thread(target=_watch_parent, args=(int(value),), name="offload-parent-watchdog",
                     daemon=True).start()


def apply_starter_settings(off: Any) -> Any:
    """Configure ``off`` with the settings of the process that started this worker.

    :class:`offload.workers.LocalWorkers` names a file of them in
    ``OFFLOAD_SETTINGS_FILE``: the config of the Offload that called
    ``off.start()``, which replaces what importing the app here built (a
    factory knows nothing of what a script set in ``app.config``). Only the
    settings JSON could not carry (``kept``) stay as the import made them.
    A Flask app's config gets the starter's values too, so that
    ``current_app.config`` in a task reads what the script set. Without the
    variable ``off`` is left as is.
    """
    from .config import is_setting

    path = os.environ.pop("OFFLOAD_SETTINGS_FILE", "")
    if not path:
        return off
    try:
        with open(path, encoding="utf-8") as file:
            payload = json.load(file)
        values, kept = dict(payload["settings"]), set(payload["kept"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"cannot read the settings of the process that started this worker ({path}): {exc}") from exc
    hooks = off.app_hooks
    if hooks is not None:  # configured from a web app: through it (offload.flask: app.config)
        hooks.reconfigure(values, kept)
    else:
        own = {k: v for k, v in off.configured_from.items() if k in kept or not is_setting(k)}
        off.configure({**own, **values})
    return off


_state: dict[str, Any] = {}


def _loaded() -> Any:
    if "offload" not in _state:
        _state["offload"] = apply_starter_settings(load_default())
    return _state["offload"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing this module (the CLI does) loads no user app.
    if name in ("app", "celery"):
        return _loaded().celery
    if name == "offload":
        return _loaded()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_start_watchdog()
