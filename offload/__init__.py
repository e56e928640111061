"""offload: background work as a first-class part of Python web apps, on Celery.

The public names are imported on first use (PEP 562): ``from offload import
Offload`` loads the core and Celery, while ``import offload.transport.sqlite``
(a kombu plugin, which a plain kombu or Celery process may load by its URL)
loads neither. Importing the package registers the ``sqlite://`` and
``offload-redis://`` kombu transports, which costs only kombu.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import transport as _transport  # noqa: F401 (registers the sqlite:// kombu transport)

if TYPE_CHECKING:  # what a type checker and a reader see; at run time, __getattr__ below
    from .context import current_task, progress
    from .core import Offload
    from .exceptions import BrokerUnavailable, ConfigurationError, NotAllowedError, OffloadError, TaskError
    from .futures import Future

__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "Future",
    "NotAllowedError",
    "Offload",
    "OffloadError",
    "TaskError",
    "current_task",
    "progress",
]
__version__ = "0.1.0"

# Each public name -> the module defining it.
_PUBLIC = {
    "BrokerUnavailable": ".exceptions",
    "ConfigurationError": ".exceptions",
    "Future": ".futures",
    "NotAllowedError": ".exceptions",
    "Offload": ".core",
    "OffloadError": ".exceptions",
    "TaskError": ".exceptions",
    "current_task": ".context",
    "progress": ".context",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
