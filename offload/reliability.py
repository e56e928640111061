"""Worker-side reliability: lease renewal on Redis, and a task cancelled after
a broker connection loss handed back rather than revoked.

Lease renewal. kombu's Redis transport makes a message that a worker took visible again once
``visibility_timeout`` has passed since delivery, unless it was acknowledged.
With late acks that is what brings back the tasks of a killed worker, but a
healthy worker running a task for longer than the timeout would see it
delivered a second time. offload keeps the timeout short (seconds, so a crash
is recovered quickly) and has every live worker renew the lease of the
messages it holds: it moves their delivery time forward a few times per
timeout, so only a worker that stopped renewing (a dead one) loses them.

Hand-back. When the worker loses its broker connection, the tasks it runs
with late acks can no longer be acknowledged on that connection, and the
broker gives their messages out again (RabbitMQ at once, Redis after the
visibility timeout). ``worker_cancel_long_running_tasks_on_connection_loss``,
which offload turns on, stops them so that they do not also run to the end
here, a second run beside the redelivered one. Celery records such a
cancellation as a retry in the result backend, and when that write fails
(the store is on the broker that just died) it goes on as if the task had
been *revoked*: REVOKED is stored once the store is back, futures raise
``TaskRevokedError``, and the redelivered message is then skipped as
revoked: the task is lost. :class:`Request` makes a cancellation a hand-back:
nothing is written, the message stays unacknowledged, and once the worker
has reconnected :class:`HandBack` puts the messages it held back on their
queue at once (Redis), rather than after the visibility timeout. (offload's
own Redis transport does so for every message a lost connection held,
those of requests received but not started too, which Celery drops when it
reconnects: :mod:`offload.transport.redis`; the step is for kombu's.)
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from typing import Any

from celery import bootsteps
from celery.app.amqp import AMQP as _CeleryAMQP
from celery.worker.state import task_ready
from kombu.transport.virtual import Channel as _VirtualChannel

from .intake import Request as _IntakeRequest
from .sent import SentEvents

__all__ = ["AMQP", "HandBack", "RedisLeaseRenewal", "Request"]

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


#: Delivery tags of the messages whose tasks were cancelled after a connection
#: loss, to give back once connected again. One set per worker process: the
#: consumer and the requests it made live in that process's main thread.
_handed_back: set[str] = set()


class Request(_IntakeRequest):
    """Celery's worker request (with :mod:`offload.intake`'s bound on pool
    process deaths), whose cancellation hands the task back.

    A cancelled request (a broker connection loss, a cold shutdown) is never
    announced REVOKED and writes nothing to the result backend: its message
    is still unacknowledged, so the broker delivers it again and the task runs
    again. Offload's task base class uses it (``Task.Request``).
    """

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        # Before the pool reports the job terminated: Celery's on_failure
        # announces a terminated job revoked unless it knows it was cancelled.
        self._already_cancelled = True
        delivery_tag = getattr(self._message, "delivery_tag", None)
        if delivery_tag is not None and not self.acknowledged:
            _handed_back.add(delivery_tag)
        super().cancel(pool, signal, emit_retry=False)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        if (getattr(exc_info, "internal", False) and self.task.acks_late and not self.acknowledged
                and _is_connection_error(exc, self.task.backend)):
            # Storing the state or the result failed, not the task: Celery
            # would acknowledge the message and record a FAILURE it cannot
            # store, and the task would stay PENDING for good. Given back,
            # it runs again once the backend answers.
            logger.warning("%s[%s]: the result backend was unreachable (%s); the task is handed back "
                           "to run again", self.name, self.id, exc)
            self._already_cancelled = True
            task_ready(self)
            delivery_tag = getattr(self._message, "delivery_tag", None)
            if delivery_tag is not None:
                _handed_back.add(delivery_tag)
            self.reject(requeue=True)
            return None
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _announce_cancelled(self, emit_retry: bool = True) -> None:
        # No RETRY write: the store may be the broker that just went away,
        # and the state the task had (STARTED) is still true of the next run.
        super()._announce_cancelled(emit_retry=False)


def _is_connection_error(exc: BaseException, backend: Any) -> bool:
    """True for an error reaching the result backend (Redis, a database, a socket)."""
    errors = tuple(getattr(backend, "connection_errors", ()) or ())
    return isinstance(exc, (OSError, *errors)) or type(exc).__name__ in ("ConnectionError", "TimeoutError")


class HandBack(bootsteps.StartStopStep):
    """A consumer step: once reconnected, put the cancelled tasks' messages back.

    On kombu's Redis transport a message stays leased to the old connection
    until the visibility timeout; the new connection puts it back on its
    queue at once (``QoS.restore_by_tag``). offload's Redis transport does
    that itself (:mod:`offload.transport.redis`). RabbitMQ requeues a closed connection's
    messages itself, and the embedded broker returns them when the lease of
    the process that held them lapses: nothing to do there.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if not _handed_back:
            return
        channel = getattr(getattr(c, "task_consumer", None), "channel", None)
        qos = getattr(channel, "qos", None)
        restore = getattr(qos, "restore_by_tag", None)
        if restore is None or hasattr(qos, "settle_orphans"):
            # Nothing to restore here, or offload's Redis transport, which
            # gives back every message a lost connection held (and a failed
            # requeue) itself, unless another worker has taken it since: a
            # restore here, after that, could requeue a message running
            # elsewhere.
            _handed_back.clear()
            return
        for tag in list(_handed_back):
            try:
                restore(tag)  # at the head of its queue: it runs next
            except Exception:  # left for the visibility timeout's sweep
                logger.debug("could not give back %s now", tag, exc_info=True)
            _handed_back.discard(tag)
        logger.info("gave back the messages of the tasks stopped when the broker connection was lost")


