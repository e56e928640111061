"""Delivery by rpc://: one reply queue per process, which every result is sent to."""

from __future__ import annotations

import socket
import uuid
from typing import Any

from .interface import Hub

__all__ = ["RpcPush"]


class RpcPush:
    """RPC results (``rpc://``): one reply queue per process, one consumer.

    Celery's RPC backend sends each result to the queue named in the task's
    ``reply_to``, by default one per submitting *thread*. offload names one
    queue per process instead, so the hub consumes every result of the
    process, whichever thread submitted it. The queue outlives a short
    disconnect (it expires after 10 idle minutes instead of auto-deleting).
    """

    def __init__(self, backend: Any) -> None:
        from kombu import Queue

        self.backend = backend
        self.queue = Queue(
            f"offload.reply.{uuid.uuid4()}", exchange=backend.exchange,
            routing_key=None, durable=False, auto_delete=False,
            expires=600.0, message_ttl=None,
        )
        self.queue.routing_key = self.queue.name
        self.connection: Any = None
        self.consumer: Any = None
        self._hub: Hub | None = None
        self._connect()

    def submit_options(self) -> dict[str, Any]:
        return {"task_id": str(uuid.uuid4()), "reply_to": self.queue.name}

    def needs_wakeup(self, task_ids: list[str]) -> bool:
        return True

    def _connect(self) -> None:
        from kombu import Consumer

        self.connection = self.backend.app.connection_for_read()
        channel = self.connection.default_channel
        self.queue(channel).declare()
        self.consumer = Consumer(channel, queues=[self.queue], no_ack=True,
                                 accept=self.backend.accept, callbacks=[self._on_message])
        self.consumer.consume()

    def reset(self) -> None:
        try:
            if self.connection is not None:
                self.connection.close()
        except Exception:
            pass
        self.connection = None

    def _on_message(self, body: Any, message: Any) -> None:
        task_id = message.properties.get("correlation_id") or body.get("task_id")
        if self._hub is not None and task_id:
            self._hub.count_read()
            self._hub.deliver(task_id, self.backend.meta_from_decoded(dict(body)))

    def run(self, hub: Hub) -> None:
        if self.connection is None:
            self._connect()
        hub.answered()
        self._hub = hub
        while True:
            hub.take_new()  # nothing to subscribe: every reply comes here
            hub.housekeeping()
            try:
                self.connection.drain_events(timeout=0.25)
            except socket.timeout:
                self.connection.heartbeat_check()
