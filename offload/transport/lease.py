"""A process's lease on the broker file: its heartbeat, and coming back from a pause.

A consuming process registers once (a row in ``consumers``) and a heartbeat
thread renews the row every ``visibility_timeout / 5`` seconds. Others treat
it as dead once its row is older than ``visibility_timeout``: four heartbeats
missed in a row, the margin that keeps a busy but live process from being
swept. A sweeper that was itself late (its own previous beat is older than
half the timeout: the whole machine was suspended) does not sweep in that
round, so processes resuming together give each other time to beat first.

When a process was paused for longer than that anyway (``SIGSTOP``, a
laptop suspend, a paused VM) it finds its row gone at its next beat or its
next take, and :meth:`ConsumerLease.renew` recovers: it registers again,
re-declares the queues it owned (a worker's pidbox queue) and their
bindings, so remote control reaches it again, and leases again the messages
it still held that are still waiting in their queue, so a task it is running
is not delivered a second time. Those another consumer took meanwhile are
given up: this process's ack of them is then a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from .store import Store
from .wakeup import Waker

__all__ = ["ConsumerLease"]

logger = logging.getLogger("offload.transport.sqlite")

#: (exchange, routing_key, pattern, queue)
Binding = tuple[str, str, str, str]


class ConsumerLease:
    """One process's registration as a consumer of one broker file.

    ``notify`` pokes every waiting consumer (after a sweep made messages
    ready). Made per process: a forked child gets its own id, socket and
    heartbeat (see :attr:`pid`).
    """

    def __init__(self, store: Store, visibility_timeout: float, notify: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pid = os.getpid()
        self.id = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self.store = store
        self.visibility_timeout = visibility_timeout
        self.interval = max(0.1, visibility_timeout / 5)
        self.waker: Waker | None = None
        self._notify = notify
        self._clock = clock  # monotonic seconds; a test can make a pause out of it
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._last_beat = 0.0  # clock() of the last beat written
        self._held: set[int] = set()
        self._owned: dict[str, float | None] = {}
        self._bindings: set[Binding] = set()

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Register and start beating (once); safe to call before every take."""
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            try:
                self.waker = Waker()
            except OSError:
                logger.info("no unix socket for wake-ups; polling instead", exc_info=True)
            self.store.beat(self.id, self.wake_address)
            self._last_beat = self._clock()
            self._started = True
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat_forever, name="offload-sqlite-heartbeat",
                                            daemon=True)
            self._thread.start()

    @property
    def wake_address(self) -> str | None:
        return self.waker.address if self.waker is not None else None

    # What this process holds and owns ------------------------------------------

    def hold(self, row_id: int) -> None:
        """A message leased to this process (until :meth:`let_go`)."""
        with self._lock:
            self._held.add(row_id)

    def let_go(self, row_id: int) -> None:
        with self._lock:
            self._held.discard(row_id)

    def held(self) -> set[int]:
        with self._lock:
            return set(self._held)

    def own_queue(self, queue: str, ttl: float | None) -> None:
        """A queue that lives as long as this process (declared with this owner)."""
        with self._lock:
            self._owned[queue] = ttl

    def owns(self, queue: str) -> bool:
        return queue in self._owned

    def disown_queue(self, queue: str) -> None:
        with self._lock:
            self._owned.pop(queue, None)
            self._bindings = {b for b in self._bindings if b[3] != queue}

    def record_binding(self, binding: Binding) -> None:
        """A binding of an owned queue: the sweep drops it with the queue."""
        with self._lock:
            self._bindings.add(binding)

    def forget_binding(self, binding: Binding) -> None:
        with self._lock:
            self._bindings.discard(binding)

    # Renewal -----------------------------------------------------------------------

    def ensure_fresh(self) -> None:
        """Before a take: if no beat was written for half the timeout (this
        process was paused), renew now, so that what this process held is
        reclaimed before it could take one of those messages again."""
        if self._started and self._clock() - self._last_beat > self.visibility_timeout / 2:
            self.renew(sweep=False)

    def renew(self, sweep: bool = True) -> None:
        """Beat; recover if the lease had lapsed; then (``sweep``) recover what
        dead consumers held, unless this process was itself late."""
        with self._lock:
            if self._stop.is_set():
                return  # stopping: unregistered, must not register again
            since_last = self._clock() - self._last_beat
            alive = self.store.beat(self.id, self.wake_address)
            self._last_beat = self._clock()
            if not alive:
                self._recover()
        if sweep and since_last < self.visibility_timeout / 2:
            if self.store.sweep(self.visibility_timeout):
                self._notify()

    def _recover(self) -> None:
        for queue, ttl in self._owned.items():
            self.store.declare_queue(queue, self.id, ttl)
        for binding in self._bindings:
            self.store.bind(*binding)
        held = sorted(self._held)
        kept = self.store.reclaim(held, self.id) if held else set()
        lost = set(held) - kept
        self._held -= lost
        logger.warning(
            "sqlite broker: this process's lease had lapsed (was it paused for longer than "
            "visibility_timeout=%gs?); registered again with %d queue(s) and %d binding(s); "
            "%d message(s) it held reclaimed, %d taken by another consumer meanwhile",
            self.visibility_timeout, len(self._owned), len(self._bindings), len(kept), len(lost))

    def _beat_forever(self) -> None:
        store = self.store
        while not self._stop.wait(self.interval):
            if os.getpid() != self.pid:
                return
            try:
                self.renew(sweep=True)
                store.compact()
            except Exception:
                logger.warning("sqlite broker heartbeat failed; retrying", exc_info=True)
        store.close()

    # The end -------------------------------------------------------------------------

    def stop(self) -> None:
        """A clean exit: give back what is held, drop owned queues, unregister."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.store.lock_timeout)  # a beat in flight ends first
        if self._started and self.pid == os.getpid():
            try:
                self.store.unregister(self.id)
                self._notify()
            except Exception:
                logger.debug("could not unregister %s", self.id, exc_info=True)
        self._started = False
        self.abandon()

    def abandon(self) -> None:
        """Let go of the socket without touching the file (a forked child
        drops its parent's lease this way)."""
        self._stop.set()
        if self.waker is not None:
            self.waker.close()
            self.waker = None
