"""Worker-side lease renewal for the Redis broker.

kombu's Redis transport makes a message that a worker took visible again once
``visibility_timeout`` has passed since delivery, unless it was acknowledged.
With late acks that is what brings back the tasks of a killed worker, but a
healthy worker running a task for longer than the timeout would see it
delivered a second time. offload keeps the timeout short (seconds, so a crash
is recovered quickly) and has every live worker renew the lease of the
messages it holds: it moves their delivery time forward a few times per
timeout, so only a worker that stopped renewing (a dead one) loses them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps

__all__ = ["RedisLeaseRenewal"]

logger = logging.getLogger("offload.reliability")


def _renew(channel: Any) -> int:
    """Move the delivery time of every unacked message of ``channel`` to now."""
    renew_leases = getattr(channel.qos, "renew_leases", None)
    if renew_leases is not None:  # offload's own transport (offload.transport.redis)
        return int(renew_leases())
    # QoS._delivered is kombu's map of the channel's unacked delivery tags:
    # the same set kombu itself restores from when a channel closes.
    tags = list(getattr(channel.qos, "_delivered", None) or ())
    if not tags:
        return 0
    now = time.time()
    with channel.conn_or_acquire() as client:
        # xx=True: only refresh entries still in the index (not acked meanwhile).
        client.zadd(channel.unacked_index_key, {tag: now for tag in tags}, xx=True)
    return len(tags)


class RedisLeaseRenewal(bootsteps.StartStopStep):
    """A consumer step that renews the leases of the messages the worker holds."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer_entry: Any = None

    def start(self, c: Any) -> None:
        channel = getattr(getattr(c, "task_consumer", None), "channel", None)
        if channel is None or not hasattr(channel, "unacked_index_key"):
            return  # not the Redis transport: nothing to renew
        interval = max(float(channel.visibility_timeout) / 4.0, 0.5)

        def renew() -> None:
            try:
                _renew(channel)
            except Exception:  # a broker hiccup: kombu reconnects, we retry next tick
                logger.debug("lease renewal failed", exc_info=True)

        self._timer_entry = c.timer.call_repeatedly(interval, renew, priority=10)

    def stop(self, c: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None

    shutdown = stop
