"""The embedded sqlite broker (offload.transport.sqlite): kombu-level behaviour
on a file of its own, then real worker processes on it: crashes, many
producers, remote control, revoke, purge, countdown and routing."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from conftest import WorkerProcess, wait_ready, wait_until, worker_env
from offload import BrokerUnavailable, ConfigurationError, Offload
from offload.transport import DatabaseLocked, SQLiteFileError, default_settings
from offload.transport.lease import ConsumerLease
from offload.transport.store import WAL_KEPT, Store
from testapp import add, noop, settings, sleep_then, test_id, whoami




def disk_size(db: Path) -> int:
    """The bytes the broker holds on disk: the file and its write-ahead log."""
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


@pytest.fixture
def child_env(data_root) -> dict[str, str]:
    """The environment for a helper process (offload and tests/ importable)."""
    return worker_env()


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "broker.db"


@pytest.fixture
def conn(db):
    with Connection(f"sqlite:///{db}", transport_options={"visibility_timeout": 1}) as connection:
        yield connection


# URLs and bad input ----------------------------------------------------------


def test_default_settings_point_at_files_under_the_data_dir(tmp_path):
    conf = default_settings(str(tmp_path / "data"))
    assert conf["broker_url"] == f"sqlite:///{tmp_path}/data/offload-broker.sqlite3"
    assert conf["result_backend"] == f"sqlite:///{tmp_path}/data/offload-results.sqlite3"
    assert not (tmp_path / "data").exists()  # nothing is created before it is used


def test_bare_sqlite_url_means_the_data_dir(tmp_path):
    off = Offload({"CELERY_BROKER_URL": "sqlite://", "OFFLOAD_DATA_DIR": str(tmp_path)})
    assert off.celery.conf.broker_url == f"sqlite:///{tmp_path}/offload-broker.sqlite3"
    # A sqlite broker alone gets the sqlite backend next to it.
    assert off.celery.conf.result_backend == f"sqlite:///{tmp_path}/offload-results.sqlite3"


@pytest.mark.parametrize("url, message", [
    ("sqlite://somehost/q.db", "names a host"),
    ("sqlite:////tmp/folder/", "names a folder"),
    ("sqlite:///:memory:", "in-memory"),
])
def test_malformed_urls_fail_when_configured(url, message):
    with pytest.raises(ConfigurationError, match=message):
        Offload({"CELERY_BROKER_URL": url})


def test_unwritable_path_says_which_folder(tmp_path):
    off = Offload({"CELERY_BROKER_URL": "sqlite:////proc/offload-nope/broker.db",
                   "CELERY_RESULT_BACKEND": f"sqlite:///{tmp_path}/r.db"})
    with pytest.raises(BrokerUnavailable, match=r"/proc/offload-nope.*writable folder"):
        off.submit(noop)


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not sqlite " * 100)
    off = Offload({"CELERY_BROKER_URL": f"sqlite:///{bogus}",
                   "CELERY_RESULT_BACKEND": f"sqlite:///{tmp_path}/r.db"})
    with pytest.raises(BrokerUnavailable, match="notes.txt.*not a database"):
        off.submit(noop)
    assert bogus.read_text() == "not sqlite " * 100  # left alone


# The transport on its own ----------------------------------------------------


def test_direct_routing_ack_and_queue_size(conn):
    exchange = Exchange("jobs", "direct")
    fast, slow = Queue("fast", exchange, "fast"), Queue("slow", exchange, "slow")
    producer = conn.Producer()
    for i in range(3):
        producer.publish({"n": i}, exchange=exchange, routing_key="fast", declare=[fast, slow])
    producer.publish({"n": 99}, exchange=exchange, routing_key="slow")
    channel = conn.default_channel
    assert fast(channel).queue_declare(passive=True).message_count == 3
    assert slow(channel).queue_declare(passive=True).message_count == 1
    got = []
    with conn.Consumer([fast], callbacks=[lambda body, m: (got.append(body["n"]), m.ack())]):
        while len(got) < 3:
            conn.drain_events(timeout=2)
    assert got == [0, 1, 2]  # FIFO
    assert fast(channel).queue_declare(passive=True).message_count == 0


def test_priorities_take_the_highest_first(conn):
    queue = Queue("prio", Exchange("prio"), "prio", max_priority=9)
    producer = conn.Producer()
    for priority in (1, 9, 5):
        producer.publish({"p": priority}, exchange=queue.exchange, routing_key="prio",
                         priority=priority, declare=[queue])
    bound = queue(conn.default_channel)
    assert [bound.get(no_ack=True).payload["p"] for _ in range(3)] == [9, 5, 1]


def test_queues_on_several_channels_are_served_in_publish_order(conn):
    """A worker's control channel and task channel: a revoke broadcast sent
    before a task is delivered before it, whichever channel it is on."""
    control = Queue("control", Exchange("control", "fanout"))
    tasks = Queue("tasks", Exchange("tasks"), "tasks", max_priority=9)
    producer = conn.Producer()
    producer.publish({"n": 0}, exchange=tasks.exchange, routing_key="tasks", declare=[tasks, control])
    producer.publish({"n": 1}, exchange=control.exchange, routing_key="")
    producer.publish({"n": 2}, exchange=tasks.exchange, routing_key="tasks")
    producer.publish({"n": 3}, exchange=control.exchange, routing_key="")
    producer.publish({"n": 4, "urgent": True}, exchange=tasks.exchange, routing_key="tasks", priority=9)
    got = []
    handle = lambda body, message: (got.append(body["n"]), message.ack())  # noqa: E731
    with conn.Consumer([tasks], channel=conn.channel(), callbacks=[handle]), \
            conn.Consumer([control], channel=conn.channel(), callbacks=[handle], no_ack=True):
        while len(got) < 5:
            conn.drain_events(timeout=2)
    assert got == [4, 0, 1, 2, 3]  # the most urgent first, then as published


def test_fanout_reaches_every_bound_queue_in_other_processes(conn, db, child_env):
    exchange = Exchange("broadcast", "fanout")
    mine = Queue("mine", exchange)
    mine(conn.default_channel).declare()
    # Another process binds its own queue, then publishes a broadcast.
    script = f"""
        import offload
        from kombu import Connection, Exchange, Queue
        with Connection("sqlite:///{db}") as c:
            ex = Exchange("broadcast", "fanout")
            Queue("theirs", ex)(c.default_channel).declare()
            c.Producer().publish({{"hello": "all"}}, exchange=ex, declare=[ex])
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, env=child_env)
    for name in ("mine", "theirs"):
        message = Queue(name)(conn.default_channel).get(no_ack=True)
        assert message is not None and message.payload == {"hello": "all"}


