"""What a worker accepts from its queues, and where it puts what it refuses.

A message on the broker may come from anyone who can write there. Celery's
consumer trusts it: a body of kombu's raw ``application/data`` type, a JSON
``[]``, a header its strategy does not expect make the consumer raise, and
the worker exits; the unacknowledged message comes back and kills the next
worker too. A body marked compressed is inflated before any check. So an
offload worker runs :class:`Consumer` (Celery's ``worker_consumer``
setting), which checks each task message before Celery reads it:

* its content type is one ``accept_content`` names (never kombu's trusted
  raw types unless named there) and its compression one the app uses;
  a compressed body inflates to at most :data:`MAX_MESSAGE_BYTES`
  (:func:`limit_decompression`);
* the body is at most :data:`MAX_MESSAGE_BYTES`, decodes, has Celery's
  shape ``[args, kwargs, embed]``, arguments nested at most
  :data:`MAX_DEPTH` levels and no ``NaN``/``Infinity``;
* a message for offload's dispatchers has their argument shape
  (:func:`offload.dispatch.dispatch_shape_error`).

What fails, and whatever else makes Celery's handler raise, goes to the
*dead letters* (:class:`DeadLetters`): logged with the reason, appended to
``dead-letters.jsonl`` in ``OFFLOAD_DATA_DIR``, its task id marked FAILURE
(:class:`offload.exceptions.RejectedMessage`) unless it already ended, and
acknowledged, so it is never delivered again.

The same consumer sends the worker's task events (received, started,
succeeded, ...) at most every :data:`EVENT_FLUSH_INTERVAL` seconds, a batch
at a time, where Celery sends what it has buffered at the next turn of the
event loop: under load, that was one broker write per event or two, on the
one thread that also takes and acknowledges every task.

A message whose task kills its pool process (a crash, ``os._exit``, the
kernel's OOM killer) is given back to the queue, as ``acks_late`` and
``reject_on_worker_lost`` want; :class:`Request` counts those losses per
task id in the worker and, at the :data:`MAX_WORKER_LOSSES`-th, fails the
task and dead-letters it instead.
"""

from __future__ import annotations

import bz2
import functools
import json
import logging
import lzma
import math
import os
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import signals, states
from celery.worker.consumer import Consumer as _CeleryConsumer
from celery.worker.request import Request as _CeleryRequest
from kombu import compression as _compression
from kombu.serialization import prepare_accept_content

from .datadir import make_private_dirs, private_opener
from .dispatch import dispatch_shape_error, fail_calls
from .exceptions import RejectedMessage
from .ids import is_task_id

__all__ = ["MAX_DEPTH", "MAX_MESSAGE_BYTES", "MAX_WORKER_LOSSES", "Consumer", "DeadLetters", "Request",
           "limit_decompression", "payload_error", "strict_json"]

logger = logging.getLogger("offload.intake")

#: The largest message body a worker reads, after decompression (32 MiB).
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

#: How deep a task's arguments may nest (lists and dicts in one another).
MAX_DEPTH = 100

#: Seconds a worker's task events wait, once one is buffered, for others to
#: be sent with it (Celery's buffer also goes out whenever it holds 24).
EVENT_FLUSH_INTERVAL = 0.05

#: A task whose pool process dies under it this many times is failed and
#: dead-lettered instead of being given back to the queue again.
MAX_WORKER_LOSSES = 3

#: ``dead-letters.jsonl`` is moved aside to ``.1`` past this size.
DEAD_LETTERS_MAX_BYTES = 8 * 1024 * 1024

#: This much of a refused body is kept in the record, enough to recognise it.
_SHOWN_BYTES = 200


# Decompression ----------------------------------------------------------------

def _bounded(make: Callable[[], Any], name: str, limit: int) -> Callable[[bytes], bytes]:
    def decompress(body: bytes) -> bytes:
        inflater = make()
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit:
            raise RejectedMessage(f"the {name} body inflates past {limit} bytes")
        return out

    return decompress


#: kombu's compressions offload can inflate with a bound, by content type.
_BOUNDED_DECOMPRESSORS: dict[str, tuple[Callable[[], Any], str]] = {
    "application/x-gzip": (zlib.decompressobj, "zlib"),
    "application/x-bz2": (bz2.BZ2Decompressor, "bz2"),
    "application/x-lzma": (lzma.LZMADecompressor, "lzma"),
}


