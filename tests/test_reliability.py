"""Nothing is lost when a worker is killed, and nothing runs twice while a
healthy worker holds it (Redis lease renewal)."""

from __future__ import annotations

import importlib
import uuid

import pytest
import redis

from conftest import WorkerProcess, require_service, wait_ready, wait_until
from testapp import test_id
from testapp.reliable import TALLY_DB, tally


def tallies(token: str) -> dict[int, int]:
    client = redis.Redis(host="127.0.0.1", port=6379, db=TALLY_DB)
    return {int(k): int(v) for k, v in client.hgetall(f"tally:{token}").items()}




@pytest.fixture(params=["redis", "rabbitmq"])
def reliable(request, data_root):
    require_service("redis")
    require_service(request.param)
    module = importlib.import_module(f"testapp.reliable_{request.param}")
    module.off.celery.control.purge()
    return request.param, module.off


def start(kind: str, data_root, n: int) -> WorkerProcess:
    return WorkerProcess(f"testapp.reliable_{kind}", f"reliable{n}-{kind}-{test_id()}@%h",
                         data_root / f"reliable-{kind}-{n}.log", concurrency=2)


def test_killed_worker_loses_no_task(reliable, data_root):
    kind, off = reliable
    token = uuid.uuid4().hex
    first = start(kind, data_root, 1)
    try:
        wait_ready(off, first)
        futures = [off.submit(tally, token, i, 0.1) for i in range(50)]
        # Kill it in the middle: some done, some running, some still queued.
        assert wait_until(lambda: len(tallies(token)) >= 10, 60), first.log_tail()
        first.kill()
        assert len(tallies(token)) < 50
    finally:
        first.stop()
    second = start(kind, data_root, 2)
    try:
        for future in futures:
            future.result(timeout=90)
        counts = tallies(token)
        assert sorted(counts) == list(range(50)), "every task ran at least once"
        duplicates = sum(c - 1 for c in counts.values())
        print(f"{kind}: 50 tasks, {duplicates} ran twice (the ones running when the worker died)")
        assert duplicates <= 4  # at most what the 2 processes (+prefetch) held
    finally:
        second.stop()


def test_a_task_longer_than_the_visibility_timeout_runs_once(data_root):
    require_service("redis")
    from testapp.reliable_redis import off

    off.celery.control.purge()
    timeout = off.celery.conf.broker_transport_options["visibility_timeout"]
    token = uuid.uuid4().hex
    worker = start("redis", data_root, 3)
    other = start("redis", data_root, 4)  # a second, idle worker that could steal it
    try:
        wait_ready(off, worker)
        off.submit(tally, token, 0, timeout * 2.5).result(timeout=60)
        # Give the idle worker's restore sweep a chance to (wrongly) redeliver.
        off.submit(tally, token, 1, 0).result(timeout=30)
        assert tallies(token) == {0: 1, 1: 1}
    finally:
        worker.stop()
        other.stop()


def test_a_task_whose_expiry_passes_while_the_worker_is_busy_ends_revoked(off):
    """Celery's test_expired, with offload's settings (late acks, prefetch 1)
    on every broker: the pool busy, a task given expires=1 ends REVOKED
    instead of running once a process is free."""
    from concurrent.futures import CancelledError

    from testapp import add, sleep_then

    busy = [off.submit(sleep_then, 2, i) for i in range(4)]  # 2 processes: 4 s of work
    late = off.options(expires=1).submit(add, 1, 1)
    with pytest.raises(CancelledError):  # a revoked task's Future is cancelled
        late.result(timeout=60)
    assert late.state == "REVOKED" and late.cancelled()
    assert [f.result(timeout=60) for f in busy] == [0, 1, 2, 3]
    # An expiry that is still ahead when a process frees up does not stop the task.
    assert off.options(expires=60).submit(add, 2, 2).result(timeout=60) == 4