def test_topic_routing(conn):
    exchange = Exchange("events", "topic")
    errors = Queue("errors", exchange, "*.error")
    everything = Queue("everything", exchange, "#")
    producer = conn.Producer()
    producer.publish({"e": 1}, exchange=exchange, routing_key="db.error", declare=[errors, everything])
    producer.publish({"e": 2}, exchange=exchange, routing_key="db.info")
    channel = conn.default_channel
    assert errors(channel).queue_declare(passive=True).message_count == 1
    assert everything(channel).queue_declare(passive=True).message_count == 2


def test_purge_removes_only_ready_messages(conn):
    queue = Queue("purge-me", Exchange("purge-me"), "purge-me")
    producer = conn.Producer()
    for i in range(5):
        producer.publish({"i": i}, exchange=queue.exchange, routing_key="purge-me", declare=[queue])
    bound = queue(conn.default_channel)
    held = bound.get()  # leased, not acked: a purge must not take it away
    assert bound.purge() == 4
    held.reject(requeue=True)
    assert bound.queue_declare(passive=True).message_count == 1


def test_unacked_message_stays_invisible_while_its_consumer_lives(conn, db):
    queue = Queue("held", Exchange("held"), "held")
    conn.Producer().publish({"x": 1}, exchange=queue.exchange, routing_key="held", declare=[queue])
    message = queue(conn.default_channel).get()
    with Connection(f"sqlite:///{db}", transport_options={"visibility_timeout": 1}) as other:
        # Three visibility timeouts: the holder's heartbeat keeps the lease.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert queue(other.default_channel).get(no_ack=True) is None
            time.sleep(0.2)
    message.ack()
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM messages WHERE queue='held'").fetchone()[0] == 0


def test_closing_a_connection_gives_its_messages_back_at_once(db):
    queue = Queue("returned", Exchange("returned"), "returned")
    with Connection(f"sqlite:///{db}") as first:
        first.Producer().publish({"x": 1}, exchange=queue.exchange, routing_key="returned",
                                 declare=[queue])
        assert queue(first.default_channel).get() is not None  # taken, never acked
    with Connection(f"sqlite:///{db}") as second:
        message = queue(second.default_channel).get()
        assert message is not None and message.payload == {"x": 1}
        message.ack()


def test_a_message_given_back_is_marked_redelivered(db):
    # What AMQP and kombu's Redis transport do, and what Celery's
    # Reject(requeue=True) relies on (Celery's test_reject_with_requeue_...).
    queue = Queue("again", Exchange("again"), "again")
    with Connection(f"sqlite:///{db}") as first:
        first.Producer().publish({"x": 1}, exchange=queue.exchange, routing_key="again",
                                 declare=[queue])
        message = queue(first.default_channel).get()
        assert message.delivery_info.get("redelivered") is not True
        message.reject(requeue=True)
        message = queue(first.default_channel).get()
        assert message.delivery_info["redelivered"] is True and message.payload == {"x": 1}
        # Not acked: closing the connection gives it back, redelivered still.
    with Connection(f"sqlite:///{db}") as second:
        message = queue(second.default_channel).get()
        assert message.delivery_info["redelivered"] is True
        message.ack()


