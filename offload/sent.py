"""``task-sent`` events, published in batches off the sending thread.

offload turns Celery's ``task_send_sent_event`` on, so that the dashboard
(:mod:`offload.events`) sees the tasks that any process queued, not only
its own. Celery publishes each of those events right after its task
message, on the same connection and in the same call: a second broker round
trip per submit, as long as the task's own (and a second publisher confirm
on RabbitMQ).

offload's sender (:class:`offload.reliability.AMQP`) sends the task message
as Celery does and hands its event to the process's :class:`SentEvents`: a
thread that publishes whatever has gathered since its last publish as one
message, the list of events Celery's own workers send for their task events
(routing key ``task.multi``). Every event receiver (Celery's, the
dashboard's, Flower) reads such a list as the events one by one. A lone
submit's event leaves at once; under a burst, the events of all the calls
made during one publish leave in the next.

Events are what the dashboard shows, not what a task needs: while the
broker cannot be reached they wait, at most ``max_pending`` of them (the
oldest are dropped past that, said once in the log), and are sent when it
is back. At exit the thread sends what is left, waiting at most
:data:`EXIT_WAIT` seconds. A forked child starts with none of its parent's.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import weakref
from typing import Any

from celery.events import Event
from celery.events.event import get_exchange
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset

__all__ = ["EXIT_WAIT", "SentEvents"]

logger = logging.getLogger("offload.sent")

#: Seconds the interpreter's exit waits for the events not yet sent.
EXIT_WAIT = 2.0

#: Seconds the thread waits, once woken, for more events to send with the
#: first: a burst's events leave a few dozen at a time, not one by one,
#: each batch costing the sender's thread a publish's CPU and the GIL.
LINGER = 0.05

#: The most events in one message.
BATCH_MAX = 1000

#: A publish's retries before the batch waits for the next attempt.
_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class SentEvents:
    """The ``task-sent`` events of one Celery app in one process, and their thread.

    Parameters:
        app: the Celery app whose broker and event settings are used.
        max_pending: events kept while the broker cannot be reached.
        retry: seconds between attempts while it cannot.
    """

    def __init__(self, app: Any, *, max_pending: int = 10_000, retry: float = 1.0) -> None:
        self.app, self.max_pending, self.retry = app, max_pending, retry
        self.hostname = anon_nodename()
        #: Events dropped because the broker stayed away too long.
        self.dropped = 0
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._done = threading.Condition()
        self._busy = False
        self._lock = threading.Lock()
        self._pid = 0
        self._thread: threading.Thread | None = None

    def add(self, fields: dict[str, Any]) -> None:
        """Queue one task's ``task-sent`` event (its fields, as Celery makes them)."""
        if self._pid != os.getpid() or self._thread is None:
            self._start()
        self._pending.append(Event("task-sent", hostname=self.hostname, utcoffset=utcoffset(),
                                   pid=self._pid, clock=self.app.clock.forward(), **fields))
        if len(self._pending) > self.max_pending:
            self._drop(len(self._pending) - self.max_pending)
        if not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event queued so far has been published; False on timeout."""
        if self._pid != os.getpid():
            return True  # a forked child that has queued nothing yet (its parent's are not its own)
        with self._done:
            return self._done.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float = EXIT_WAIT) -> None:
        """Send what is left (waiting at most ``timeout``) and stop the thread."""
        thread = self._thread
        if thread is None or self._pid != os.getpid() or self._halt.is_set():
            return
        self._halt.set()
        self._wake.set()
        thread.join(timeout)
        if self._pending:
            logger.warning("%d task-sent events were not sent: the broker could not be reached",
                           len(self._pending))

    def _start(self) -> None:
        with self._lock:
            pid = os.getpid()
            if self._pid == pid and self._thread is not None:
                return
            if self._pid and self._pid != pid:
                # A forked child: its parent sends the events it queued.
                self._pending.clear()
                self._wake, self._halt, self._done = threading.Event(), threading.Event(), threading.Condition()
                self._busy = False
            else:
                _open.add(self)
            self._pid = pid
            thread = threading.Thread(target=self._run, name="offload-sent-events", daemon=True)
            thread.start()
            self._thread = thread

    def _drop(self, count: int) -> None:
        if not self.dropped:
            logger.warning("task-sent events are being dropped while the broker cannot be reached "
                           "(more than %d waiting); the dashboard will not list those tasks until "
                           "their workers report them", self.max_pending)
        for _ in range(count):
            try:
                self._pending.popleft()
            except IndexError:
                break
            self.dropped += 1

    def _run(self) -> None:
        conf = self.app.conf
        connection: Any = None
        producer: Any = None
        exchange: Any = None
        failing = False
        while True:
            self._wake.wait()
            if self._halt.wait(LINGER):
                pass  # closing: send what is there now
            self._wake.clear()
            while self._pending:
                with self._done:
                    self._busy = True
                    batch = [self._pending.popleft() for _ in range(min(len(self._pending), BATCH_MAX))]
                try:
                    if connection is None:
                        connection = self.app.connection_for_write()
                        producer = connection.Producer(serializer=conf.event_serializer, auto_declare=False)
                        exchange = get_exchange(connection, name=conf.event_exchange)
                    producer.publish(batch, routing_key="task.multi", exchange=exchange.name,
                                     declare=[exchange], serializer=conf.event_serializer,
                                     headers={"hostname": self.hostname}, delivery_mode=1,
                                     retry=True, retry_policy=_RETRY_POLICY)
                except Exception as exc:  # the broker is away: keep the batch, try again later
                    self._pending.extendleft(reversed(batch))
                    if len(self._pending) > self.max_pending:
                        self._drop(len(self._pending) - self.max_pending)
                    (logger.debug if failing else logger.warning)(
                        "could not send task-sent events (%r); trying again every %.1f s", exc, self.retry)
                    failing = True
                    if connection is not None:
                        connection.collect()
                        connection = None
                    if self._halt.wait(self.retry):
                        return
                    continue
                finally:
                    self._settle()
                if failing:
                    logger.info("task-sent events are sent again")
                    failing = False
            if self._halt.is_set():
                if connection is not None:
                    connection.release()
                return

    def _settle(self) -> None:
        with self._done:
            self._busy = False
            self._done.notify_all()


#: The instances that have a thread, closed at exit.
_open: weakref.WeakSet[SentEvents] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sender in list(_open):
        sender.close()