class AMQP(_CeleryAMQP):
    """Celery's message sender, without a broker-side TTL for ``expires``.

    Celery turns ``expires`` into the message's ``expiration`` as well, and
    RabbitMQ drops a message whose TTL passes while it waits in the queue
    (behind a busy worker): no worker ever sees it, nothing records REVOKED,
    and its Future waits for good. Without the TTL the expiry still travels
    in the task message, and the worker that takes it after that time skips
    it and records REVOKED, as on Redis and the embedded broker, which have
    no per-message TTL.

    And each task's ``task-sent`` event is not a second publish of the
    call's own: :class:`offload.sent.SentEvents` sends them in batches.
    """

    def _create_task_sender(self) -> Any:
        send = super()._create_task_sender()

        def send_task_message(producer: Any, name: str, message: Any, **kwargs: Any) -> Any:
            kwargs.pop("expiration", None)
            # Already in the message's headers (create_task_message): Celery
            # would copy them into its properties as well, a second time.
            kwargs.pop("argsrepr", None)
            kwargs.pop("kwargsrepr", None)
            queue, exchange = kwargs.get("queue"), kwargs.get("exchange")
            if kwargs.get("declare") is None and _declared(producer, self, queue, exchange):
                # kombu would check the same cache, after building a retrying
                # wrapper around the check on every publish.
                kwargs["declare"] = ()
            sent = message.sent_event
            if sent is None:
                return send(producer, name, message, **kwargs)
            # Its task-sent event leaves with others, from a thread of its
            # own (offload.sent), not as a second round trip of this call.
            result = send(producer, name, message._replace(sent_event=None), **kwargs)
            qname = getattr(queue, "name", queue) or (self.default_queue.name if exchange is None else None)
            sent.update(queue=qname, exchange=getattr(exchange, "name", exchange) or "",
                        routing_key=kwargs.get("routing_key") or qname)
            self.sent_events.add(sent)
            return result

        return send_task_message

    @cached_property
    def sent_events(self) -> SentEvents:
        """This app's ``task-sent`` events, sent in batches (one per process)."""
        return SentEvents(self.app)


def _declared(producer: Any, amqp: Any, queue: Any, exchange: Any) -> bool:
    """Whether ``queue`` is declared already on a Redis-like broker's connection.

    Virtual transports only (Redis, the embedded broker): a message to a
    direct queue there needs no declaration to arrive, so a publish retried
    on a new connection loses nothing without it. RabbitMQ keeps kombu's
    declaration on every attempt.
    """
    channel = getattr(producer, "channel", None)
    if not isinstance(channel, _VirtualChannel) or channel.connection is None:
        return False
    if queue is None and exchange is None:
        queue = amqp.default_queue
    elif isinstance(queue, str):
        queue = amqp.queues.get(queue)
    if queue is None or not queue.can_cache_declaration:
        return False
    return hash(queue) in channel.connection.client.declared_entities