def test_a_killed_consumers_message_comes_back_after_the_visibility_timeout(conn, db, child_env):
    queue = Queue("orphan", Exchange("orphan"), "orphan")
    conn.Producer().publish({"x": 7}, exchange=queue.exchange, routing_key="orphan", declare=[queue])
    script = f"""
        import os, signal
        import offload
        from kombu import Connection, Queue
        c = Connection("sqlite:///{db}", transport_options={{"visibility_timeout": 1}})
        assert Queue("orphan")(c.default_channel).get() is not None
        os.kill(os.getpid(), signal.SIGKILL)  # no ack, no clean-up: a crash
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=child_env)
    assert proc.returncode == -9
    bound = queue(conn.default_channel)
    assert bound.get(no_ack=True) is None  # still leased by the dead process
    started = time.monotonic()
    box = []
    assert wait_until(lambda: box.append(bound.get()) or box[-1] is not None, timeout=10)
    assert box[-1].payload == {"x": 7}
    box[-1].ack()
    assert time.monotonic() - started < 5


def test_a_paused_consumer_gives_up_what_was_redelivered_meanwhile(conn, db, child_env):
    """A consumer paused past the visibility timeout, whose message another
    consumer took meanwhile: its late ack must not delete the row the other
    one now holds (which acks it itself)."""
    queue = Queue("given-up", Exchange("given-up"), "given-up")
    conn.Producer().publish({"x": 1}, exchange=queue.exchange, routing_key="given-up", declare=[queue])
    script = f"""
        import sys, offload
        from kombu import Connection, Queue
        c = Connection("sqlite:///{db}", transport_options={{"visibility_timeout": 1}})
        message = Queue("given-up")(c.default_channel).get()
        print("took", flush=True)
        sys.stdin.readline()
        message.ack()
        print("acked", flush=True)
        sys.stdin.readline()
    """
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=child_env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "took"
        os.kill(child.pid, signal.SIGSTOP)
        try:
            bound = queue(conn.default_channel)
            box = []
            assert wait_until(lambda: box.append(bound.get()) or box[-1] is not None, timeout=20)
            mine = box[-1]
            assert mine.delivery_info["redelivered"] is True
        finally:
            os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "acked"
        assert _raw(db, "SELECT count(*) FROM messages WHERE queue = 'given-up'") == 1  # still ours
        mine.ack()
        assert _raw(db, "SELECT count(*) FROM messages WHERE queue = 'given-up'") == 0
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_sweeper_that_was_paused_itself_sweeps_no_one_that_round(db):
    """The whole machine slept (a suspended laptop): every consumer wakes with
    a heartbeat older than the visibility timeout. The first to run its sweep
    must not sweep the others before they had a chance to beat."""
    store = Store(str(db))
    now = [1000.0]
    lease = ConsumerLease(store, visibility_timeout=60, notify=lambda: None, clock=lambda: now[0])
    lease.start()
    try:
        store.beat("other", None)
        store.put("q", 0, json.dumps({"x": 1}))
        assert store.take("q", "other") is not None
        # Both slept for 90 s: the other's beat in the file is 90 s old ...
        with sqlite3.connect(db) as raw:
            raw.execute("UPDATE consumers SET beat = beat - 90 WHERE id = 'other'")
        now[0] += 90  # ... and so is ours, by our own clock.
        lease.renew(sweep=True)
        assert _raw(db, "SELECT count(*) FROM consumers WHERE id = 'other'") == 1
        assert _raw(db, "SELECT count(*) FROM messages WHERE owner = 'other'") == 1
        # A round later, on time: the other has still not beaten, so it is dead.
        now[0] += 1
        lease.renew(sweep=True)
        assert _raw(db, "SELECT count(*) FROM consumers WHERE id = 'other'") == 0
        assert _raw(db, "SELECT count(*) FROM messages WHERE owner IS NULL") == 1
    finally:
        lease.stop()


def test_an_ack_that_is_the_first_thing_after_a_pause_still_settles_the_message(db):
    """A paused worker's pool finishes its task meanwhile; on resuming, the
    ack may run before the heartbeat notices the lease lapsed. The ack must
    renew first and reclaim the row, not leave it ready for a second run."""
    queue = Queue("after-pause", Exchange("after-pause"), "after-pause")
    with Connection(f"sqlite:///{db}", transport_options={"visibility_timeout": 60}) as conn:
        conn.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key="after-pause",
                                declare=[queue])
        message = queue(conn.default_channel).get(no_ack=False)
        assert message is not None
        lease = conn.transport.lease
        # Paused for two minutes: our beat is old in the file, by our own clock
        # too, and another consumer has swept us, giving the row back.
        with sqlite3.connect(db) as raw:
            raw.execute("UPDATE consumers SET beat = beat - 120 WHERE id = ?", (lease.id,))
        lease._last_beat -= 120
        assert Store(str(db)).sweep(60) == 1
        assert _raw(db, "SELECT count(*) FROM messages WHERE owner IS NULL") == 1
        message.ack()
        assert _raw(db, "SELECT count(*) FROM messages") == 0
        assert _raw(db, "SELECT count(*) FROM consumers WHERE id = ?", lease.id) == 1  # registered again


def test_a_put_that_cannot_get_the_lock_raises_and_stores_nothing(db):
    queue = Queue("locked", Exchange("locked"), "locked")
    with Connection(f"sqlite:///{db}", transport_options={"lock_timeout": 0.5}) as conn:
        producer = conn.Producer()
        producer.publish({"warm": 1}, exchange=queue.exchange, routing_key="locked", declare=[queue])
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(DatabaseLocked, match=r"locked by another connection.*lock_timeout"):
                producer.publish({"lost?": 1}, exchange=queue.exchange, routing_key="locked",
                                 retry=False)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        bound = queue(conn.default_channel)
        assert bound.get(no_ack=True).payload == {"warm": 1}
        assert bound.get(no_ack=True) is None


def test_a_submit_to_a_locked_broker_fails_within_the_lock_timeout(tmp_path):
    """Another process holds the file's write lock (a long transaction, a
    backup tool): submit fails with BrokerUnavailable after lock_timeout
    (default 5 s), not after kombu's retries of a 30 s wait."""
    db = tmp_path / "locked.db"
    off = Offload({"CELERY_BROKER_URL": f"sqlite:///{db}",
                   "CELERY_RESULT_BACKEND": f"sqlite:///{tmp_path}/results.db"})
    with off.celery.connection_for_write() as conn:
        conn.default_channel  # noqa: B018 (the file and its tables exist)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="locked by another connection") as info:
            off.submit(noop)
        elapsed = time.monotonic() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert isinstance(info.value.__cause__, DatabaseLocked)
    # A correctness bound, not a benchmark: the documented 5 s, twice over
    # for a loaded machine; today's main took 30 s and more.
    assert elapsed < 15, elapsed
    assert off.submit(noop).id  # the lock gone, the broker works again


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_lock_timeout_is_refused(db, value):
    with pytest.raises(SQLiteFileError, match="lock_timeout must be a positive number"):
        Connection(f"sqlite:///{db}?lock_timeout={value}").connect()


