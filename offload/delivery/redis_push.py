"""Delivery by Redis pub/sub: Celery's Redis backend publishes each state it stores.

One connection per process, read in bulk (:class:`offload._resp.Subscriber`);
the states stored before a subscription took effect, and every followed id
each :data:`SAFETY_POLL` seconds, are read back.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from .._resp import Subscriber
from ..result_store import batches_results, results_channel
from .interface import Hub

__all__ = ["SAFETY_POLL", "RedisPush"]

logger = logging.getLogger("offload.hub")

#: Seconds between two reads of every followed id, in case a message was lost.
SAFETY_POLL = 2.0

_raw_decode = json.JSONDecoder().raw_decode


def _json_document(data: bytes) -> Any:
    """``json.loads(data)`` for UTF-8 JSON, without its encoding detection and
    whitespace scans when nothing surrounds the value (a tenth of a result's
    decoding and delivery in the hub)."""
    text = data.decode("utf-8")
    value, end = _raw_decode(text)
    if end != len(text):
        return json.loads(text)  # whitespace after it, or an error as json.loads raises it
    return value


class RedisPush:
    """One pub/sub connection: Celery's Redis backend publishes each state it stores.

    Futures submitted here get task ids that start with this process's own
    random prefix (the ids stay UUID-shaped), so one pattern subscription
    covers them all: no SUBSCRIBE/UNSUBSCRIBE per task, and no results of
    other processes. Ids from elsewhere (``off.get(id)``) are subscribed one
    by one on the same connection.

    The calls of ``map``'s chunks get ids with a second prefix, which the
    pattern does not cover: their results arrive as one message per chunk
    flush on :func:`offload.dispatch.results_channel` (one JSON array),
    rather than one pub/sub message per call.
    """

    #: Take new ids (MGET what was stored before we listened) and drop
    #: finished foreign subscriptions at most this often: one round trip per
    #: batch, not per task, and the GIL left to the threads that submit.
    TICK = 0.005
    #: Results decoded and delivered between two yields of the GIL.
    SLICE = 64
    #: This many results within one tick make a stream: from then on they are
    #: taken once per tick (two are one task's STARTED and SUCCESS).
    STREAM = 5
    #: Unsubscribe the channels of foreign ids no longer followed this often,
    #: once results have stopped streaming in for a few ticks (thousands of
    #: unsubscriptions and their confirmations in the middle of a burst
    #: delay it), and at the latest after SWEEP_LIMIT.
    SWEEP = 1.0
    SWEEP_LIMIT = 10.0

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._last_sweep = self._last_result = 0.0
        # Celery's decode_result, without kombu's per-object hook when the
        # payload holds no tagged value (see _decode).
        self._plain_json = getattr(backend, "content_type", None) == "application/json"
        self.pubsub: Any = None
        self.prefix = uuid.uuid4().hex[:8]
        self.pattern_prefix = bytes(backend.get_key_for_task(self.prefix))
        # The ids of chunked calls (new_task_ids), heard in batches.
        self.batch_prefix: str | None = None
        self.batch_channel = b""
        if batches_results(backend):
            self.batch_prefix = uuid.uuid4().hex[:8]
            while self.batch_prefix == self.prefix:
                self.batch_prefix = uuid.uuid4().hex[:8]
            self.batch_channel = results_channel(self.batch_prefix).encode()
        self.channels: dict[bytes, str] = {}  # foreign ids, subscribed one by one
        # Until Redis confirms the pattern subscription, a result may be
        # published unheard: every id is then read back once it is confirmed.
        self.listening = False

    def new_task_id(self) -> str:
        return self.prefix + str(uuid.uuid4())[8:]

    def submit_options(self) -> dict[str, Any]:
        return {"task_id": self.new_task_id()}

    def needs_wakeup(self, task_ids: list[str]) -> bool:
        return True

    def reset(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except Exception:
                pass
        self.pubsub = None
        self.channels.clear()
        self.listening = False

    def _manage(self, hub: Hub) -> None:
        new = hub.take_new()
        if new:
            foreign = {bytes(self.backend.get_key_for_task(i)): i for i in new if not self._own(i)}
            if foreign:
                self.channels.update(foreign)
                self.pubsub.subscribe(*foreign)
                # Anything stored before their subscription took effect.
                self._read_stored(hub, list(foreign.values()))
        now = time.monotonic()
        if self.channels and now - self._last_sweep >= self.SWEEP and (
                now - self._last_result >= 4 * self.TICK or now - self._last_sweep >= self.SWEEP_LIMIT):
            # A scan of every foreign id, so not at each tick: thousands of
            # them cost milliseconds. Until then a finished id's channel
            # stays subscribed, and what it still hears is ignored.
            self._last_sweep = now
            entries = hub.watched  # membership tests only: atomic under the GIL
            done = [ch for ch, task_id in self.channels.items() if task_id not in entries]
            if done:
                for channel in done:
                    del self.channels[channel]
                self.pubsub.unsubscribe(*done)

    def _own(self, task_id: str) -> bool:
        return task_id.startswith(self.prefix) or (
            self.batch_prefix is not None and task_id.startswith(self.batch_prefix))

    def _unpack_batch(self, data: bytes, into: list[tuple[str, dict[str, Any] | None]]) -> None:
        # One JSON array of stored metas (dispatch.store_results): one
        # decoding for the whole flush of a chunk.
        try:
            metas = json.loads(data)
        except ValueError:
            logger.warning("result hub: unreadable batch of results on %r", self.batch_channel)
            return
        if not isinstance(metas, list):
            logger.warning("result hub: a batch of results on %r is not a list", self.batch_channel)
            return
        for meta in metas:
            task_id = meta.get("task_id") if isinstance(meta, dict) else None
            if isinstance(task_id, str):
                into.append((task_id, self.backend.meta_from_decoded(meta)))

    def _read_stored(self, hub: Hub, ids: list[str]) -> None:
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]
            keys = [self.backend.get_key_for_task(i) for i in batch]
            hub.count_read()
            for task_id, value in zip(batch, self.backend.client.mget(keys)):
                if value:
                    hub.deliver(task_id, self.backend.decode_result(value))

    def _confirmed(self, hub: Hub) -> None:
        # From here on every result of this process's ids is heard; read what
        # was stored before (submitted earlier, or during a reconnect).
        self.listening = True
        self._read_stored(hub, hub.ids())

    def _unpack(self, hub: Hub, replies: list[Any]) -> list[tuple[str, dict[str, Any] | None]]:
        """The (task id, meta) pairs in a bulk read (None: undecodable); a confirmation on the way."""
        metas: list[tuple[str, dict[str, Any] | None]] = []
        decode = self._decode
        id_from = len(self.pattern_prefix) - len(self.prefix)  # where a key's task id starts
        for reply in replies:
            kind = reply[0] if isinstance(reply, list) and reply else None
            if kind == b"pmessage" and len(reply) == 4:
                metas.append((reply[2][id_from:].decode("utf-8", "replace"), decode(reply[3])))
            elif kind == b"message" and len(reply) == 3:
                if reply[1] == self.batch_channel:
                    self._unpack_batch(reply[2], metas)
                else:
                    task_id = self.channels.get(reply[1])
                    if task_id is not None:
                        metas.append((task_id, decode(reply[2])))
            elif kind == b"psubscribe" and not self.listening:
                self._confirmed(hub)
        return metas

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        try:
            if self._plain_json and data[:1] == b"{" and b'"__type__"' not in data:
                # What decode_result returns for it: kombu's JSON decoding
                # differs from the standard library's only by turning
                # {"__type__", "__value__"} objects into datetimes and the
                # like (none here), and a compressed payload starts with its
                # marker, not "{". A third of the hub's time, saved.
                return self.backend.meta_from_decoded(_json_document(data))
            return self.backend.decode_result(data)
        except Exception:  # not Celery's: skipped, the stream goes on
            logger.warning("result hub: an unreadable result message (%d bytes) skipped", len(data))
            return None

    def run(self, hub: Hub) -> None:
        self.listening = False
        self.pubsub = Subscriber(self.backend.client)
        # After a reconnect: the ids of other processes still awaited.
        self.channels = {bytes(self.backend.get_key_for_task(i)): i
                         for i in hub.ids() if not self._own(i)}
        if self.channels:
            self.pubsub.subscribe(*self.channels)
        if self.batch_channel:
            # Before the pattern: its confirmation, which reads back what was
            # stored meanwhile, then comes after this one's.
            self.pubsub.subscribe(self.batch_channel)
        self.pubsub.psubscribe(self.pattern_prefix + b"*")
        hub.answered()
        last_safety = time.monotonic()
        window_start = next_tick = 0.0
        window_count = 0
        while True:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.TICK
                self._manage(hub)
                hub.housekeeping()
            if not hub.watched:
                # Keep reading while idle, or subscription confirmations and
                # stray results would pile up in the socket.
                hub.deliver_many(self._unpack(hub, self.pubsub.read(0.0)))
                if hub.wakeup.wait(5.0):
                    hub.wakeup.clear()
                continue
            # Every reply that has arrived, in one recv: a burst of results
            # costs one system call and one lock, not one of each per result.
            replies = self.pubsub.read(next_tick - time.monotonic())
            if replies:
                metas = []
                for start in range(0, len(replies), self.SLICE):
                    if start:
                        # Let a thread that waits for the GIL (one that
                        # submits, its reply from the broker just in) run
                        # between slices, rather than after the whole burst.
                        time.sleep(0)
                    part = self._unpack(hub, replies[start:start + self.SLICE])
                    if part:
                        hub.deliver_many(part)
                        metas += part
                if metas:
                    hub.count_read()
                    now = self._last_result = time.monotonic()
                    if now - window_start > self.TICK:
                        window_start, window_count = now, 0
                    window_count += len(metas)
                    if window_count >= self.STREAM:
                        # Results keep coming (many tasks at once): let the
                        # next ones pile up until the tick and take them in
                        # one go, rather than waking (and taking the GIL from
                        # the threads that submit) once per message. A task
                        # or two at a time (a round trip, its STARTED and its
                        # SUCCESS) is still delivered as soon as it arrives.
                        time.sleep(max(next_tick - now, 0.0))
            if time.monotonic() - last_safety > SAFETY_POLL:
                last_safety = time.monotonic()
                self._read_stored(hub, hub.ids())
