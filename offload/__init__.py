"""offload: background work as a first-class part of Python web apps, on Celery."""

from .context import current_task, progress
from .core import Offload
from .exceptions import BrokerUnavailable, ConfigurationError, NotAllowedError, OffloadError, TaskError
from .futures import Future
from . import transport as _transport  # noqa: F401 (registers the sqlite:// kombu transport)

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