def test_an_old_sqlite_is_refused_when_configured(monkeypatch, tmp_path):
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    with pytest.raises(ConfigurationError, match=r"SQLite 3\.35\.0 or newer.*uses SQLite 3\.31\.1"):
        Offload({"CELERY_BROKER_URL": "sqlite://", "OFFLOAD_DATA_DIR": str(tmp_path)})
    # A Celery app naming sqlite:// itself fails as early as kombu lets it.
    with pytest.raises(ConfigurationError, match="RETURNING"):
        Connection(f"sqlite:///{tmp_path}/b.db").connect()
    assert not (tmp_path / "b.db").exists()


def test_a_forked_child_wakes_on_its_own_socket(db, child_env):
    """The parent consumes (so it sleeps on a wake-up socket); a child forked
    then consumes too: it gets a socket of its own, its wake-ups do not go
    to the parent's socket, and the parent's still works."""
    queue = Queue("forked", Exchange("forked"), "forked")
    with Connection(f"sqlite:///{db}") as conn:
        conn.Producer().publish({"n": 0}, exchange=queue.exchange, routing_key="forked", declare=[queue])
        got = []
        with conn.Consumer([queue], callbacks=[lambda body, m: (got.append(body["n"]), m.ack())]):
            conn.drain_events(timeout=5)
            parent_address = conn.transport.lease.wake_address
            assert parent_address and got == [0]
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report, then leave without pytest's clean-up
                code = 1
                try:
                    os.close(read_end)
                    lease = conn.transport.register()
                    report = {"address": lease.wake_address, "parent": parent_address}
                    conn.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key="forked")
                    conn.drain_events(timeout=10)
                    report["got"] = got
                    os.write(write_end, json.dumps(report).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(write_end)
            with os.fdopen(read_end) as pipe:
                report = json.loads(pipe.read() or "{}")
            assert os.waitpid(pid, 0)[1] == 0, report
            assert report["address"] != parent_address and report["got"] == [0, 1], report
            # The parent still sleeps on, and is woken through, its own socket.
            assert conn.transport.lease.wake_address == parent_address
            conn.Producer().publish({"n": 2}, exchange=queue.exchange, routing_key="forked")
            conn.drain_events(timeout=5)
            assert got == [0, 2]


def test_kombu_virtual_interface_is_what_this_module_uses():
    """offload.transport.sqlite extends kombu's virtual transport through its
    underscore names (its subclassing interface); a kombu release that renames
    one must fail here, not in a worker."""
    from kombu.transport import virtual

    import inspect

    from kombu.transport.virtual.exchange import FanoutExchange

    channel_methods = ["_get", "_put", "_purge", "_size", "_delete", "_new_queue", "_has_queue",
                       "_restore", "_restore_at_beginning", "_get_and_deliver", "_get_message_priority"]
    for name in channel_methods:
        assert callable(getattr(virtual.Channel, name, None)), name
    # Hooks kombu calls when a subclass has them.
    assert "_put_fanout" in inspect.getsource(FanoutExchange)
    assert "_queue_bind" in inspect.getsource(virtual.Channel.queue_bind)
    with Connection("memory://") as conn:
        channel = conn.default_channel
        assert isinstance(channel._consumers, set)
        assert isinstance(channel._active_queues, list)
        assert isinstance(channel._tag_to_queue, dict)
        assert isinstance(conn.transport._callbacks, dict)
        assert callable(conn.transport._deliver)
    # QoS.reject(requeue=True) gives the message back through the channel.
    assert "_restore_at_beginning" in inspect.getsource(virtual.QoS.reject)


def test_the_file_shrinks_back_once_drained(conn, db):
    queue = Queue("big", Exchange("big"), "big")
    producer = conn.Producer()
    empty = disk_size(db)
    for i in range(400):
        producer.publish({"i": i, "pad": "x" * 2000}, exchange=queue.exchange, routing_key="big",
                         declare=[queue])
    full = disk_size(db)
    assert full > empty + 400 * 2000
    bound = queue(conn.default_channel)
    while (message := bound.get()) is not None:
        message.ack()
    # The heartbeat compacts; the freed pages go back to the file system.
    # Both at once: a heartbeat in the middle of the drain may already have
    # made the file small, the last acks' pages waiting for the next one.

    def free_pages() -> int:
        with closing(sqlite3.connect(db)) as raw:
            return raw.execute("PRAGMA freelist_count").fetchone()[0]

    assert wait_until(lambda: disk_size(db) < full / 4 and free_pages() < 16, timeout=10), (
        empty, full, disk_size(db), free_pages())


def test_a_checkpoint_a_reader_blocked_is_done_at_the_next_compact(tmp_path):
    """The vacuum frees pages at once, but they leave the disk only at a
    checkpoint; one that a reader stopped short is tried again later."""
    db = tmp_path / "broker.db"
    store = Store(str(db))
    store.declare_queue("q", None)
    for _ in range(300):
        store.put("q", 0, "x" * 4000)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    full = disk_size(db)
    while store.take("q", None) is not None:  # no owner: each is removed as it is taken
        pass
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM messages").fetchone()  # a read snapshot held open
    store.compact()
    assert store.conn.execute("PRAGMA freelist_count").fetchone()[0] == 0  # vacuumed...
    assert disk_size(db) >= full  # ...but the file and its log are as large as before
    reader.execute("COMMIT")
    reader.close()
    store.compact()  # nothing new to vacuum: the checkpoint alone
    assert disk_size(db) < full / 4, (full, disk_size(db))
    store.close()


def test_a_drained_file_gives_its_log_back_though_the_vacuum_frees_little(tmp_path):
    """A drain may end with fewer free pages than the vacuum waits for; the
    write-ahead log still had the burst's length, and kept it (the crash
    test saw 1.3 MB of log over an empty queue). Drained, a compact cuts it;
    while a message waits, it leaves a busy broker's log alone."""
    db = tmp_path / "broker.db"
    wal = Path(f"{db}-wal")
    store = Store(str(db))
    store.declare_queue("q", None)
    for i in range(300):  # commits that free no page: the log grows, the freelist does not
        store.beat(f"consumer-{i % 3}", None)
    assert wal.stat().st_size > WAL_KEPT
    assert store.conn.execute("PRAGMA freelist_count").fetchone()[0] < 16
    store.put("q", 0, "waiting")
    store.compact()
    assert wal.stat().st_size > WAL_KEPT  # a message waits: not drained
    assert store.take("q", None) is not None
    store.compact()
    assert wal.stat().st_size == 0
    store.close()


def test_a_broadcast_nobody_listens_to_takes_no_write_lock(tmp_path):
    """Celery's task events go to an exchange no queue is bound to while no
    monitor runs: two per task, which must not queue up behind the file's
    writers (an insert that stores nothing still takes the lock)."""
    db = tmp_path / "broker.db"
    store = Store(str(db), lock_timeout=0.2)
    store.declare_exchange("events", "fanout")
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        assert store.put_fanout("events", 0, "{}") == 0  # at once
        with pytest.raises(DatabaseLocked):  # what a write does meanwhile
            store.bind("events", "", "", "monitor")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    # Once a queue is bound, each broadcast reaches it.
    store.declare_queue("monitor", None)
    store.bind("events", "", "", "monitor")
    assert store.put_fanout("events", 0, "{}") == 1
    assert store.take("monitor", None) is not None
    store.close()


def _lock_is_free(path: Path) -> bool:
    """Whether another open file could take ``<file>-lock`` now."""
    import fcntl

    with open(f"{path}-lock", "a") as probe:
        try:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
        return True


def test_offloads_writers_take_turns_before_sqlites_lock(tmp_path):
    """sqlite's busy handler sleeps a millisecond and more when two writers
    meet; offload's own writers take turns on ``<file>-lock`` first."""
    import threading

    from offload.transport._sqlite import retrying

    db = tmp_path / "broker.db"
    store = Store(str(db))
    store.declare_queue("q", None)
    inside, leave = threading.Event(), threading.Event()
    seen: list[bool] = []

    def write() -> None:
        def operation() -> None:
            inside.set()
            leave.wait(10)
            # A write within a write keeps the outer one's turn.
            store.put("q", 0, "{}")
            seen.append(_lock_is_free(db))
        retrying(operation, path=str(db))

    writer = threading.Thread(target=write)
    writer.start()
    assert inside.wait(10)
    assert not _lock_is_free(db)  # the writer has the turn
    leave.set()
    writer.join(10)
    assert seen == [False]
    assert _lock_is_free(db)  # given back
    assert store.size("q") == 1
    store.close()


def test_a_turn_its_holder_keeps_is_done_without(tmp_path):
    """A process paused with the turn held (or any program holding the
    file) delays a write by at most WriterTurns.WAIT, never fails it."""
    import fcntl

    from offload.transport._sqlite import WriterTurns

    db = tmp_path / "broker.db"
    store = Store(str(db))
    store.declare_queue("q", None)
    with open(f"{db}-lock", "a") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        started = time.monotonic()
        store.put("q", 0, "{}")
        waited = time.monotonic() - started
        store.put("q", 0, "{}")  # no wait again: the holder took the turn more than WAIT ago
        assert time.monotonic() - started - waited < WriterTurns.WAIT, waited
    assert store.size("q") == 2
    store.close()


def test_a_forked_child_does_not_keep_its_parents_turn(tmp_path, child_env):
    """Forked while another thread of its parent has the turn (a pool
    process of a worker whose heartbeat is writing), a child must not keep
    the turn's lock alive once that parent is killed."""
    db = tmp_path / "broker.db"
    script = f"""
        import os, sys, threading, time
        from offload.transport._sqlite import retrying
        from offload.transport.store import Store
        store = Store({str(db)!r})
        store.declare_queue("q", None)
        inside = threading.Event()
        threading.Thread(target=lambda: retrying(lambda: (inside.set(), time.sleep(60)), path={str(db)!r}),
                         daemon=True).start()
        inside.wait(10)
        # One write(2) per line: with PYTHONUNBUFFERED, print() writes each
        # piece on its own, and the two processes' pieces interleave.
        if os.fork() == 0:
            os.write(1, f"child {{os.getpid()}}\\n".encode())
            time.sleep(60)
            os._exit(0)
        os.write(1, b"parent\\n")
        time.sleep(60)
    """
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=child_env,
                              stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        lines = {parent.stdout.readline().split()[0] for _ in range(2)}
        assert lines == {"child", "parent"}
        assert not _lock_is_free(db)  # the parent's thread has the turn
        child_pid = int(next(line for line in os.popen(f"pgrep -P {parent.pid}")).strip())
        parent.kill()
        parent.wait(10)
        assert wait_until(lambda: _lock_is_free(db), timeout=10)
        os.kill(child_pid, 0)  # the child lives on: it only closed its copy
    finally:
        parent.kill()
        if child_pid is not None:
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_threads_turn_descriptor_goes_with_the_thread(tmp_path):
    """A threaded web server writes from a new thread per request: none may
    leave a descriptor behind."""
    import threading

    db = tmp_path / "broker.db"
    store = Store(str(db))
    store.declare_queue("q", None)

    def lock_descriptors() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}").endswith("broker.db-lock")
            except OSError:  # the listing's own descriptor, closed by now
                pass
        return count

    before = lock_descriptors()
    for _ in range(50):
        thread = threading.Thread(target=lambda: (store.put("q", 0, "{}"), store.close()))
        thread.start()
        thread.join(10)
    import gc

    gc.collect()
    assert lock_descriptors() <= before + 1
    assert store.size("q") == 50
    store.close()


