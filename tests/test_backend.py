"""The sqlite result backend (offload.transport.backend)."""

from __future__ import annotations

import pickle
import sqlite3
import time

import pytest
from celery import Celery, states

from offload.transport.backend import SQLiteBackend


@pytest.fixture
def app(tmp_path):
    app = Celery("backend-test", set_as_current=False)
    app.conf.result_backend = f"sqlite:///{tmp_path}/results.db"
    return app


def test_result_backend_url_selects_it(app, tmp_path):
    backend = app.backend
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == f"{tmp_path}/results.db"


def test_store_and_read_a_result(app):
    backend = app.backend
    backend.store_result("t1", {"answer": 42}, states.SUCCESS)
    meta = backend.get_task_meta("t1")
    assert meta["status"] == states.SUCCESS and meta["result"] == {"answer": 42}
    assert backend.get_task_meta("never")["status"] == states.PENDING


def test_a_new_threads_read_does_not_wait_for_a_writer(app):
    """Each thread opens its own connection; opening one takes no write lock,
    so a read in a new thread (a web request's) answers while another
    connection is mid-write, instead of queueing behind every writer."""
    import threading

    backend = app.backend
    backend.store_result("t1", 1, states.SUCCESS)  # the file and its tables exist
    writer = sqlite3.connect(backend.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM results WHERE key = 'none'")
    seen = []
    try:
        reader = threading.Thread(target=lambda: seen.append(backend.get_task_meta("t1", cache=False)))
        reader.start()
        reader.join(timeout=30)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    # Before, the new connection set auto_vacuum again (a write) and raised
    # DatabaseLocked after lock_timeout.
    assert seen and seen[0]["status"] == states.SUCCESS


def test_mget_reads_many_keys_in_order(app):
    backend = app.backend
    for i in range(1200):  # more than one IN (...) chunk
        backend.store_result(f"id-{i}", i, states.SUCCESS)
    keys = [backend.get_key_for_task(f"id-{i}") for i in (5, 1199, 77)]
    keys.insert(1, backend.get_key_for_task("missing"))
    values = backend.mget(keys)
    assert values[1] is None
    assert [backend.decode_result(v)["result"] for v in (values[0], values[2], values[3])] == [5, 1199, 77]


def test_results_expire_without_beat(app):
    app.conf.result_expires = 0.3
    backend = app.backend
    backend.store_result("short", 1, states.SUCCESS)
    assert backend.get_task_meta("short")["status"] == states.SUCCESS
    time.sleep(0.4)
    assert backend.get_task_meta("short", cache=False)["status"] == states.PENDING
    backend._next_sweep = 0  # the next write sweeps expired rows away
    backend.store_result("later", 2, states.SUCCESS)
    with sqlite3.connect(backend.path) as raw:
        keys = [row[0] for row in raw.execute("SELECT key FROM results")]
    assert all("short" not in key for key in keys) and any("later" in key for key in keys)


def test_a_large_sweep_goes_in_batches_and_gives_its_pages_back(app, monkeypatch):
    """Expired results are deleted a batch per transaction (the writers wait
    for one batch, not the whole sweep), all of them, and the pages they
    held go back to the file system a step at a time."""
    from offload.transport import _sqlite
    from offload.transport import backend as module

    vacuums = []

    def vacuum_in_small_steps(conn, min_free_pages, path):
        vacuums.append(conn.execute("PRAGMA freelist_count").fetchone()[0])
        return _sqlite.release_free_pages(conn, min_free_pages, path, step=16)

    monkeypatch.setattr(module, "release_free_pages", vacuum_in_small_steps)

    backend = app.backend
    count = 2 * module._SWEEP_BATCH + 500
    backend.set_many([(f"old-{n}", "v" * 400) for n in range(count)])
    backend.set("kept", "1")
    with sqlite3.connect(backend.path) as raw:
        raw.execute("UPDATE results SET expires = 1 WHERE key LIKE 'old-%'")
    transactions = []
    deleting = backend._deleting
    backend._deleting = lambda sql, params: transactions.append(params) or deleting(sql, params)
    backend.cleanup()
    assert len(transactions) == 3  # two full batches, then the rest
    with sqlite3.connect(backend.path) as raw:
        assert raw.execute("SELECT count(*) FROM results WHERE key LIKE 'old-%'").fetchone()[0] == 0
    assert backend.get("kept") == "1"
    assert vacuums[-1] > 16  # more pages freed than one step gives back
    assert backend._conn.execute("PRAGMA freelist_count").fetchone()[0] == 0


def test_forget_incr_and_expire(app):
    backend = app.backend
    backend.store_result("f", 1, states.SUCCESS)
    backend.forget("f")
    assert backend.get_task_meta("f", cache=False)["status"] == states.PENDING
    assert [backend.incr("counter") for _ in range(3)] == [1, 2, 3]
    backend.expire("counter", 0.1)
    time.sleep(0.2)
    assert backend.get("counter") is None


def test_backend_survives_pickling(app):
    # Celery pickles backends into pool processes on some platforms.
    clone = pickle.loads(pickle.dumps(app.backend))
    assert clone.path == app.backend.path


def test_results_reach_the_future_on_a_real_worker(_workers):
    off, _worker = _workers("embedded")
    assert isinstance(off.celery.backend, SQLiteBackend)
    from testapp import add

    futures = [off.submit(add, i, i) for i in range(50)]
    assert [f.result(timeout=30) for f in futures] == [2 * i for i in range(50)]


def test_changes_reads_each_write_once_in_commit_order(app):
    backend = app.backend
    start = backend.last_change()
    backend.store_result("c1", 1, states.STARTED)
    backend.store_result("c2", 2, states.SUCCESS)
    backend.store_result("c1", 3, states.SUCCESS)  # replaces c1's row: one change, its latest value
    backend.incr("a-counter")  # not a task's result: not in the feed
    rows, after = backend.changes(start)
    assert [(task_id, backend.decode_result(value)["result"]) for task_id, value in rows] == [("c2", 2), ("c1", 3)]
    assert after == backend.last_change() > start
    assert backend.changes(after) == ([], after)
    rows, _ = backend.changes(start, limit=1)
    assert [task_id for task_id, _ in rows] == ["c2"]


def test_a_change_number_is_never_given_twice_after_a_delete(app):
    backend = app.backend
    backend.store_result("d1", 1, states.SUCCESS)
    backend.store_result("d2", 2, states.SUCCESS)
    seen = backend.last_change()
    backend.forget("d2")  # the row holding the highest number
    backend.store_result("d3", 3, states.SUCCESS)
    rows, _ = backend.changes(seen)
    assert [task_id for task_id, _ in rows] == ["d3"]  # a reader past d2 still sees d3


def test_a_file_made_before_change_numbers_is_upgraded(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE results (key TEXT PRIMARY KEY, value, expires REAL)")
        raw.execute("INSERT INTO results VALUES ('celery-task-meta-old', 'x', NULL)")
    app = Celery("backend-upgrade", set_as_current=False)
    app.conf.result_backend = f"sqlite:///{path}"
    backend = app.backend
    start = backend.last_change()
    backend.store_result("new", 1, states.SUCCESS)
    assert [task_id for task_id, _ in backend.changes(start)[0]] == ["new"]
    assert backend.get("celery-task-meta-old") == "x"  # the old rows are kept


def test_a_watch_is_woken_by_each_write_and_dropped_when_its_process_is_gone(app):
    backend = app.backend
    watch = backend.watch()
    try:
        assert not watch.wait(0)
        backend.store_result("w1", 1, states.SUCCESS)
        assert watch.wait(5)
        backend.set_many([(backend.get_key_for_task("w2"), backend.encode({"status": "SUCCESS"}))])
        assert watch.wait(5)
    finally:
        watch.close()
    with sqlite3.connect(backend.path) as raw:
        assert raw.execute("SELECT count(*) FROM result_watchers").fetchone()[0] == 0
        # A watcher whose process died without closing: nobody listens at its address.
        raw.execute("INSERT INTO result_watchers VALUES ('@offload-gone-for-good')")
    backend._watchers_until = 0.0
    backend.store_result("w3", 3, states.SUCCESS)
    with sqlite3.connect(backend.path) as raw:
        assert raw.execute("SELECT count(*) FROM result_watchers").fetchone()[0] == 0


def test_a_state_is_stored_with_celerys_rules_in_one_statement(app):
    """A SUCCESS stays; a STARTED over a REVOKED is not written and marks the
    request; an expired row or one that is not JSON is written over."""
    from offload.result_store import REVOKED_BEFORE_START

    class Request:
        pass

    backend = app.backend
    assert backend.checks_revoked_on_start
    backend.store_result("s", {"pid": 1}, states.STARTED)
    backend.store_result("s", 5, states.SUCCESS)
    backend.store_result("s", {"pid": 2}, states.STARTED)
    backend.store_result("s", ValueError("late"), states.FAILURE)
    assert backend.get_task_meta("s", cache=False)["result"] == 5
    backend.store_result("r", None, states.REVOKED)
    request = Request()
    backend.store_result("r", {"pid": 1}, states.STARTED, request=request)
    assert backend.get_task_meta("r", cache=False)["status"] == states.REVOKED
    assert getattr(request, REVOKED_BEFORE_START) is True
    backend.store_result("r", ValueError("after"), states.FAILURE)  # other states do overwrite it
    assert backend.get_task_meta("r", cache=False)["status"] == states.FAILURE
    backend._conn.execute("UPDATE results SET value = 'not json' WHERE key = ?", ("celery-task-meta-r",))
    backend.store_result("r", 7, states.SUCCESS)
    assert backend.get_task_meta("r", cache=False)["result"] == 7
    backend._conn.execute("UPDATE results SET expires = 1 WHERE key = ?", ("celery-task-meta-r",))
    backend.store_result("r", {"pid": 3}, states.STARTED)  # an expired SUCCESS is no SUCCESS
    assert backend.get_task_meta("r", cache=False)["status"] == states.STARTED


def test_every_write_of_the_results_file_takes_its_writers_turn(app):
    """A task's state, a chunk's results (map's calls) and their expiry each
    wait for the turn on ``<file>-lock`` first (offload.transport._sqlite.WriterTurns):
    one another process keeps is waited for until it has kept it
    WriterTurns.WAIT seconds, then done without."""
    import fcntl
    import os
    import struct

    from offload.transport._sqlite import WriterTurns

    backend = app.backend
    backend.store_result("before", 1, states.SUCCESS)  # the file exists
    writes = {
        "state": lambda: backend.store_result("t-state", 1, states.SUCCESS),
        "chunk": lambda: backend.set_many([(backend.get_key_for_task("t-chunk"),
                                             backend.encode({"status": states.SUCCESS, "result": 2,
                                                             "task_id": "t-chunk"}))]),
    }
    with open(f"{backend.path}-lock", "r+b") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        taken = time.monotonic()
        os.pwrite(holder.fileno(), struct.pack("=d", taken), 0)  # as a holder does
        for name, write in writes.items():
            write()
            assert time.monotonic() - taken >= WriterTurns.WAIT, name  # waited for the holder first
    assert backend.get_task_meta("t-chunk", cache=False)["result"] == 2
    assert backend.get_task_meta("t-state", cache=False)["result"] == 1


def test_a_line_of_writers_that_moves_is_waited_in(app):
    """Turns that change hands are waited for, however long the line: a
    writer that left it would meet sqlite's lock, whose sparse retries lose
    to the line's writers (seconds where the line takes milliseconds)."""
    import threading

    from offload.transport._sqlite import WriterTurns, _turns

    backend = app.backend
    backend.store_result("before", 1, states.SUCCESS)
    path, rounds = backend.path, 8
    holding, done = threading.Event(), threading.Event()

    def line() -> None:  # another writer, taking turn after turn, each held half of WAIT
        for _ in range(rounds):
            turn = _turns.take(path)
            holding.set()
            time.sleep(WriterTurns.WAIT / 2)
            _turns.give_back(path, turn)
        done.set()

    other = threading.Thread(target=line)
    other.start()
    try:
        assert holding.wait(10)
        turn = _turns.take(path)
        assert turn is not None  # had in the end, not given up after WAIT
        _turns.give_back(path, turn)
    finally:
        other.join(30)
    assert done.is_set()


def test_a_writer_taking_turn_after_turn_lets_a_waiter_in(app):
    """An flock is not fair: a writer that gives the turn back and takes it
    again at once (expired results swept in batches, acks one after the
    other) kept it from a waiter, whose tries come up to a millisecond
    apart, until its batches ended or the waiter's lock_timeout passed (a
    submit then failed with DatabaseLocked). A waiter that has waited
    WriterTurns.STARVED is let in first."""
    import threading

    from offload.transport._sqlite import _turns

    backend = app.backend
    backend.store_result("before", 1, states.SUCCESS)
    path, rounds = backend.path, 500
    holding, done = threading.Event(), []

    def batches() -> None:  # turn after turn, each held 2 ms, none let go of for long
        for _ in range(rounds):
            turn = _turns.take(path)
            holding.set()
            time.sleep(0.002)
            _turns.give_back(path, turn)
            done.append(1)

    other = threading.Thread(target=batches)
    other.start()
    try:
        assert holding.wait(10)
        turn = _turns.take(path)
        rounds_before = len(done)
        assert turn is not None
        _turns.give_back(path, turn)
    finally:
        other.join(60)
    assert len(done) == rounds
    # Had while the batches went on, not once they ended.
    assert rounds_before < rounds // 5, rounds_before


def test_a_write_over_its_own_unread_cursor_says_so(app):
    """A connection still reading an older state of the file (a cursor not
    read to its end) cannot write once another connection has committed:
    the write fails at once, naming that, not another connection's lock."""
    from offload.transport._sqlite import DatabaseLocked

    backend = app.backend
    backend.set_many([("a", "1"), ("b", "2")])
    cursor = backend._conn.execute("SELECT key FROM results")
    cursor.fetchone()  # one row read, one left: the read stays open
    with sqlite3.connect(backend.path) as other:
        other.execute("INSERT INTO results (key, value) VALUES ('c', '3')")
    with pytest.raises(DatabaseLocked, match="still holds a read of an older state"):
        backend.set("d", "4")
    del cursor
    backend.set("d", "4")  # the read ended: it writes
    assert backend.get("d") == "4"
