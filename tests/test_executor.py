"""``off.executor()`` on real workers, held to what the standard library's
own executor tests (CPython's Lib/test/test_concurrent_futures/) expect of
an executor: submit, map in order with a timeout counted from the call,
exceptions re-raised in order, shutdown with and without waiting and
cancelling, the ``with`` block, and no reference kept to yielded results."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import types

import pytest
from celery.signals import before_task_publish

import offload
from conftest import wait_until
from offload.dispatch import CHUNK_TASK, DISPATCH_TASK
from offload.executor import Executor
from testapp import add, mul, sleep_then
from testapp.calls import capture, gated, make_object, mark, power, quotient


def test_is_a_concurrent_futures_executor(off):
    with off.executor() as ex:
        assert isinstance(ex, concurrent.futures.Executor) and isinstance(ex, Executor)
        future = ex.submit(power, 2, 8)
        assert isinstance(future, offload.Future)
        assert future.result(timeout=60) == 256


def test_submit_keywords_all_go_to_the_function(off):
    with off.executor() as ex:
        assert ex.submit(mul, 2, y=8).result(timeout=60) == 16
        # fn and self are the function's, and so is queue (not an option here).
        future = ex.submit(capture, 1, self=2, fn=3, queue="q")
        assert future.result(timeout=60) == [[1], {"self": 2, "fn": 3, "queue": "q"}]
        with pytest.raises(TypeError):
            ex.submit(fn=capture, arg=1)
        with pytest.raises(TypeError):
            ex.submit(arg=1)


def test_map_returns_results_in_order(off):
    with off.executor() as ex:
        expected = list(map(power, range(10), range(10)))
        assert list(ex.map(power, range(10), range(10))) == expected
        assert list(ex.map(power, range(10), range(10), chunksize=3)) == expected
        # Shortest iterable wins, as with zip; no iterable at all is empty.
        assert list(ex.map(add, [1, 2, 3], [10, 20])) == [11, 22]
        assert list(ex.map(add)) == []


def test_map_chunksize_sends_several_calls_per_message(off):
    published = []

    def count(sender=None, **kwargs):
        published.append(sender)

    before_task_publish.connect(count, weak=False)
    try:
        with off.executor() as ex:
            results = ex.map(quotient, [1, 1, 1, 1, 7], [2, 3, 0, 5, 2], chunksize=2)
            expected = [DISPATCH_TASK] * 5 if not off.hub.follows_foreign_tasks else [CHUNK_TASK] * 3
            assert published == expected
            assert next(results) == [0, 1] and next(results) == [0, 1]
            with pytest.raises(ZeroDivisionError):
                next(results)
    finally:
        before_task_publish.disconnect(count)


def test_map_reraises_each_exception_at_its_place(off):
    with off.executor() as ex:
        results = ex.map(quotient, [1, 1, 1, 1], [2, 3, 0, 5])
        assert next(results) == [0, 1]
        assert next(results) == [0, 1]
        with pytest.raises(ZeroDivisionError):
            next(results)


def test_map_timeout_counts_from_the_call(off, gate, tmp_path):
    opened = tmp_path / "open"
    opened.touch()
    with off.executor() as ex:
        collected = []
        with pytest.raises(concurrent.futures.TimeoutError):
            for value in ex.map(gated, [str(opened), str(opened), gate], [1, 2, 3], timeout=5):
                collected.append(value)
        assert collected == [1, 2]
        open(gate, "w").close()


def test_map_sends_everything_before_returning(off, tmp_path):
    with off.executor() as ex:
        ex.map(mark, [str(tmp_path)] * 4, range(4))  # the iterator is never read
        ex.shutdown(wait=True)
    assert sorted(os.listdir(tmp_path)) == ["0", "1", "2", "3"]


def test_map_checks_its_arguments_before_sending(off):
    ex = off.executor()
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        ex.map(add, [1], [2], chunksize=0)
    with pytest.raises(TypeError, match="nothing was sent"):
        ex.map(add, [1, object()], [2, 3])
    with pytest.raises(TypeError, match="lambda|importable|reference"):
        ex.submit(lambda: None)
    ex.shutdown()


def _held_by_a_future_or_the_iterator(holder) -> bool:
    if isinstance(holder, offload.Future):
        return True
    if isinstance(holder, types.FrameType):
        return holder.f_code.co_name in ("_results_in_order", "_result_or_cancel")
    if isinstance(holder, dict):  # an instance's __dict__
        return any(isinstance(owner, offload.Future) for owner in gc.get_referrers(holder))
    return False


def test_results_are_not_kept_by_the_iterator(off):
    # As the standard library's executors: a yielded result is let go by the
    # iterator and by its call's future (the hub's short cache of recent
    # final states is a bounded holder of its own and not checked here).
    with off.executor() as ex:
        for value in ex.map(make_object, range(10)):
            gc.collect()
            assert not any(_held_by_a_future_or_the_iterator(h) for h in gc.get_referrers(value))
            del value


def test_no_new_work_after_shutdown(off):
    ex = off.executor()
    ex.shutdown()
    ex.shutdown()  # twice is harmless
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(add, 1, 2)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(add, [1], [2])


def test_context_manager_waits_for_pending_calls(off):
    with off.executor() as ex:
        futures = [ex.submit(sleep_then, 0.2, i) for i in range(3)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2]


def test_shutdown_without_waiting_leaves_calls_running(off, gate):
    ex = off.executor()
    future = ex.submit(gated, gate, "late")
    ex.shutdown(wait=False)
    assert not future.done()
    open(gate, "w").close()
    assert future.result(timeout=60) == "late"


def test_shutdown_cancel_futures_revokes_what_has_not_started(off, gate, tmp_path):
    if not off.hub.follows_foreign_tasks:
        pytest.skip("rpc:// records no revoke")
    ex = off.executor()
    # Hold both pool processes, then queue more than they could take.
    holders = [ex.submit(gated, gate, i) for i in range(2)]
    assert wait_until(lambda: all(f.running() for f in holders), timeout=60)
    ran = tmp_path / "ran"
    ran.mkdir()
    queued = [ex.submit(mark, str(ran), i, i) for i in range(6)]
    ex.shutdown(wait=False, cancel_futures=True)
    open(gate, "w").close()
    ex.shutdown(wait=True)
    assert [f.result(timeout=60) for f in holders] == [0, 1]
    cancelled = [f for f in queued if f.cancelled()]
    assert cancelled, "no queued call was cancelled"
    for index, future in enumerate(queued):
        if not future.cancelled():
            assert future.result(timeout=60) == index
    # A cancelled call never ran, and nothing it could have done appears later.
    ran_calls = set(os.listdir(ran))
    assert not ran_calls & {str(queued.index(f)) for f in cancelled}
    assert concurrent.futures.wait(queued, timeout=60).not_done == set()


def test_a_map_that_times_out_cancels_the_calls_not_started(off, gate, tmp_path):
    if not off.hub.follows_foreign_tasks:
        pytest.skip("rpc:// records no revoke")
    ran = tmp_path / "ran"
    ran.mkdir()
    with off.executor() as ex:
        holders = [ex.submit(gated, gate, i) for i in range(2)]
        assert wait_until(lambda: all(f.running() for f in holders), timeout=60)
        results = ex.map(mark, [str(ran)] * 5, range(5), timeout=0.5)
        with pytest.raises(concurrent.futures.TimeoutError):
            next(results)
        open(gate, "w").close()
    assert [f.result() for f in holders] == [0, 1]
    assert os.listdir(ran) == []


def test_works_with_as_completed_and_wait(off):
    with off.executor() as ex:
        futures = [ex.submit(add, i, i) for i in range(5)]
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=60)) == [
            0, 2, 4, 6, 8]
        done, not_done = concurrent.futures.wait(futures, timeout=60)
        assert len(done) == 5 and not not_done


def test_unknown_option_is_refused(off):
    with pytest.raises(TypeError, match="unknown submit option"):
        off.executor(max_workers=4)


def test_options_apply_to_every_call(off):
    with off.executor(countdown=0.1) as ex:
        assert list(ex.map(add, [1, 2], [3, 4])) == [4, 6]


def test_shutdown_waits_for_every_call_however_many(off, tmp_path):
    # More calls than the executor keeps before pruning the finished ones.
    ex = off.executor()
    for i in range(150):
        ex.submit(mark, str(tmp_path), i)
    ex.shutdown(wait=True)
    assert len(os.listdir(tmp_path)) == 150
