"""Monitoring: ask running workers over the broker, through Celery's control API.

Everything runs in the calling process (no subprocess per call) and returns
plain JSON-able data, one entry per worker.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from kombu.exceptions import OperationalError

from .changes import Changes
from .exceptions import broker_unreachable

__all__ = ["INSPECT_TARGETS", "Poller", "inspect", "jsonable", "queue_lengths", "status"]

logger = logging.getLogger("offload.monitor")

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


def queue_lengths(app: Any, names: list[str]) -> dict[str, int | None]:
    """Messages waiting in each queue (None: it does not exist), one broker connection.

    A passive declare answers on every transport kombu has: RabbitMQ counts
    ready messages, Redis and the embedded broker the queue's rows. Redis
    has no empty queue (an empty list is no key), so there a refused
    passive declare means 0.
    """
    lengths: dict[str, int | None] = {}
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1)
            missing = None if connection.transport.driver_type == "amqp" else 0
            for name in names:
                # A passive declare of a missing queue closes its channel
                # (RabbitMQ): one channel per queue.
                channel = connection.channel()
                try:
                    lengths[name] = int(channel.queue_declare(name, passive=True).message_count)
                except Exception:
                    lengths[name] = missing
                finally:
                    try:
                        channel.close()
                    except Exception:
                        pass
    except OperationalError as exc:
        raise broker_unreachable(app, exc, "count the queues") from exc
    return lengths


class Poller:
    """One inspect round every ``interval`` seconds at most, shared by every reader.

    :meth:`snapshot` answers the latest round at once and asks for the next;
    a thread runs rounds while someone asked within ``idle_after`` seconds,
    then sleeps until asked again. However many browsers watch, the workers
    get one round per interval.

    A round is one ``stats`` broadcast waiting ``timeout`` (it finds the
    workers), then ``active``, ``reserved``, ``scheduled``, ``revoked`` and
    ``active_queues`` each waiting only for the workers ``stats`` found, and
    one passive declare per queue.
    """

    def __init__(self, app: Any, *, interval: float = 3.0, timeout: float = 1.0,
                 idle_after: float = 60.0, clock: Any = None) -> None:
        self.app, self.interval, self.timeout, self.idle_after = app, interval, timeout, idle_after
        self.clock = clock or time.monotonic
        self.rounds = 0
        self.latest: dict[str, Any] = {"workers": {}, "queues": {}, "tasks": {}, "at": None, "error": None}
        self.changes = Changes()
        self._asked = -1e18
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread: Any = None
        self._pid = 0
        self._seen: dict[str, dict[str, Any]] = {}  # workers ever seen: shown offline when gone

    def snapshot(self) -> dict[str, Any]:
        """The latest round's data; starts the rounds when idle."""
        self._asked = self.clock()
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="offload-poller", daemon=True)
                self._thread.start()
        self._wake.set()
        return self.latest

    def stop(self) -> None:
        """End the rounds (the thread exits after the current one)."""
        self._stopped.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self.clock() - self._asked > self.idle_after:
                self._wake.clear()
                self._wake.wait()
                continue
            began = self.clock()
            try:
                self.latest = self.poll()
            except Exception as exc:  # the broker is down: say so, keep the last workers
                # Once per outage in the log, not once per round.
                log = logger.debug if self.latest.get("error") else logger.warning
                log("dashboard: inspect round failed: %s", exc)
                self.latest = {**self.latest, "error": str(exc)}
            self.rounds += 1
            self.changes.bump()
            rest = self.interval - (self.clock() - began)
            if rest > 0:
                self._stopped.wait(rest)  # the interval itself: the rate limit of rounds

    def poll(self) -> dict[str, Any]:
        """One inspect round (what :meth:`snapshot` shows)."""
        stats = inspect(self.app, "stats", timeout=self.timeout)
        found = len(stats)
        tasks: dict[str, dict[str, Any]] = {}
        queues: set[str] = set(_configured_queues(self.app))
        if found:
            control = self.app.control.inspect(timeout=self.timeout, limit=found)
            for what in ("active", "reserved", "scheduled", "revoked", "active_queues"):
                try:
                    tasks[what] = jsonable(getattr(control, what)() or {})
                except OperationalError as exc:
                    raise broker_unreachable(self.app, exc, "reach the workers") from exc
            for replies in tasks.pop("active_queues").values():
                queues.update(str(q["name"]) for q in replies or () if isinstance(q, Mapping) and q.get("name"))
        now = time.time()
        for node, info in stats.items():
            pool = info.get("pool") or {}
            self._seen[node] = {
                "status": "online",
                "pool": pool.get("max-concurrency"),
                "processed": sum((info.get("total") or {}).values()),
                "uptime": info.get("uptime"),
                "pid": info.get("pid"),
                "active": len(tasks.get("active", {}).get(node) or ()),
                "seen": now,
            }
        for node, info in self._seen.items():
            if node not in stats:
                info.update(status="offline", active=0)
        return {"workers": dict(sorted(self._seen.items())), "queues": queue_lengths(self.app, sorted(queues)),
                "tasks": tasks, "at": now, "error": None}


def _configured_queues(app: Any) -> list[str]:
    names = [str(app.conf.task_default_queue)]
    for queue in app.conf.task_queues or ():
        names.append(str(getattr(queue, "name", queue)))
    return names