def _refuse_compression(content_type: str) -> Callable[[bytes], bytes]:
    def decompress(body: bytes) -> bytes:
        raise RejectedMessage(f"compression {content_type!r} is not one this app uses")

    return decompress


def _content_type_of(compression: str) -> str:
    try:
        return _compression.get_encoder(compression)[1]
    except KeyError:
        return compression


def limit_decompression(used: set[str], limit: int = MAX_MESSAGE_BYTES) -> None:
    """Make kombu inflate only the compressions in ``used``, to at most ``limit`` bytes.

    kombu inflates a message's body when it builds the message, before any
    consumer code runs; its registry (:func:`kombu.compression.register`) is
    the one place to put a bound. Compressions the app does not use refuse
    to inflate (the message is then dead-lettered as undecodable). For this
    process only: a worker calls it when its consumer starts.
    """
    used = {_content_type_of(name) for name in used}
    for content_type in _compression.encoders():
        encoder = _compression.get_encoder(content_type)[0]
        if content_type not in used:
            decoder = _refuse_compression(content_type)
        elif content_type in _BOUNDED_DECOMPRESSORS:
            make, name = _BOUNDED_DECOMPRESSORS[content_type]
            decoder = _bounded(make, name, limit)
        else:  # brotli, zstd, ...: chosen by the app, inflated by kombu as it is
            continue
        _compression.register(encoder, decoder, content_type)


# The payload --------------------------------------------------------------------

_CONTAINERS = frozenset({list, tuple, dict})


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"a non-finite number ({name}) is not JSON; send finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a non-finite number ({text[:20]}) is not JSON; send finite numbers only")
    return value


_strict_loads = functools.partial(json.loads, parse_constant=_refuse_constant, parse_float=_finite_float)


