"""Setting spellings and type coercion.

offload reads one flat mapping (Flask's ``app.config``, Pyramid's settings, a
dict, the environment) and turns it into Celery settings plus offload's own.
Each Celery setting may be spelled as Celery does (``broker_url``), with a
Pyramid-style prefix (``celery.broker_url``), with a Flask-style prefix
(``CELERY_BROKER_URL``) or as one of Celery's old uppercase names
(``CELERY_ALWAYS_EAGER``, ``BROKER_URL``). Strings (from ini files or the
environment) are coerced with the types of Celery's own setting definitions,
so nothing here drifts from Celery.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery.app.defaults import NAMESPACES, Option, _TO_NEW_KEY, flatten
from celery.utils.serialization import strtobool

from .exceptions import ConfigurationError

__all__ = ["Settings", "read_settings"]

#: Celery's setting definitions, by their current lowercase name.
CELERY_OPTIONS: dict[str, Option] = dict(flatten(NAMESPACES))

#: offload's own keys (they are not Celery settings) and their defaults.
OFFLOAD_KEYS: dict[str, Any] = {
    "CELERY_START_LOCAL_WORKERS": False,
    "CELERY_WORKERS": 1,
    "CELERY_QUEUES": None,
    "CELERY_ROUTES": None,
    "OFFLOAD_ALLOW": None,
    "OFFLOAD_DATA_DIR": None,
    "OFFLOAD_ALLOW_PICKLE": False,
}

_PREFIXES = ("celery.", "celery_", "CELERY_")


@dataclass
class Settings:
    """What :func:`read_settings` found in a mapping."""

    #: Celery settings, by their current lowercase names, values coerced.
    celery: dict[str, Any] = field(default_factory=dict)
    start_local_workers: bool = False
    workers: int | list[str] | dict[str, dict[str, Any]] = 1
    queues: list[str] | None = None
    routes: dict[str, Any] | None = None
    allow: list[str] | None = None
    data_dir: str | None = None
    allow_pickle: bool = False


def celery_key(key: str) -> str | None:
    """The current Celery name for one spelling of a setting, or None.

    >>> celery_key("CELERY_BROKER_URL"), celery_key("celery.result_backend")
    ('broker_url', 'result_backend')
    >>> celery_key("CELERY_ALWAYS_EAGER"), celery_key("DEBUG") is None
    ('task_always_eager', True)
    """
    if key in CELERY_OPTIONS:
        return key
    if key in _TO_NEW_KEY:
        return _TO_NEW_KEY[key]
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for candidate in (rest, rest.lower()):
                if candidate in CELERY_OPTIONS:
                    return candidate
            if rest.upper() in _TO_NEW_KEY:
                return _TO_NEW_KEY[rest.upper()]
    return None


def coerce(name: str, value: Any) -> Any:
    """Coerce a string ``value`` to the type Celery declares for ``name``.

    Non-strings are returned unchanged: a Python config already has types.

    >>> coerce("task_always_eager", "true"), coerce("worker_concurrency", "4")
    (True, 4)
    >>> coerce("task_default_rate_limit", "10/m")
    '10/m'
    """
    if not isinstance(value, str):
        return value
    option = CELERY_OPTIONS.get(name)
    kind = option.type if option is not None else "string"
    kind = {int: "int", float: "float", str: "string", "str": "string", "bytes": "string"}.get(kind, kind)
    text = value.strip()
    try:
        if kind == "any":
            # Celery leaves these untyped (worker_concurrency: None means "one
            # per CPU"); a whole number in an ini file still means a number.
            return int(text) if text.lstrip("-").isdigit() else value
        if kind == "string":
            return value
        if text.lower() in ("", "none", "null") and option.default is None:
            return None
        if kind == "bool":
            return strtobool(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind in ("list", "tuple"):
            if text.startswith("["):
                items = json.loads(text)
            else:
                items = [item for item in text.replace(",", " ").split() if item]
            return tuple(items) if kind == "tuple" else list(items)
        if kind == "dict":
            return json.loads(text) if text else {}
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"setting {name!r} expects a {kind}, got {value!r}: {exc}"
        ) from None
    return value


def _coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, str):
        try:
            return bool(strtobool(value.strip()))
        except (KeyError, ValueError, TypeError):
            raise ConfigurationError(f"{key} expects true or false, got {value!r}") from None
    return bool(value)


def _coerce_workers(value: Any) -> int | list[str] | dict[str, dict[str, Any]]:
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        if text[:1] in "[{":
            value = json.loads(text)
        else:
            return [name for name in text.replace(",", " ").split() if name]
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple, Mapping)):
        raise ConfigurationError(
            "CELERY_WORKERS takes a count (2), a list of names (['foo', 'bar']) "
            f"or a dict of name -> options, got {value!r}"
        )
    if isinstance(value, int):
        if value < 0:
            raise ConfigurationError(f"CELERY_WORKERS must not be negative, got {value}")
        return value
    if isinstance(value, Mapping):
        return {str(name): dict(options or {}) for name, options in value.items()}
    return [str(name) for name in value]


def _names(key: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return [str(item) for item in json.loads(text)]
        return [item for item in text.replace(",", " ").split() if item]
    try:
        return [str(item) for item in value]
    except TypeError:
        raise ConfigurationError(f"{key} takes a list of names, got {value!r}") from None


def _closest(key: str) -> str:
    spellings = [f"CELERY_{name.upper()}" for name in CELERY_OPTIONS] + list(OFFLOAD_KEYS)
    spellings += list(_TO_NEW_KEY)
    match = difflib.get_close_matches(key.upper(), spellings, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def read_settings(mapping: Mapping[str, Any] | None) -> Settings:
    """Split ``mapping`` into Celery settings and offload's own.

    Keys that are neither (``DEBUG``, ``SECRET_KEY``, ...) belong to the web
    framework and are ignored, but a ``CELERY_``/``celery.`` key that matches
    nothing gets a warning naming the closest valid key, because a typo there
    otherwise silently runs with a default.
    """
    settings = Settings()
    if mapping is None:
        return settings
    if not isinstance(mapping, Mapping):
        raise ConfigurationError(
            f"Offload's config must be a mapping (dict, Flask config, Pyramid "
            f"settings), got {type(mapping).__name__}"
        )
    for key, value in mapping.items():
        if not isinstance(key, str):
            continue
        own = key.upper().replace(".", "_") if key.lower().startswith(("celery", "offload")) else key
        if own in OFFLOAD_KEYS:
            _read_own(settings, own, value)
            continue
        name = celery_key(key)
        if name is not None:
            settings.celery[name] = coerce(name, value)
        elif key.startswith(_PREFIXES) or key.startswith("OFFLOAD_"):
            warnings.warn(f"unknown setting {key!r}{_closest(key)}", UserWarning, stacklevel=3)
    return settings


def _read_own(settings: Settings, key: str, value: Any) -> None:
    if key == "CELERY_START_LOCAL_WORKERS":
        settings.start_local_workers = _coerce_bool(key, value)
    elif key == "CELERY_WORKERS":
        settings.workers = _coerce_workers(value)
    elif key == "CELERY_QUEUES":
        settings.queues = _names(key, value)
    elif key == "CELERY_ROUTES":
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else None
        settings.routes = value
    elif key == "OFFLOAD_ALLOW":
        settings.allow = _names(key, value)
    elif key == "OFFLOAD_DATA_DIR":
        settings.data_dir = str(value) if value else None
    elif key == "OFFLOAD_ALLOW_PICKLE":
        settings.allow_pickle = _coerce_bool(key, value)