def test_a_waiting_consumer_wakes_within_milliseconds(conn, db, child_env):
    queue = Queue("wake", Exchange("wake"), "wake")
    queue(conn.default_channel).declare()
    got = []
    with conn.Consumer([queue], callbacks=[lambda body, m: (got.append(time.time() - body["t"]), m.ack())]):
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.05)  # now asleep on its socket
        script = f"""
            import time, offload
            from kombu import Connection, Exchange
            with Connection("sqlite:///{db}") as c:
                c.Producer().publish({{"t": time.time()}}, exchange=Exchange("wake"), routing_key="wake")
        """
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=child_env)
        conn.drain_events(timeout=20)
    assert got and got[0] < 0.05  # not a poll interval (1 s) later


# Real workers ------------------------------------------------------------------


@pytest.fixture
def embedded(_workers):
    """The session's Offload and worker on the embedded broker."""
    return _workers("embedded")


def test_status_and_inspect_reach_workers_on_the_embedded_broker(embedded):
    off, worker = embedded
    status = off.status(timeout=2)
    assert status["ping"] is True
    assert any(name.startswith(f"embedded-{test_id()}@") for name in status["workers"]), status
    assert off.celery.control.ping(timeout=2)
    registered = off.celery.control.inspect(timeout=2).registered()
    assert any("offload.dispatch" in tasks for tasks in registered.values())
    assert off.celery.control.inspect(timeout=2).active() is not None


