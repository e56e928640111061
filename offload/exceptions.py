"""The exceptions offload raises, each saying what to do about it."""

from __future__ import annotations

from typing import Any

from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

# Defined with the transports, which raise them and import nothing of offload outside offload.transport.
from .transport.errors import ConfigurationError, OffloadError

__all__ = [
    "CONNECTION_ERRORS",
    "BrokerUnavailable",
    "ConfigurationError",
    "InvalidTaskId",
    "NotAllowedError",
    "OffloadError",
    "RejectedMessage",
    "ResultBackendLimit",
    "TaskError",
    "TaskLost",
]


class NotAllowedError(OffloadError):
    """A worker was asked to run a function outside the allow-list.

    Raised on the worker (and so seen by the future's ``result()``) when a
    message names a function that is neither registered with ``@off.task``
    nor inside a package listed in ``OFFLOAD_ALLOW``.
    """


class RejectedMessage(OffloadError):
    """A worker refused a task message and put it in its dead-letter record.

    The message could not be what offload sends (a content type or
    compression it does not use, too large, nested too deep, a non-finite
    number, the wrong shape), or it killed the worker process running it
    too many times. It is acknowledged, never delivered again, logged and
    recorded (``dead-letters.jsonl`` in the worker's ``OFFLOAD_DATA_DIR``).
    """


class BrokerUnavailable(OffloadError, ConnectionError, OperationalError):
    """The broker could not be reached in time (to send a task, ping the workers, ...).

    Raised by ``submit`` and ``map``, by a registered task's ``.delay()`` and
    ``.apply_async()`` too; it is a kombu ``OperationalError``, so that an
    ``except OperationalError`` written for Celery still catches it.
    """


class _ResultStoreUnreachable(BrokerUnavailable):
    """The call was not sent: what is written to the result store before it
    (its mark for the web task API, a Django task's record) could not be.

    A :class:`BrokerUnavailable` all the same, as ``submit`` documents; its
    message names the store, not the broker.
    """


def result_store_unreachable(app: Any, exc: BaseException, doing: str) -> BrokerUnavailable:
    """The error for a result store that did not answer while a call was being sent."""
    return _ResultStoreUnreachable(
        f"cannot {doing}: the result store at {maybe_sanitize_url(str(app.conf.result_backend))!r} did not "
        f"answer ({exc}); the task was not sent.")


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


class InvalidTaskId(OffloadError, ValueError):
    """Something that cannot be a task id was given where one is expected.

    Raised by ``off.get``, ``off.options(task_id=...)`` and Pyramid's
    ``request.get_task_result``; the message says the rule
    (:mod:`offload.ids`). It is a ``ValueError``: a view that passes an id
    from the client answers 400 for it (offload.pyramid adds that view).
    """


class ResultBackendLimit(OffloadError):
    """The result backend cannot do what was asked (rpc:// serves one process)."""


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OperationalError, ConnectionError, TimeoutError]
    try:
        import redis.exceptions

        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:
        pass
    return tuple(errors)


CONNECTION_ERRORS = _connection_errors()
"""What sending to an unreachable broker (or reading an unreachable result
store) raises: kombu's, the standard library's and redis-py's errors."""
