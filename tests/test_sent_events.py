"""``task-sent`` events (offload.sent): every sent task reported once, in
batches, from a thread of the sender's, on every broker.

An event tap of the test's own reads the event exchange as any receiver
does (a queue of Celery's event receiver), and keeps each message's body:
a batch is one message holding a list.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from celery import Celery

from conftest import dead_broker_url, wait_until, worker_env
from offload.sent import SentEvents
from testapp import add

pytestmark = pytest.mark.timeout(120)


class Tap:
    """The messages of the app's event exchange, as they arrive."""

    def __init__(self) -> None:
        self.bodies: list[object] = []
        self.ready = threading.Event()

    def sent(self, ids: set[str]) -> list[dict]:
        """The task-sent events of ``ids`` received so far, one per arrival."""
        return [event for event in self.events() if event.get("type") == "task-sent" and event.get("uuid") in ids]

    def events(self) -> Iterator[dict]:
        for body in list(self.bodies):
            yield from (body if isinstance(body, list) else [body])

    def messages_of(self, ids: set[str]) -> int:
        """How many messages carried the task-sent events of ``ids``."""
        return sum(1 for body in list(self.bodies)
                   if any(e.get("type") == "task-sent" and e.get("uuid") in ids
                          for e in (body if isinstance(body, list) else [body])))


@contextmanager
def tap(celery: Celery) -> Iterator[Tap]:
    found, stop = Tap(), threading.Event()

    def run() -> None:
        with celery.connection_for_read() as connection:
            queue = celery.events.Receiver(connection, handlers={}).queue
            with connection.Consumer([queue], callbacks=[lambda body, message: found.bodies.append(body)],
                                     accept=["json"]):
                found.ready.set()
                while not stop.is_set():
                    try:
                        connection.drain_events(timeout=0.2)
                    except (socket.timeout, TimeoutError):
                        pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert found.ready.wait(30), "the event tap could not consume"
        yield found
    finally:
        stop.set()
        thread.join(10)


def test_a_burst_reports_each_task_once_in_batches(off):
    with tap(off.celery) as events:
        futures = [off.submit(add, i, 1) for i in range(200)]
        ids = {f.id for f in futures}
        assert wait_until(lambda: len(events.sent(ids)) >= len(ids), timeout=30), len(events.sent(ids))
        sent = events.sent(ids)
        assert sorted(e["uuid"] for e in sent) == sorted(ids)  # each once
        assert {e["queue"] for e in sent} == {off.celery.conf.task_default_queue}
        assert all(e["pid"] == os.getpid() and e["name"] == "offload.dispatch" for e in sent)
        # Batched: far fewer messages than events (one per publish of the
        # sender's thread, which waits for more before it sends).
        assert events.messages_of(ids) <= len(ids) // 4
        assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(200)]


def test_a_lone_submit_is_reported_without_waiting_for_more(off):
    with tap(off.celery) as events:
        future = off.submit(add, 2, 3)
        assert wait_until(lambda: events.sent({future.id}), timeout=10)
        assert future.result(timeout=60) == 5


def test_a_script_that_exits_at_once_still_reports_what_it_sent(redis_off, tmp_path):
    script = tmp_path / "send_and_exit.py"
    script.write_text(
        "from testapp.on_redis import off\n"
        "from testapp import add\n"
        "print(','.join(off.submit(add, i, i).id for i in range(3)), flush=True)\n")
    with tap(redis_off.celery) as events:
        done = subprocess.run([sys.executable, str(script)], env=worker_env(), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        ids = set(done.stdout.strip().split(","))
        # The process has exited: its exit sent what was left.
        assert wait_until(lambda: len(events.sent(ids)) == 3, timeout=10), events.sent(ids)


def test_a_forked_child_reports_its_own_tasks_and_not_its_parents(redis_off):
    sender = redis_off.celery.amqp.sent_events
    with tap(redis_off.celery) as events:
        before = redis_off.submit(add, 1, 1)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: submit, wait for its own events to leave, exit
            try:
                child = redis_off.submit(add, 2, 2)
                ok = redis_off.celery.amqp.sent_events.flush(10)
                os.write(write, f"{child.id} {int(ok)}".encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            child_id, flushed = pipe.read().split()
        os.waitpid(pid, 0)
        assert flushed == "1"
        after = redis_off.submit(add, 3, 3)
        ids = {before.id, child_id, after.id}
        assert wait_until(lambda: len(events.sent(ids)) >= 3, timeout=10)
        by_id = {e["uuid"]: e for e in events.sent(ids)}
        assert len(events.sent(ids)) == 3  # the child sent none of its parent's
        assert by_id[child_id]["pid"] == pid and by_id[before.id]["pid"] == by_id[after.id]["pid"] == os.getpid()
        assert sender.flush(10)
        assert [f.result(timeout=60) for f in (before, after)] == [2, 6]


def test_an_unreachable_broker_keeps_a_bounded_backlog_and_says_so_once(caplog):
    app = Celery(broker=dead_broker_url("redis"), set_as_current=False)
    app.conf.broker_connection_timeout = 0.5
    sender = SentEvents(app, max_pending=5, retry=0.05)
    caplog.set_level(logging.DEBUG, logger="offload.sent")
    try:
        for i in range(20):
            sender.add({"uuid": f"task-{i}", "name": "x"})
        assert wait_until(lambda: sender.dropped == 15, timeout=20)
        # Still failing: attempts go on, said once at warning level.
        assert wait_until(lambda: sum("could not send" in r.getMessage() for r in caplog.records) >= 2,
                          timeout=20)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert sum("could not send" in m for m in warnings) == 1
        assert sum("being dropped" in m for m in warnings) == 1
        assert not sender.flush(0.1)
    finally:
        began = time.monotonic()
        sender.close(timeout=5)
    assert time.monotonic() - began < 6
    assert any("were not sent" in r.getMessage() for r in caplog.records)


def test_a_workers_task_events_leave_in_batches_and_all_arrive(off, broker):
    """The worker's consumer sends its buffered task events every 50 ms
    (offload.intake.EVENT_FLUSH_INTERVAL), not at every turn of its loop."""
    with tap(off.celery) as events:
        futures = [off.submit(add, i, 2) for i in range(100)]
        assert [f.result(timeout=60) for f in futures] == [i + 2 for i in range(100)]
        ids = {f.id for f in futures}

        def worker_events() -> list[dict]:
            return [e for e in events.events() if e.get("uuid") in ids and e.get("type") != "task-sent"]

        kinds = ("task-received", "task-started", "task-succeeded")
        assert wait_until(lambda: len(worker_events()) >= 3 * len(ids), timeout=30), len(worker_events())
        seen = {(e["uuid"], e["type"]) for e in worker_events()}
        assert seen == {(task_id, kind) for task_id in ids for kind in kinds}
        carried = sum(1 for body in list(events.bodies)
                      if any(e.get("uuid") in ids and e.get("type") in kinds
                             for e in (body if isinstance(body, list) else [body])))
        if broker != "embedded":  # a worker with an event loop buffers its task events
            assert carried <= len(seen) // 4, carried
