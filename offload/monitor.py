"""Monitoring: ask running workers over the broker, through Celery's control API.

Everything runs in the calling process (no subprocess per call) and returns
plain JSON-able data, one entry per worker.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any

from kombu.exceptions import OperationalError

from .exceptions import broker_unreachable

__all__ = ["INSPECT_TARGETS", "inspect", "jsonable", "status"]

#: What :func:`inspect` can ask the workers.
INSPECT_TARGETS = ("active", "scheduled", "reserved", "revoked", "registered", "stats",
                   "active_queues")


def jsonable(value: Any) -> Any:
    """Plain JSON types only (control replies may hold tuples, sets, datetimes)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    return repr(value)


def status(app: Any, timeout: float = 1.0) -> dict[str, Any]:
    """Ping every worker: ``{"ping": bool, "workers": {"foo@host": "OK"}}``.

    ``ping`` is True when at least one worker answered within ``timeout``.
    """
    try:
        replies = app.control.ping(timeout=timeout)
    except OperationalError as exc:
        raise broker_unreachable(app, exc, "reach the workers") from exc
    workers: dict[str, str] = {}
    for reply in replies or ():
        for node, answer in reply.items():
            ok = isinstance(answer, Mapping) and answer.get("ok") == "pong"
            workers[str(node)] = "OK" if ok else str(jsonable(answer))
    return {"ping": bool(workers), "workers": dict(sorted(workers.items()))}


def inspect(app: Any, what: str, timeout: float = 1.0) -> dict[str, Any]:
    """Ask every worker ``what`` (one of :data:`INSPECT_TARGETS`); per worker.

    >>> inspect(off.celery, "registered")          # doctest: +SKIP
    {'foo@host': ['offload.dispatch', ...]}
    """
    if what not in INSPECT_TARGETS:
        raise ValueError(f"cannot inspect {what!r}; choose one of {', '.join(INSPECT_TARGETS)}")
    try:
        replies = getattr(app.control.inspect(timeout=timeout), what)()
    except OperationalError as exc:
        raise broker_unreachable(app, exc, "reach the workers") from exc
    return jsonable(dict(sorted((replies or {}).items())))
