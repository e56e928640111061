"""Delivery by polling: every followed id read in one batch, often while states change.

For any result backend that neither publishes its states (Redis) nor sends
them back (rpc://): the database backends, the embedded sqlite one, ...
Reads every few milliseconds while states change, backing off to
:data:`MAX_POLL` while none does (a task sitting in PROGRESS included).
"""

from __future__ import annotations

import uuid
from typing import Any

from .interface import Hub

__all__ = ["MAX_POLL", "MIN_POLL", "BatchPoll"]

#: Seconds between two reads while states change.
MIN_POLL = 0.002
#: Seconds between two reads once nothing changes.
MAX_POLL = 0.25


class BatchPoll:
    """Reads all outstanding ids in one batch, backing off while nothing changes."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.many = getattr(backend, "mget", None) is not None and hasattr(backend, "get_key_for_task")

    def reset(self) -> None:
        pass

    def submit_options(self) -> dict[str, Any]:
        return {"task_id": str(uuid.uuid4())}

    def needs_wakeup(self, task_ids: list[str]) -> bool:
        return True

    def fetch(self, hub: Hub, ids: list[str]) -> dict[str, dict[str, Any]]:
        if self.many:
            keys = [self.backend.get_key_for_task(i) for i in ids]
            hub.count_read()
            values = self.backend.mget(keys)
            return {
                task_id: self.backend.decode_result(value)
                for task_id, value in zip(ids, values) if value
            }
        metas = {}
        for task_id in ids:
            hub.count_read()
            metas[task_id] = self.backend.get_task_meta(task_id, cache=False)
        return metas

    def run(self, hub: Hub) -> None:
        delay = MIN_POLL
        while True:
            if hub.take_new():
                delay = MIN_POLL
            hub.housekeeping()
            ids = hub.ids()
            if not ids:
                hub.wakeup.wait(30)
                hub.wakeup.clear()
                continue
            changed = False
            for start in range(0, len(ids), 500):
                for task_id, meta in self.fetch(hub, ids[start:start + 500]).items():
                    changed = hub.deliver(task_id, meta) or changed
            hub.answered()
            # Only news keeps the poll fast: a task sitting in PROGRESS with
            # the same meta backs off like any other.
            delay = MIN_POLL if changed else min(delay * 1.5, MAX_POLL)
            if hub.wakeup.wait(delay):
                hub.wakeup.clear()
