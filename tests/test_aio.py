"""``async def`` functions (offload/aio.py) on real workers and in eager mode."""

from __future__ import annotations

import asyncio
import collections
import os

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from conftest import wait_until
from offload import Offload
from testapp.coroutines import add_later, loop_identity, report_and_wait, steps, wait_for_cancel


def test_submit_map_and_a_task_run_coroutine_functions(off):
    assert off.submit(add_later, 1, 2).result(timeout=60) == 3
    assert [f.result(timeout=60) for f in off.map(add_later, [[1, 2], [3, 4], {"x": 5, "y": 6}])] == [3, 7, 11]
    task = off.celery.tasks["testapp.async_add"]
    assert task.submit(2, 3).result(timeout=60) == 5
    assert task.delay(4, 5).get(timeout=60) == 9


def test_one_event_loop_per_pool_process_reused_across_calls(redis_off):
    calls = [redis_off.submit(loop_identity) for _ in range(12)]
    calls += redis_off.map(loop_identity, [[] for _ in range(12)], chunksize=4)
    loops = collections.defaultdict(set)
    runs = collections.Counter()
    for pid, loop in (f.result(timeout=60) for f in calls):
        loops[pid].add(loop)
        runs[pid] += 1
    assert all(len(ids) == 1 for ids in loops.values()), dict(loops)
    assert max(runs.values()) > 1  # some process ran several calls, all on its one loop


@pytest.mark.parametrize("chunksize", [1, None])
def test_progress_and_current_task_inside_a_coroutine(off, gate, chunksize):
    futures = off.map(report_and_wait, [[gate, i] for i in range(2)], chunksize=chunksize)
    assert wait_until(lambda: (futures[0].progress or {}).get("message") == "call 0", timeout=60)
    assert futures[0].state == "PROGRESS"
    open(gate, "w").close()
    assert [f.result(timeout=60) for f in futures] == [[i, f.id] for i, f in enumerate(futures)]


def test_revoke_with_terminate_cancels_the_coroutine(redis_off, tmp_path):
    started, cancelled = tmp_path / "started", tmp_path / "cancelled"
    future = redis_off.submit(wait_for_cancel, str(started), str(cancelled))
    assert wait_until(started.exists, timeout=60)
    redis_off.celery.control.revoke(future.id, terminate=True)
    assert wait_until(cancelled.exists, timeout=30)  # CancelledError inside: its `except` ran
    assert wait_until(future.done, timeout=30)
    assert future.state == "REVOKED"
    assert redis_off.submit(add_later, 1, 1).result(timeout=60) == 2


def test_time_limits_reach_a_coroutine(redis_off, tmp_path):
    started, cancelled = tmp_path / "started", tmp_path / "cancelled"
    soft = redis_off.options(soft_time_limit=1).submit(wait_for_cancel, str(started), str(cancelled))
    assert isinstance(soft.exception(timeout=60), SoftTimeLimitExceeded)
    assert cancelled.exists()
    hard = redis_off.options(time_limit=1).submit(wait_for_cancel, str(tmp_path / "s2"), str(tmp_path / "c2"))
    assert isinstance(hard.exception(timeout=60), TimeLimitExceeded)
    assert redis_off.submit(add_later, 1, 1).result(timeout=60) == 2


def test_eager_mode_runs_coroutine_functions_on_one_loop(tmp_path):
    off = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path), "OFFLOAD_ALLOW": ["testapp"]})
    off.task(name="eager.async_add")(add_later)
    assert off.submit(add_later, 1, 2).result() == 3
    assert [f.result() for f in off.map(add_later, [[1, 2], [3, 4]])] == [3, 7]
    assert off.celery.tasks["eager.async_add"].submit(2, 2).result() == 4
    done, task_id = off.submit(steps, 2).result()
    assert done is True and task_id
    identities = {tuple(off.submit(loop_identity).result()) for _ in range(3)}
    assert len(identities) == 1 and identities.pop()[0] == os.getpid()

    async def from_a_running_loop():
        # Eager mode inside an async app: the coroutine runs beside the caller's loop.
        return off.submit(steps, 1).result()

    assert asyncio.run(from_a_running_loop())[0] is True
