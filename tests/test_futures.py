"""offload.Future on real workers: the concurrent.futures contract, and one
shared result watcher per process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
from celery.exceptions import TaskRevokedError

from offload import Future
from conftest import wait_until
from testapp import add, crunch, div, noop, sleep_then




def test_is_a_concurrent_future(off):
    future = off.submit(add, 1, 2)
    assert isinstance(future, concurrent.futures.Future) and isinstance(future, Future)
    assert future.result(timeout=30) == 3
    assert future.id and future.state == "SUCCESS"
    assert off.get(future.id).result(timeout=30) == 3


def test_task_exception_keeps_type_and_message(off):
    future = off.submit(div, 1, 0)
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        future.result(timeout=30)
    assert isinstance(future.exception(timeout=1), ZeroDivisionError)
    assert future.state == "FAILURE"


def test_result_timeout_raises_timeouterror(off):
    future = off.submit(sleep_then, 3)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.2)
    assert time.monotonic() - started < 2
    assert future.result(timeout=30) is None


def test_running_is_true_only_once_started(off):
    blocker = off.submit(sleep_then, 1.5)
    assert not blocker.running()
    assert wait_until(blocker.running, 30), blocker.state
    assert blocker.state == "STARTED"
    # A running task is never killed by cancel().
    assert blocker.cancel() is False
    assert blocker.result(timeout=30) is None


def test_cancel_revokes_a_task_that_has_not_started(off):
    # Occupy both pool processes, then queue one more behind them.
    busy = [off.submit(sleep_then, 2) for _ in range(2)]
    assert wait_until(lambda: all(f.running() for f in busy), 30)
    queued = off.submit(add, 40, 2)
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(timeout=1)
    for f in busy:
        f.result(timeout=30)
    # The revoked task never ran: Celery records it as REVOKED.
    assert wait_until(lambda: off.celery.AsyncResult(queued.id).state == "REVOKED", 30)


def test_revoked_elsewhere_completes_the_future(off):
    busy = [off.submit(sleep_then, 1.5) for _ in range(2)]
    queued = off.submit(add, 1, 1)
    off.celery.control.revoke(queued.id)
    for f in busy:
        f.result(timeout=30)
    with pytest.raises((concurrent.futures.CancelledError, TaskRevokedError)):
        queued.result(timeout=30)


def test_done_callbacks_fire_without_result_calls(off):
    fired = threading.Event()
    off.submit(add, 1, 1).add_done_callback(lambda fut: fired.set())
    assert fired.wait(30)


def test_wait_and_as_completed(off):
    futures = [off.submit(add, i, 1) for i in range(5)] + [off.submit(div, 1, 0)]
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert not not_done
    first_error = concurrent.futures.wait(
        [off.submit(sleep_then, 5), off.submit(div, 1, 0)], timeout=30,
        return_when=concurrent.futures.FIRST_EXCEPTION)
    assert any(isinstance(f.exception(), ZeroDivisionError) for f in first_error.done)
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures[:5], timeout=30)) == [1, 2, 3, 4, 5]


def test_await(off):
    async def main():
        return await asyncio.gather(off.submit(add, 1, 2), off.submit(add, 3, 4))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == [3, 7]


def test_progress_is_visible_on_the_future(off):
    future = off.submit(crunch, 30, 0.05)
    assert wait_until(lambda: future.progress is not None, 30)
    seen = future.progress
    assert seen["total"] == 30 and seen["message"] == "crunching"
    assert future.running()
    assert future.result(timeout=30) is True
    # Polling backends may miss the last report before SUCCESS overwrites it.
    assert future.progress["message"] in ("crunching", "done")


def test_a_thousand_futures_share_one_watcher_thread(redis_off):
    redis_off.submit(noop).result(timeout=30)  # the watcher thread exists now
    watcher_thread = redis_off._watcher._thread
    threads_before = threading.active_count()
    futures = [redis_off.submit(noop) for _ in range(1000)]
    # Unrelated threads (a pool's, a finished test's) may come and go: allow a
    # few, never one per future.
    assert threading.active_count() <= threads_before + 3
    done, not_done = concurrent.futures.wait(futures, timeout=120)
    assert not not_done
    assert threading.active_count() <= threads_before + 3
    # The same single thread served all thousand, and nothing is left pending.
    assert redis_off._watcher._thread is watcher_thread and watcher_thread.is_alive()
    assert redis_off._watcher.pending_count == 0


def test_redis_watcher_survives_its_connection_being_killed(redis_off):
    """Redis drops the watcher's pub/sub connection mid-task: it reconnects,
    subscribes again (its own ids and another process's), and misses nothing."""
    import redis

    own = redis_off.submit(sleep_then, 2.0, "own")
    sent = redis_off.celery.send_task("offload.dispatch", args=["testapp:sleep_then", [2.0, "foreign"], {}])
    foreign = redis_off.get(sent.id)
    watcher = redis_off._watcher
    assert wait_until(lambda: sent.id in watcher._strategy.channels.values(), timeout=10)
    assert not own.done() and not foreign.done()
    pubsub = watcher._strategy.pubsub
    host, port = pubsub.connection._sock.getsockname()[:2]
    server = redis.Redis.from_url(redis_off.celery.conf.broker_url)
    assert server.client_kill_filter(_type=None, addr=f"{host}:{port}") == 1
    assert own.result(timeout=30) == "own"
    assert foreign.result(timeout=30) == "foreign"
    # A new connection, still the one thread, and it hears new results.
    assert wait_until(lambda: watcher._strategy.pubsub is not pubsub, timeout=10)
    assert redis_off.submit(add, 1, 2).result(timeout=30) == 3
    assert watcher.pending_count == 0


def test_get_rejects_a_bad_id(redis_off):
    with pytest.raises(ValueError, match="non-empty string"):
        redis_off.get("")
    with pytest.raises(ValueError):
        redis_off.get(None)


class TestRpcBackend:
    """rpc:// replies go to one queue per process, whichever thread submitted."""

    def test_results_errors_and_progress(self, rpc_off):
        assert rpc_off.celery.conf.result_backend == "rpc://"
        assert [f.result(timeout=30) for f in rpc_off.map(add, [[1, 2], [3, 4]])] == [3, 7]
        with pytest.raises(ZeroDivisionError):
            rpc_off.submit(div, 1, 0).result(timeout=30)
        future = rpc_off.submit(crunch, 10, 0.05)
        assert wait_until(lambda: future.progress is not None, 30)
        assert future.result(timeout=30) is True

    def test_submitted_from_another_thread(self, rpc_off):
        results = []
        thread = threading.Thread(target=lambda: results.append(rpc_off.submit(add, 5, 5)))
        thread.start()
        thread.join()
        assert results[0].result(timeout=30) == 10


def test_get_follows_a_task_sent_by_someone_else(off):
    # Not submitted through this Offload (no future, an id of Celery's own).
    sent = off.celery.send_task("offload.dispatch", args=["testapp:add", [20, 22], {}])
    assert off.get(sent.id).result(timeout=30) == 42
    slow = off.celery.send_task("offload.dispatch", args=["testapp:sleep_then", [0.5, "late"], {}])
    future = off.get(slow.id)
    assert future.result(timeout=30) == "late"