def test_a_busy_worker_still_answers_remote_control(embedded, data_root):
    """Its one pool process busy and more tasks prefetched: status() still hears it,
    under Celery's own defaults (put-locks on).

    The transport is asynchronous, so Celery runs its event loop and AsynPool
    on it; with a synchronous transport its loop waited for a free pool
    process with put-locks on, and left control messages unread meanwhile.
    """
    off, _ = embedded
    assert off.celery.conf.worker_pool_putlocks is True  # Celery's default, nothing offload-only
    assert off.celery.connection_for_read().transport.implements.asynchronous
    queue = f"busy-{test_id()}"
    worker = WorkerProcess("testapp.on_embedded", f"busy-{test_id()}@%h", data_root / "worker-busy.log",
                           concurrency=1, queues=queue, extra_args=["--prefetch-multiplier", "4"])
    futures = []
    try:
        wait_ready(off.options(queue=queue), worker)
        futures = [off.options(queue=queue).submit(sleep_then, 2, i) for i in range(4)]
        assert wait_until(lambda: futures[0].running(), timeout=30), worker.log_tail()
        # All four taken (one running, three held) before asking.
        assert wait_until(lambda: worker.log_tail(60).count("] received") >= 5, timeout=10), worker.log_tail()
        status = off.status(timeout=1)
        assert any(name.startswith(f"busy-{test_id()}@") for name in status["workers"]), status
        reserved = off.reserved(timeout=1)
        busy = [tasks for name, tasks in reserved.items() if name.startswith("busy-")]
        assert busy and len(busy[0]) == 3, reserved
    finally:
        for future in futures:
            future.cancel()
        worker.stop()