def finite(value: Any, depth: int = 100) -> Any:
    """``value`` with ``None`` for each NaN or infinity in it (``value`` itself if none).

    For what a task stores about itself (``update_state``'s meta): a worker
    reads stored states back with the strict decoder (:func:`strict_json`),
    and JSON has no such numbers. Containers deeper than ``depth`` are kept
    as they are.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth <= 0:
        return value
    if isinstance(value, dict):
        items = {key: finite(item, depth - 1) for key, item in value.items()}
        return value if all(items[key] is value[key] for key in value) else items
    if isinstance(value, (list, tuple)):
        copied = [finite(item, depth - 1) for item in value]
        return value if all(new is old for new, old in zip(copied, value)) else copied
    return value


def strict_json() -> None:
    """Make kombu's JSON decoder refuse ``NaN``, ``Infinity`` and floats that overflow to them.

    Python's parser reads them, JSON has no such numbers; the check costs
    nothing for a body without floats. Registered in kombu's serializer
    registry (its public extension point), for this process only: a
    worker calls it when its consumer starts, and its pool processes
    inherit it.
    """
    from kombu.serialization import registry
    from kombu.utils import json as kombu_json

    registry.register("json", kombu_json.dumps, functools.partial(kombu_json.loads, _loads=_strict_loads),
                      content_type="application/json", content_encoding="utf-8")


def _brackets(text: bytes | str) -> int:
    """How many lists and objects a JSON text opens at most (counted in C)."""
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


def payload_error(value: Any, max_depth: int = MAX_DEPTH, *, floats: bool = True) -> str | None:
    """Why ``value`` (decoded arguments) may not run, or None.

    Lists, tuples and dicts may nest ``max_depth`` levels; with ``floats``,
    a float must be finite (JSON has no ``NaN`` or ``Infinity``, though
    Python's parser reads them). Walked level by level, without recursion:
    a deep value cannot exhaust the stack.
    """
    level = [value]
    depth = 0
    while level:
        if floats:
            for item in level:
                for child in (item.values() if type(item) is dict else item):
                    if isinstance(child, float) and not math.isfinite(child):
                        return f"a non-finite number ({child!r}) is not JSON; send finite numbers only"
        depth += 1
        if depth > max_depth:
            return f"the arguments nest deeper than {max_depth} levels"
        deeper: list[Any] = []
        extend = deeper.extend
        for item in level:
            # type() over isinstance: a third faster, and JSON makes no subclasses.
            extend([child for child in (item.values() if type(item) is dict else item)
                    if type(child) in _CONTAINERS])
        level = deeper
    return None


# Dead letters ------------------------------------------------------------------

class DeadLetters:
    """Where a worker records the messages it refused: a log line and one JSON line each.

    Parameters:
        path: the ``dead-letters.jsonl`` file (None: the log line only).
    """

    #: One worker's consumer and its requests' handlers write from a few threads.
    _lock = threading.Lock()

    def __init__(self, path: str | None) -> None:
        self.path = path

    def record(self, reason: str, *, task_id: Any = None, name: Any = None, body: Any = b"",
               content_type: Any = None, compression: Any = None, queue: Any = None) -> None:
        """Log and append one refused message; never raises."""
        shown = body[:_SHOWN_BYTES] if isinstance(body, (bytes, str)) else repr(body)[:_SHOWN_BYTES]
        logger.error("dead-lettered message %r of task %r: %s (content type %r, compression %r)",
                     task_id, name, reason, content_type, compression)
        if self.path is None:
            return
        entry = {"time": time.time(), "reason": reason, "task_id": _plain(task_id), "name": _plain(name),
                 "content_type": _plain(content_type), "compression": _plain(compression),
                 "queue": _plain(queue), "body": shown.decode("utf-8", "replace")
                 if isinstance(shown, bytes) else shown}
        line = json.dumps(entry) + "\n"
        try:
            with self._lock:
                make_private_dirs(os.path.dirname(self.path) or ".")
                try:
                    if os.path.getsize(self.path) > DEAD_LETTERS_MAX_BYTES:
                        os.replace(self.path, self.path + ".1")
                except FileNotFoundError:
                    pass
                # The bodies are tasks' arguments: owner-only, as the broker's file.
                with open(self.path, "a", encoding="utf-8", opener=private_opener) as out:
                    out.write(line)
        except OSError:
            logger.exception("could not record the dead letter in %s", self.path)


def _plain(value: Any) -> Any:
    """A JSON-safe, short form of a header value from an untrusted message."""
    if value is None or isinstance(value, (bool, int)):
        return value
    return str(value)[:_SHOWN_BYTES]


def _dead_letters(app: Any) -> DeadLetters:
    path = getattr(app, "dead_letters_path", None)  # offload's app sets it; plain Celery's has none
    return DeadLetters(path if isinstance(path, str) else None)


def _fail_unless_ended(app: Any, task_id: Any, error: BaseException) -> None:
    """Mark ``task_id`` FAILURE with ``error`` unless it already has a final state."""
    if not is_task_id(task_id):  # a forged message's id is not written as a key
        return
    from .hub import stores_results

    try:
        backend = app.backend
        if not stores_results(backend):  # rpc:// answers only its sender's reply queue
            return
        if backend.get_task_meta(task_id, cache=False).get("status") in states.READY_STATES:
            return
        backend.mark_as_failure(task_id, error)
    except Exception:  # the result store down: the record and the log still hold it
        logger.warning("could not store the refusal of %r", task_id, exc_info=True)


# The consumer -------------------------------------------------------------------

class Consumer(_CeleryConsumer):
    """Celery's consumer, checking each task message before Celery reads it.

    Installed by offload as ``worker_consumer``. See the module's docstring.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conf = self.app.conf
        self._accepted = prepare_accept_content(conf.accept_content) or set()
        limit_decompression({name for name in (conf.task_compression, conf.result_compression) if name})
        strict_json()

    #: When the buffered events' send is due (0: none scheduled).
    _events_due = 0.0

    def on_send_event_buffered(self) -> None:
        hub = self.hub
        if hub is None:
            return super().on_send_event_buffered()
        now = time.monotonic()
        # Scheduled long past and still due: that timer went with a
        # restarted connection's event loop; schedule again.
        if not self._events_due or now > self._events_due + 1.0:
            self._events_due = now + EVENT_FLUSH_INTERVAL
            hub.call_later(EVENT_FLUSH_INTERVAL, self._send_buffered_events)

    def _send_buffered_events(self) -> None:
        self._events_due = 0.0
        self._flush_events()

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        celery_handler = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors)

        def on_task_received(message: Any) -> None:
            reason = self.message_error(message)
            if reason is not None:
                return self.dead_letter(message, reason)
            try:
                return celery_handler(message)
            except connection_errors:
                raise  # the consumer reconnects; the message comes back
            except Exception as exc:  # noqa: BLE001 (one message never stops the worker)
                logger.debug("the task handler raised", exc_info=True)
                return self.dead_letter(message, f"the worker could not read it: {exc!r}"[:400])

        return on_task_received

    def message_error(self, message: Any) -> str | None:
        """Why a task message may not reach Celery, or None."""
        if message.content_type not in self._accepted:
            return (f"content type {message.content_type!r} is not accepted "
                    f"(accept_content: {sorted(self._accepted)})")
        body = message.body
        if isinstance(body, (bytes, str)) and len(body) > MAX_MESSAGE_BYTES:
            return f"the body is larger than {MAX_MESSAGE_BYTES} bytes"
        headers = message.headers
        if not isinstance(headers, dict):
            return "its headers are not a mapping"
        name, task_id = headers.get("task"), headers.get("id")
        if name is None:
            return None  # Celery's message protocol 1: Celery checks its shape
        if not isinstance(name, str) or not is_task_id(task_id):
            return "its 'task' and 'id' headers are not a task name and a task id"
        try:
            payload = message.decode()
        except Exception as exc:  # noqa: BLE001 (a decode error of any kind, RecursionError too)
            return f"the body cannot be decoded: {exc!r}"[:400]
        if not (isinstance(payload, (list, tuple)) and len(payload) == 3
                and isinstance(payload[0], (list, tuple)) and isinstance(payload[1], dict)
                and (payload[2] is None or isinstance(payload[2], dict))):
            return "the body is not Celery's [args, kwargs, embed]"
        # JSON's floats are checked as they are parsed (strict_json); a body
        # with fewer brackets than the bound cannot nest past it.
        json_body = message.content_type == "application/json" and isinstance(body, (bytes, str))
        error = None
        if not json_body or _brackets(body) > MAX_DEPTH:
            floats = not json_body
            error = payload_error(payload[0], floats=floats) or payload_error(payload[1], floats=floats)
        if error is not None:
            return error
        return dispatch_shape_error(name, payload[0], payload[1])

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        """A body kombu cannot decode (or inflate): dead-lettered, not redelivered."""
        self.dead_letter(message, f"the body cannot be decoded: {exc!r}"[:400])

    def dead_letter(self, message: Any, reason: str) -> None:
        """Record ``message`` as refused for ``reason``, fail its task id, acknowledge it."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id, name = headers.get("id"), headers.get("task")
        delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        _dead_letters(self.app).record(
            reason, task_id=task_id, name=name, body=message.body, content_type=message.content_type,
            compression=headers.get("compression"), queue=delivery.get("routing_key"))
        _fail_unless_ended(self.app, task_id, RejectedMessage(f"the worker refused the message: {reason}"))
        try:
            message.ack_log_error(logger, self.connection_errors)
        except Exception:  # already acknowledged by Celery's handler before it raised
            logger.debug("could not acknowledge a dead letter", exc_info=True)
        signals.task_rejected.send(sender=self, message=message, exc=None)


# The request --------------------------------------------------------------------

class Request(_CeleryRequest):
    """Celery's request, with a bound on how often one task may kill its pool process.

    Installed by offload as its tasks' ``Request`` class.
    """

    #: Task id -> how many pool processes died running it, in this worker.
    #: One worker process serves one app, so a class attribute is per worker.
    _losses: OrderedDict[str, int] = OrderedDict()
    _losses_lock = threading.Lock()
    _MAX_TRACKED = 10_000

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        # Celery gives a lost task back to the queue (reject_on_worker_lost);
        # a process killed by a revoke (terminate) is not a loss. Those flags
        # are Celery's; tests/test_intake.py fails if they change.
        lost = (isinstance(exc, (WorkerLostError, SystemExit)) and self.task.acks_late
                and self.task.reject_on_worker_lost
                and not (getattr(self, "_already_revoked", False) or getattr(self, "_already_cancelled", False)))
        if lost and self._count_loss() >= MAX_WORKER_LOSSES:
            reason = (f"its worker process died running it {MAX_WORKER_LOSSES} times "
                      f"(last: {exc!r})"[:400])
            _dead_letters(self.app).record(reason, task_id=self.id, name=self.task_name,
                                           body=repr(self.args)[:_SHOWN_BYTES])
            try:
                raise RejectedMessage(f"the worker dead-lettered the task: {reason}")
            except RejectedMessage:
                exc_info = ExceptionInfo()
            fail_calls(self.task, self.id, self.args, exc_info.exception)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _count_loss(self) -> int:
        with self._losses_lock:
            count = self._losses.pop(self.id, 0) + 1
            self._losses[self.id] = count
            while len(self._losses) > self._MAX_TRACKED:
                self._losses.popitem(last=False)
            return count
