"""The exceptions offload raises, each saying what to do about it."""

from __future__ import annotations

from typing import Any

from kombu.utils.url import maybe_sanitize_url

# Defined with the transports, which raise them and import nothing of offload outside offload.transport.
from .transport.errors import ConfigurationError, OffloadError  # noqa: F401 (re-exported)


class NotAllowedError(OffloadError):
    """A worker was asked to run a function outside the allow-list.

    Raised on the worker (and so seen by the future's ``result()``) when a
    message names a function that is neither registered with ``@off.task``
    nor inside a package listed in ``OFFLOAD_ALLOW``.
    """


class BrokerUnavailable(OffloadError, ConnectionError):
    """The broker could not be reached in time to send a task."""


def broker_unreachable(app: Any, exc: BaseException, doing: str) -> BrokerUnavailable:
    """The error for a broker that did not answer while offload tried ``doing``.

    Names the broker by its URL with the password masked, and the
    connection error as the broker's client gave it.
    """
    return BrokerUnavailable(
        f"cannot {doing}: the broker at {maybe_sanitize_url(str(app.conf.broker_url))!r} is "
        f"unreachable ({exc}). Is it running?")


class TaskLost(OffloadError, TimeoutError):
    """Nothing was heard of a task for longer than the result hub waits.

    The task was sent with ``ignore_result``, it expired before a worker
    took it, or its id is unknown. ``off.get(id)`` follows it again.
    """


class TaskError(OffloadError):
    """An error a task raises for its callers to read.

    Over HTTP (:mod:`offload.web`) a failed task answers a generic message
    and its id, since an exception's text can carry what a client must not
    see (a connection string, a path, a user's data). An exception of a
    ``TaskError`` subclass keeps its type and message there, as do the types
    a task lists in ``@off.task(public_errors=(...))``.

    >>> class OutOfStock(TaskError):
    ...     "The item is sold out."
    """


class ResultBackendLimit(OffloadError):
    """The result backend cannot do what was asked (rpc:// serves one process)."""