def test_countdown_runs_later(embedded):
    off, _ = embedded
    started = time.monotonic()
    assert off.options(countdown=1).submit(add, 2, 3).result(timeout=30) == 5
    assert time.monotonic() - started >= 0.9


def test_revoke_reaches_the_worker(embedded):
    off, _ = embedded
    from celery.exceptions import TaskRevokedError

    future = off.options(countdown=2).submit(add, 1, 1)
    # Revoke the Celery way: a broadcast every worker must get.
    off.celery.control.revoke(future.id)
    with pytest.raises((TaskRevokedError, Exception)) as info:
        future.result(timeout=30)
    assert future.state == "REVOKED", info.value


def test_purge_drops_queued_tasks(embedded):
    off, _ = embedded
    name = f"nobody-{test_id()}"
    futures = [off.submit(add, i, i, queue=name) for i in range(5)]
    with off.celery.connection_for_write() as connection:
        bound = Queue(name)(connection.default_channel)
        assert bound.queue_declare(passive=True).message_count == 5
        assert bound.purge() == 5
        assert bound.queue_declare(passive=True).message_count == 0
    assert not any(future.done() for future in futures)


def test_routing_to_a_named_queue(embedded, data_root):
    off, _ = embedded
    name = f"special-{test_id()}"
    worker = WorkerProcess("testapp.on_embedded", f"special-{test_id()}@%h",
                           data_root / "worker-special.log", concurrency=1, queues=name)
    try:
        host = off.submit(whoami, queue=name).result(timeout=60)
        assert host.startswith(f"special-{test_id()}@")
        assert off.submit(whoami).result(timeout=30).startswith(f"embedded-{test_id()}@")
    finally:
        worker.stop()


