"""Which workers ``CELERY_WORKERS`` describes: one :class:`WorkerSpec` each.

Pure: parsing a setting starts nothing and touches no file, so a bad value
fails where it is read (``off.workers``), not in a worker's log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery.utils.nodenames import host_format, node_format

from .exceptions import ConfigurationError

__all__ = ["WorkerSpec", "worker_specs"]

#: Per-worker options in a ``CELERY_WORKERS`` dict, and the option they become.
_OPTION_FLAGS = {
    "concurrency": "--concurrency",
    "loglevel": "--loglevel",
    "log-level": "--loglevel",
    "log_level": "--loglevel",
    "pidfile": "--pidfile",
    "queues": "--queues",
    "pool": "--pool",
    "prefetch": "--prefetch-multiplier",
}
_POOLS = ("prefork", "eventlet", "gevent", "solo", "processes", "threads", "custom")
_LOGLEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL")


@dataclass(frozen=True)
class WorkerSpec:
    """One configured worker: its name and the ``celery worker`` arguments."""

    #: The name as configured (``foo``), used for its log file.
    name: str
    #: The node name it answers pings with (``foo@host``).
    nodename: str
    #: Arguments after ``celery -A ... worker``.
    args: tuple[str, ...] = field(default=())
    #: The queues it consumes (empty: the app's default queues).
    queues: tuple[str, ...] = field(default=())
    #: Its pid file (``%n`` already expanded), if configured.
    pidfile: str | None = None


def _positive_int(worker: str, key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or (isinstance(value, float) and value != number):
        raise ConfigurationError(
            f"CELERY_WORKERS[{worker!r}][{key!r}] must be a whole number >= 1, got {value!r}")
    return number


def _queue_names(worker: str, value: Any) -> tuple[str, ...]:
    names = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(
            isinstance(n, str) and n.strip() for n in names):
        raise ConfigurationError(
            f"CELERY_WORKERS[{worker!r}]['queues'] takes a list of queue names, got {value!r}")
    return tuple(n.strip() for n in names)


def _one_spec(name: str, options: Mapping[str, Any], loglevel: str) -> WorkerSpec:
    if not name or any(c.isspace() for c in name) or name.count("@") > 1:
        raise ConfigurationError(
            f"worker name {name!r} in CELERY_WORKERS must be non-empty, without spaces, "
            "with at most one '@' (like 'foo' or 'foo@%h')")
    unknown = sorted(set(options) - set(_OPTION_FLAGS))
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {unknown} for worker {name!r} in CELERY_WORKERS; "
            f"valid: {sorted(_OPTION_FLAGS)}")
    # "foo" answers as foo@<this host>, as `celery worker -n foo` would.
    nodename = host_format(name if "@" in name else f"{name}@%h")
    args: list[str] = ["--hostname", nodename]
    level = next((options[k] for k in ("loglevel", "log-level", "log_level") if k in options), loglevel)
    if not isinstance(level, str) or level.upper() not in _LOGLEVELS:
        raise ConfigurationError(
            f"CELERY_WORKERS[{name!r}] log level must be one of {list(_LOGLEVELS)}, got {level!r}")
    args += ["--loglevel", level.upper()]
    if "concurrency" in options:
        args += ["--concurrency", str(_positive_int(name, "concurrency", options["concurrency"]))]
    if "prefetch" in options:
        args += ["--prefetch-multiplier", str(_positive_int(name, "prefetch", options["prefetch"]))]
    if "pool" in options:
        if options["pool"] not in _POOLS and ":" not in str(options["pool"]):
            raise ConfigurationError(
                f"CELERY_WORKERS[{name!r}]['pool'] must be one of {list(_POOLS)}, got {options['pool']!r}")
        args += ["--pool", str(options["pool"])]
    queues: tuple[str, ...] = ()
    if "queues" in options:
        queues = _queue_names(name, options["queues"])
        args += ["--queues", ",".join(queues)]
    pidfile = None
    if options.get("pidfile"):
        pidfile = os.path.abspath(node_format(str(options["pidfile"]), nodename))
        args += ["--pidfile", pidfile]
    return WorkerSpec(name=name.partition("@")[0], nodename=nodename, args=tuple(args),
                      queues=queues, pidfile=pidfile)


def worker_specs(setting: int | list[str] | Mapping[str, Mapping[str, Any]], *,
                 loglevel: str = "INFO") -> list[WorkerSpec]:
    """The workers a ``CELERY_WORKERS`` value describes.

    >>> [w.name for w in worker_specs(2)], [w.name for w in worker_specs(["foo", "bar"])]
    (['worker1', 'worker2'], ['foo', 'bar'])
    >>> "--concurrency" in worker_specs({"foo": {"concurrency": 4}})[0].args
    True
    """
    if isinstance(setting, bool):
        raise ConfigurationError(f"CELERY_WORKERS takes a count, names or a dict, got {setting!r}")
    if isinstance(setting, int):
        items: list[tuple[str, Mapping[str, Any]]] = [(f"worker{i}", {}) for i in range(1, setting + 1)]
    elif isinstance(setting, Mapping):
        items = []
        for name, options in setting.items():
            if not isinstance(options, Mapping):
                raise ConfigurationError(
                    f"CELERY_WORKERS[{name!r}] must be a dict of options, got {options!r}")
            items.append((str(name), options))
    else:
        items = [(str(name), {}) for name in setting]
    specs = [_one_spec(name, options, loglevel) for name, options in items]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigurationError(f"CELERY_WORKERS names the worker {spec.name!r} twice")
        seen.add(spec.name)
    return specs
