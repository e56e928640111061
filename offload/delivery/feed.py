"""Delivery from a result backend that numbers its writes: the embedded sqlite one.

The backend (:class:`offload.transport.backend.SQLiteBackend`) gives each
write a change number and reads what changed since a number, so each new
state is read once, however many ids are followed (:class:`BatchPoll` reads
every followed id on every poll). Writers poke this process's wake-up
socket after each commit (:meth:`~offload.transport.backend.SQLiteBackend.watch`),
and the hub's thread sleeps on it, so a result is read as soon as it is
stored; a poll that backs off like :class:`BatchPoll`'s covers a lost
wake-up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from .interface import Hub
from .polling import MAX_POLL, MIN_POLL

__all__ = ["ChangeFeed", "FULL_READ", "has_change_feed"]

logger = logging.getLogger("offload.hub")

#: Seconds between two reads of every followed id by key: what finds a row
#: no change number reaches (one written by an older release).
FULL_READ = 1.0
#: A read that brought at least this many changes means writes are flowing:
#: the next waits :data:`BATCH_WAIT` to take more of them at once.
BUSY_READ = 8
BATCH_WAIT = 0.001
#: Ids handed out for submits that the first read may skip, at most (beyond
#: it they are all read: a submit whose future is never made leaves one).
_FRESH_LIMIT = 100_000

_raw_decode = json.JSONDecoder().raw_decode


def has_change_feed(backend: Any) -> bool:
    """True for a backend :class:`ChangeFeed` can follow."""
    return all(callable(getattr(backend, name, None))
               for name in ("changes", "last_change", "watch", "mget", "get_key_for_task"))


class ChangeFeed:
    """Reads the states written since the last read, woken by each writer's commit."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        #: The change number read up to; None until the first read.
        self._after: int | None = None
        #: This process's wake-up socket, which the backend's writers poke.
        self._watch: Any = None
        #: The hub's wake-up, which pokes that socket too.
        self._wakeup: Any = None
        #: Ids handed out for submits while the feed was being read: their
        #: results can only come after their subscription, so through the
        #: feed; they need no read of their own.
        self._fresh: set[str] = set()
        self._fresh_lock = threading.Lock()
        self._plain_json = getattr(backend, "content_type", None) == "application/json"

    def reset(self) -> None:
        # In the hub's thread, after run() raised: nobody sleeps on the watch.
        self._forget_position()
        if self._wakeup is not None:
            self._wakeup.attach(None)
            self._wakeup = None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def _forget_position(self) -> None:
        with self._fresh_lock:
            self._after = None
            self._fresh.clear()

    def _forget_position_if_idle(self, hub: Hub) -> bool:
        # Under the lock needs_wakeup takes: a subscription it let pass
        # without a wake-up is in hub.watched by then.
        with self._fresh_lock:
            if hub.watched:
                return False
            self._after = None
            self._fresh.clear()
            return True

    def submit_options(self) -> dict[str, Any]:
        task_id = str(uuid.uuid4())
        with self._fresh_lock:
            if self._after is not None:
                if len(self._fresh) >= _FRESH_LIMIT:
                    self._fresh.clear()
                self._fresh.add(task_id)
        return {"task_id": task_id}

    def needs_wakeup(self, task_ids: list[str]) -> bool:
        """False when every id was handed out for a submit while the feed's
        position was known: their states can only come after it, through the
        feed, whose writers poke it then. A burst of submits then wakes
        nobody (each wake-up cost the hub's thread a read and the submitting
        thread the GIL)."""
        with self._fresh_lock:
            if self._after is None:
                return True
            fresh = self._fresh
            return not all(task_id in fresh for task_id in task_ids)

    def _decode(self, value: Any) -> dict[str, Any] | None:
        try:
            if self._plain_json and isinstance(value, str) and value[:1] == "{" and '"__type__"' not in value:
                # What decode_result returns for it: kombu's JSON decoding
                # differs from the standard library's only by turning
                # {"__type__", "__value__"} objects into datetimes and the
                # like (none here).
                meta, end = _raw_decode(value)
                if end == len(value):
                    return self.backend.meta_from_decoded(meta)
            return self.backend.decode_result(value)
        except Exception:  # not Celery's: skipped, the others go on
            logger.warning("result hub: an unreadable stored result skipped")
            return None

    def _read_ids(self, hub: Hub, ids: list[str]) -> int:
        backend = self.backend
        decode = self._decode
        news = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            hub.count_read()
            values = backend.mget([backend.get_key_for_task(task_id) for task_id in chunk])
            news += hub.deliver_many([(task_id, decode(value))
                                      for task_id, value in zip(chunk, values) if value])
        return news

    def _unread(self, ids: list[str]) -> list[str]:
        """Of new ids, those that need a read of their own (not handed out for a submit)."""
        fresh = self._fresh
        if not fresh:
            return ids
        with self._fresh_lock:
            unread = [task_id for task_id in ids if task_id not in fresh]
            fresh.difference_update(ids)
        return unread

    def _read_changes(self, hub: Hub) -> tuple[int, int]:
        """(news delivered, changes read) since the last read."""
        backend = self.backend
        news = read = 0
        while True:
            hub.count_read()
            rows, after = backend.changes(self._after)
            self._after = after
            if not rows:
                return news, read
            read += len(rows)
            watched = hub.watched
            # Only the followed ids are decoded: other processes' results pass by.
            decode = self._decode
            news += hub.deliver_many([(task_id, decode(value)) for task_id, value in rows if task_id in watched])
            if len(rows) < 1000:
                return news, read

    def run(self, hub: Hub) -> None:
        backend = self.backend
        if self._watch is None:
            self._watch = backend.watch()
            # A subscription's wake-up pokes the socket the writers poke:
            # this thread sleeps on both, and a writer's commit wakes it
            # with no thread in between.
            self._wakeup = hub.wakeup
            hub.wakeup.attach(self._watch.poke)
        watch = self._watch
        delay = MIN_POLL
        next_full_read = time.monotonic() + FULL_READ
        while True:
            hub.housekeeping()
            if self._forget_position_if_idle(hub):
                # Idle: nothing to read until a subscription. The change
                # number is read again then (what passed meanwhile concerns
                # nobody here).
                _sleep(hub, watch, 30)
                continue
            if self._after is None:
                # First the number, then the ids' rows: a write after the
                # number is in the feed, one before it in those rows.
                last = backend.last_change()
                with self._fresh_lock:
                    self._after = last
            new = hub.take_new()
            unread = self._unread(new) if new else new
            news = self._read_ids(hub, unread) if unread else 0
            changed, read = self._read_changes(hub)
            news += changed
            now = time.monotonic()
            if now >= next_full_read:
                next_full_read = now + FULL_READ
                news += self._read_ids(hub, hub.ids())
            hub.answered()
            # Ids handed out for submits need no read: only news, or ids to
            # read, keep the poll fast (the writers' pokes wake it anyway).
            delay = MIN_POLL if news or unread else min(delay * 1.5, MAX_POLL)
            if read >= BUSY_READ:
                time.sleep(BATCH_WAIT)
            _sleep(hub, watch, delay)


def _sleep(hub: Hub, watch: Any, timeout: float) -> None:
    """Until a writer's commit or a subscription pokes ``watch``, or ``timeout``.

    A ``set()`` of the hub's wake-up always pokes after it sets the event,
    so clearing the event after the poke is read loses none; one that came
    before the watch was attached is on the event alone.
    """
    wakeup = hub.wakeup
    if not wakeup.is_set():
        watch.wait(timeout)
    wakeup.clear()