def _succeeded(log: Path) -> Counter:
    """Task ids a worker log reports as succeeded, with how often."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return Counter(re.findall(r"\[([0-9a-f-]{36})\] succeeded", text))


def test_crash_loses_nothing(tmp_path, monkeypatch, embedded):
    """200 tasks of 50 ms; SIGKILL the worker mid-way; a new worker finishes them all."""
    db = tmp_path / "crash" / "broker.db"
    url = f"sqlite:///{db}?visibility_timeout=2"
    conf = settings("embedded")
    # The worker keeps the test app's result file; only the broker is new.
    backend = default_settings(conf["OFFLOAD_DATA_DIR"])["result_backend"]
    off = Offload({**conf, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": backend})

    def start(name: str) -> WorkerProcess:
        # Celery lets CELERY_BROKER_URL override the app's broker: the test
        # app's worker, on this test's own broker file.
        with monkeypatch.context() as env:
            env.setenv("CELERY_BROKER_URL", url)
            return WorkerProcess("testapp.on_embedded", f"{name}-{test_id()}@%h",
                                 tmp_path / f"{name}.log", concurrency=2)

    first = start("first")
    try:
        wait_ready(off, first)
        empty = disk_size(db)
        futures = [off.submit(sleep_then, 0.05, i) for i in range(200)]
        full = disk_size(db)
        assert wait_until(lambda: sum(f.done() for f in futures) >= 60, timeout=60)
    finally:
        first.kill()
    done_before = sum(f.done() for f in futures)
    assert done_before < 200
    second = start("second")
    try:
        results = [future.result(timeout=90) for future in futures]
    finally:
        second.stop()
    assert sorted(results) == list(range(200))
    runs = _succeeded(tmp_path / "first.log") + _succeeded(tmp_path / "second.log")
    ids = {future.id for future in futures}
    assert ids <= set(runs)
    duplicates = sum(count - 1 for task_id, count in runs.items() if task_id in ids)
    print(f"\ncrash test: {done_before} done before the kill, {duplicates} ran twice "
          f"(lost in flight when killed: at most prefetch + running)")
    assert duplicates <= 4  # only what the killed worker held (2 running + 2 prefetched)
    # Drained: the file gives its pages back.
    assert wait_until(lambda: disk_size(db) <= max(empty, full / 2), timeout=20), (
        empty, full, disk_size(db))


PRODUCER = """
import json, os, sys
from testapp import add, make
off = make("embedded")
me = int(sys.argv[1])
futures = [off.submit(add, me, i) for i in range(500)]
results = [f.result(timeout=120) for f in futures]
print(json.dumps({"ok": results == [me + i for i in range(500)], "n": len(results)}))
"""


def test_four_producers_two_workers_lose_nothing(embedded, data_root):
    off, worker = embedded
    second = WorkerProcess("testapp.on_embedded", f"second-{test_id()}@%h",
                           data_root / "worker-second.log", concurrency=2)
    try:
        wait_ready(off, second)
        producers = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(1000 * n)],
                                      env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for n in range(4)]
        outputs = [p.communicate(timeout=240) for p in producers]
    finally:
        second.stop()
    for (out, err), proc in zip(outputs, producers):
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"database is locked" not in err
        assert json.loads(out) == {"ok": True, "n": 500}
    for log in (worker.log_path, second.log_path):
        assert "database is locked" not in log.read_text(errors="replace")


def test_a_task_that_expires_while_queued_ends_revoked(embedded, data_root):
    """Celery sends ``expires`` as the message TTL too; the broker still
    delivers a task message so the worker revokes it (REVOKED, as on Redis)
    instead of dropping it and leaving its future waiting forever."""
    off, _ = embedded
    queue = f"late-{test_id()}"
    future = off.options(queue=queue, expires=1).submit(add, 1, 2)
    expired_at = time.time() + 1
    # Nobody consumes `queue` yet: the task expires while it waits there.
    assert wait_until(lambda: time.time() > expired_at + 0.5, timeout=10)
    worker = WorkerProcess("testapp.on_embedded", f"late-{test_id()}@%h", data_root / "worker-late.log",
                           concurrency=1, queues=queue)
    try:
        assert wait_until(lambda: future.state == "REVOKED", timeout=60), (future.state, worker.log_tail())
        assert future.done()
    finally:
        worker.stop()
    assert f"Discarding revoked task: testapp.add[{future.id}]" in worker.log_path.read_text(errors="replace")


def test_other_expired_messages_are_still_dropped(conn):
    """Message TTLs keep their meaning for every message that is not a Celery
    task with an ``expires`` header (kombu's BaseTimeToLive)."""
    queue = Queue("ttl", Exchange("ttl"), "ttl")
    producer = conn.Producer()
    producer.publish({"short": 1}, exchange=queue.exchange, routing_key="ttl", declare=[queue],
                     expiration=0.01, headers={"task": "not-celery"})  # no `expires` header
    producer.publish({"long": 1}, exchange=queue.exchange, routing_key="ttl")
    bound = queue(conn.default_channel)
    assert wait_until(lambda: bound.queue_declare(passive=True).message_count == 1, timeout=5)
    assert bound.get(no_ack=True).payload == {"long": 1}


def _raw(db: Path, sql: str, *params: object) -> int:
    with sqlite3.connect(db) as raw:
        return raw.execute(sql, params).fetchone()[0]


def test_a_worker_paused_past_the_visibility_timeout_comes_back(tmp_path, monkeypatch, data_root):
    """SIGSTOP a worker (all its processes: a suspended laptop, a paused VM)
    while it runs a task, for longer than the visibility timeout, so that a
    live consumer sweeps it as dead; then SIGCONT. It answers remote control
    again within seconds (its pidbox queue and bindings re-declared), and the
    task it was running is not delivered again: it runs exactly once."""
    db = tmp_path / "pause" / "broker.db"
    url = f"sqlite:///{db}?visibility_timeout=2"
    conf = settings("embedded")
    backend = default_settings(conf["OFFLOAD_DATA_DIR"])["result_backend"]
    off = Offload({**conf, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": backend})
    with monkeypatch.context() as env:
        env.setenv("CELERY_BROKER_URL", url)
        worker = WorkerProcess("testapp.on_embedded", f"paused-{test_id()}@%h", tmp_path / "paused.log",
                               concurrency=1)
    task_queue = off.celery.conf.task_default_queue
    try:
        wait_ready(off, worker)
        assert off.status(timeout=2)["ping"] is True
        future = off.submit(sleep_then, 2, "once")
        assert wait_until(future.running, timeout=30), worker.log_tail()
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            with Connection(url) as sweeper:
                # Any live consumer of the file sweeps dead ones as it beats.
                assert Queue(f"sweeper-{test_id()}")(sweeper.default_channel).get(no_ack=True) is None
                assert wait_until(lambda: _raw(db, "SELECT count(*) FROM consumers WHERE id LIKE ?",
                                               f"%:{worker.pid}:%") == 0, timeout=30)
                # Swept: its pidbox queue is gone, the task it runs is ready again.
                assert _raw(db, "SELECT count(*) FROM queues WHERE owner LIKE ?", f"%:{worker.pid}:%") == 0
                assert _raw(db, "SELECT count(*) FROM messages WHERE queue = ? AND owner IS NULL",
                            task_queue) == 1
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        assert wait_until(lambda: off.status(timeout=1)["ping"] is True, timeout=20), worker.log_tail()
        assert future.result(timeout=30) == "once"
        # Acked: nothing left to deliver again.
        assert wait_until(lambda: _raw(db, "SELECT count(*) FROM messages WHERE queue = ?",
                                       task_queue) == 0, timeout=20), worker.log_tail()
        assert off.submit(add, 2, 2).result(timeout=30) == 4
    finally:
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert log.count(f"[{future.id}] received") == 1, log[-3000:]
    assert _succeeded(worker.log_path)[future.id] == 1
    assert "lease had lapsed" in log


def test_a_turn_whose_time_cannot_be_written_is_still_had_and_given_back(tmp_path, monkeypatch):
    """A full disk refuses the holder's time in ``<file>-lock``: the turn
    is had all the same, and given back; nothing is left locked."""
    import os

    from offload.transport._sqlite import _turns

    db = tmp_path / "broker.db"
    store = Store(str(db))
    store.declare_queue("q", None)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    turn = _turns.take(str(db))
    assert turn is not None and not _lock_is_free(db)
    _turns.give_back(str(db), turn)
    assert _lock_is_free(db)
    store.put("q", 0, "{}")
    assert store.size("q") == 1
    store.close()
