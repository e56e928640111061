"""From "an error happened" to "a task was published", off the request's path.

The request thread only counts: the first error of a fingerprint is parked in
a small in-memory table with what is needed to build its report; the same
error again within the grouping window only increments its count. One
background thread per process builds and publishes each group when its
window ends, so a request never waits
for the broker, and a flood of one error becomes one report with a count.
When publishing fails (the broker is away) the report goes to the spool, and
the spool is drained after the next successful publish.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .capture import now_iso
from .spool import Spool

__all__ = ["Pipeline"]

logger = logging.getLogger("offload.errors")

#: Seconds after a failed publish during which reports go straight to the
#: spool: a broker that does not answer costs one connection timeout, not one
#: per report.
BROKER_BACKOFF = 5.0


class _Group:
    __slots__ = ("build", "count", "due", "first_seen", "last_seen")

    def __init__(self, build: Callable[[], dict[str, Any]], due: float) -> None:
        self.build = build
        self.count = 1
        self.due = due
        self.first_seen = self.last_seen = now_iso()


class Pipeline:
    """Groups reports by fingerprint and publishes them from a background thread.

    Parameters:
        publish: sends one report to the broker (raises when it cannot).
        spool: where reports go when ``publish`` fails.
        window: seconds a new error waits for copies of itself before it is sent.
        max_groups: distinct errors held at once; more are dropped with a log line.
        broker_backoff: seconds after a failed publish during which reports
            are spooled without trying the broker.
    """

    def __init__(self, publish: Callable[[dict[str, Any]], None], spool: Spool, *,
                 window: float = 2.0, max_groups: int = 1000,
                 broker_backoff: float = BROKER_BACKOFF) -> None:
        if window < 0:
            raise ValueError(f"the grouping window is a number of seconds >= 0, got {window!r}")
        self._publish = publish
        self.spool = spool
        self.window = float(window)
        self.max_groups = max_groups
        self.broker_backoff = float(broker_backoff)
        self._groups: dict[str, _Group] = {}
        #: Groups whose window ended before the thread took them.
        self._closed: list[_Group] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._broker_down_until = 0.0
        self.dropped = 0
        ref = weakref.ref(self)
        # A child forked while a request thread held the lock would wait on it
        # forever; the parent's pending groups are the parent's to send.
        os.register_at_fork(after_in_child=lambda: _call(ref, "_reset_after_fork"))
        # Groups still waiting for their window when the process exits go to
        # the spool (a disk write, no broker wait); a worker's sweep sends them.
        atexit.register(_call, ref, "spool_pending")

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._groups = {}
        self._closed = []
        self._thread = None

    def offer(self, fingerprint: str, build: Callable[[], dict[str, Any]]) -> None:
        """Count one error; the first of its group is built (by ``build``) off the request's path."""
        with self._lock:
            group = self._groups.get(fingerprint)
            if group is not None and time.monotonic() < group.due:
                group.count += 1
                group.last_seen = now_iso()
                return
            if group is not None:
                # Its window is over but the thread has not taken it yet (it
                # waits on a slow publish, the broker being away): it closes
                # with the count it has, and this error starts the next one,
                # so a window stays `window` seconds whatever the broker does.
                self._closed.append(self._groups.pop(fingerprint))
            if len(self._groups) >= self.max_groups:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    logger.error("error reporting: %d distinct errors are waiting; dropped %d "
                                 "report(s), the last for fingerprint %s",
                                 self.max_groups, self.dropped, fingerprint)
                return
            self._groups[fingerprint] = _Group(build, time.monotonic() + self.window)
            self._ensure_thread()
            self._wake.notify()

    def _ensure_thread(self) -> None:
        # A forked child (gunicorn, Celery's prefork pool) inherits no thread:
        # start one in each process that reports.
        if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="offload-errors", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._groups and not self._closed:
                    self._wake.wait()
                now = time.monotonic()
                due = [fp for fp, group in self._groups.items() if group.due <= now]
                if not due and not self._closed:
                    self._wake.wait(min(g.due for g in self._groups.values()) - now)
                    continue
                groups = self._closed + [self._groups.pop(fp) for fp in due]
                self._closed = []
            for group in groups:
                try:
                    report = group.build()
                except Exception:
                    logger.exception("error reporting could not build a report")
                    continue
                report.update(count=group.count, first_seen=group.first_seen, last_seen=group.last_seen)
                self.send(report)

    def send(self, report: dict[str, Any]) -> bool:
        """Publish one report now, or spool it; True if it was published."""
        if time.monotonic() < self._broker_down_until:
            self._to_spool(report, "the broker was unreachable moments ago")
            return False
        try:
            self._publish(report)
        except Exception as exc:
            self._broker_down_until = time.monotonic() + self.broker_backoff
            self._to_spool(report, f"the broker is unreachable ({exc})")
            return False
        self.flush_spool()
        return True

    def _to_spool(self, report: dict[str, Any], why: str) -> None:
        try:
            self.spool.put(report)
            logger.warning("error reporting: %s; report spooled to %s", why, self.spool.folder)
        except OSError as exc:
            logger.error("error reporting: %s and the spool failed (%s); dropped the report %r",
                         why, exc, report.get("description"))

    def spool_pending(self) -> int:
        """Write the groups still inside their window to the spool now; how many."""
        with self._lock:
            groups = self._closed + list(self._groups.values())
            self._groups.clear()
            self._closed = []
        for group in groups:
            try:
                report = group.build()
                report.update(count=group.count, first_seen=group.first_seen, last_seen=group.last_seen)
                self.spool.put(report)
            except Exception:
                logger.exception("error reporting could not spool a pending report")
        return len(groups)

    def flush_spool(self) -> int:
        """Publish what the spool holds (the broker answered); the count sent."""
        try:
            sent = self.spool.drain(self._publish)
        except Exception as exc:
            logger.warning("error reporting: spooled reports still wait for the broker (%s)", exc)
            return 0
        if sent:
            logger.info("error reporting: %d spooled report(s) sent", sent)
        return sent


def _call(ref: weakref.ref[Pipeline], method: str) -> None:
    pipeline = ref()
    if pipeline is not None:
        getattr(pipeline, method)()
