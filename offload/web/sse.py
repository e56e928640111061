"""Server-sent events of one task: the wire format and the two streams.

Each event is one ``data:`` line holding the JSON snapshot of the task (the
same object as ``GET {prefix}/tasks/{id}``, shown by ``TaskAPI.present``:
standard JSON, a failure's message only where the task made it public); the stream opens with a
``retry:`` hint, sends a comment line as keep-alive while nothing changes,
and closes after the final state. After ``max_stream`` seconds it closes
anyway and the browser's ``EventSource`` reconnects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from .waiting import TaskSnapshot, follow, follow_sync

__all__ = ["HEADERS", "async_events", "encode", "sync_events"]

#: Milliseconds a browser waits before reconnecting a closed stream.
RETRY_MS = 2000

HEADERS = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-store"),
    # Proxies such as nginx would otherwise hold events back in a buffer.
    ("X-Accel-Buffering", "no"),
]

KEEPALIVE = b": keep-alive\n\n"


def encode(api: Any, snap: TaskSnapshot, exposure: Any, event_id: int) -> bytes:
    """One event: the snapshot as the API shows it to a client."""
    _, data = api.present(snap, exposure)
    return b"id: %d\ndata: %s\n\n" % (event_id, data)


def _preamble() -> bytes:
    return f"retry: {RETRY_MS}\n\n".encode()


def sync_events(api: Any, task_id: str, exposure: Any) -> Iterator[bytes]:
    """The stream for a WSGI server: holds its thread at most ``api.max_stream`` seconds."""
    yield _preamble()
    number = 0
    for snap in follow_sync(api.off, task_id, timeout=api.max_stream, heartbeat=api.keepalive):
        if snap is None:
            yield KEEPALIVE
        else:
            yield encode(api, snap, exposure, number)
            number += 1


async def async_events(api: Any, task_id: str, exposure: Any) -> AsyncIterator[bytes]:
    """The stream for an ASGI server: holds no thread while it waits."""
    yield _preamble()
    number = 0
    async for snap in follow(api.off, task_id, timeout=api.max_stream, heartbeat=api.keepalive):
        if snap is None:
            yield KEEPALIVE
        else:
            yield encode(api, snap, exposure, number)
            number += 1
