"""Offload's submit/map/options/get/task on real workers, eager mode, and
what happens with bad input or a broker that is not there."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import closed_port, dead_broker_url
from offload import BrokerUnavailable, Offload, current_task, progress
from testapp import add, crunch, div, mul, whoami


def test_registered_task_keeps_celerys_api_and_gains_submit(off):
    task = off.celery.tasks["testapp.mul"]
    assert task.delay(3, 4).get(timeout=30) == 12
    assert task.apply_async((2, 5)).get(timeout=30) == 10
    assert task.submit(3, 5).result(timeout=30) == 15
    assert off.submit(task, 6, 7).result(timeout=30) == 42


def test_task_decorator_bare_and_with_arguments(tmp_path):
    off = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path)})
    other = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path)})

    @off.task
    def bare(x):
        return x + 1

    @off.task(name="custom.name", queue="high", expose=True)
    def named(x):
        return x * 2

    assert bare.delay(1).get() == 2
    assert named.name == "custom.name" and named.expose is True
    assert off.celery.amqp.router.route({}, "custom.name")["queue"].name == "high"
    # Tasks belong to their own Offload only: no Celery "shared" task leaks.
    assert "custom.name" not in other.celery.tasks
    assert bare.expose is False
    assert off.exposed_tasks == {"custom.name": named}
    assert named.submit(4).result(timeout=5) == 8
    with pytest.raises(TypeError, match="decorates a function"):
        off.task(42)
    with pytest.raises(TypeError, match="task name"):
        off.task(name="")


def test_options_and_reserved_queue_keyword(off):
    assert off.options(countdown=0.5).submit(add, 1, 2).result(timeout=30) == 3
    # `queue` is reserved: it names the queue, it is not passed to the function.
    default_queue = off.celery.conf.task_default_queue
    assert off.submit(add, 1, 2, queue=default_queue).result(timeout=30) == 3
    assert off.options(queue=default_queue).map(add, [[1, 1], {"x": 2, "y": 2}])[1].result(timeout=30) == 4
    with pytest.raises(TypeError, match="unknown submit option"):
        off.options(colour="red")


def test_countdown_delays_the_start(off):
    started = time.monotonic()
    future = off.options(countdown=1).submit(add, 1, 1)
    assert future.result(timeout=30) == 2
    assert time.monotonic() - started >= 0.9


def test_map_accepts_args_kwargs_and_single_values(off):
    futures = off.map(add, [[1, 2], (3, 4), {"x": 5, "y": 6}])
    assert [f.result(timeout=30) for f in futures] == [3, 7, 11]
    assert [f.result(timeout=30) for f in off.map(mul.__wrapped__ if hasattr(mul, "__wrapped__") else mul, [[2, 3]])] == [6]


def test_routes_apply_to_submitted_functions(redis_off, data_root):
    """CELERY_ROUTES names functions by dotted path, as Celery names tasks."""
    from conftest import WorkerProcess
    from testapp import test_id
    from testapp.routes_app import ROUTED_QUEUE, off

    worker = WorkerProcess("testapp.routes_app", f"routes-{test_id()}@%h", data_root / "routed.log",
                           concurrency=1, queues=ROUTED_QUEUE)
    try:
        # add is not routed: the default queue's worker (not this one) runs it.
        assert off.submit(whoami, queue=redis_off.celery.conf.task_default_queue).result(
            timeout=30).startswith("redis-")
        assert off.submit(whoami).result(timeout=30).startswith("routes-")
    finally:
        worker.stop()


def test_current_task_is_falsy_outside_a_task():
    assert not current_task
    assert progress(1, 2) is False


def test_status_updates_from_the_seed(off):
    # current_task.update_state works (seed 002 "Status Updates").
    assert off.submit(crunch, 3).result(timeout=30) is True


class TestEagerMode:
    def make(self, tmp_path):
        return Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path),
                        "OFFLOAD_ALLOW": ["testapp"]})

    def test_submit_runs_in_process(self, tmp_path):
        off = self.make(tmp_path)
        future = off.submit(add, 1, y=2)
        assert future.done() and future.result() == 3 and future.state == "SUCCESS"

    def test_exception_is_held_by_the_future(self, tmp_path):
        future = self.make(tmp_path).submit(div, 1, 0)
        assert future.done()
        with pytest.raises(ZeroDivisionError):
            future.result()

    def test_map_and_progress(self, tmp_path):
        off = self.make(tmp_path)
        assert [f.result() for f in off.map(add, [[1, 2], [3, 4]])] == [3, 7]
        assert off.submit(crunch, 3).result() is True

    def test_old_spelling_from_an_ini_file(self, tmp_path):
        off = Offload({"CELERY_ALWAYS_EAGER": "true", "OFFLOAD_DATA_DIR": str(tmp_path),
                       "OFFLOAD_ALLOW": "testapp"})
        assert off.submit(add, 2, 2).result() == 4


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_unreachable_broker_fails_fast(scheme):
    off = Offload({"CELERY_BROKER_URL": dead_broker_url(scheme),
                   "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/9"})
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="unreachable"):
        off.submit(add, 1, 2)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_silent_broker_fails_within_five_seconds(scheme):
    # A server that accepts connections and never answers (a hung broker).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"amqp://guest:guest@127.0.0.1:{port}//"
    off = Offload({"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/9"})
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailable):
            off.submit(add, 1, 2)
        assert time.monotonic() - started < 5
    finally:
        silent.close()


# Secrets and files ---------------------------------------------------------------

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_broker_passwords_never_show(scheme, tmp_path):
    port = closed_port()
    url = (f"redis://:{SECRET}@127.0.0.1:{port}/0" if scheme == "redis"
           else f"amqp://guest:{SECRET}@127.0.0.1:{port}//")
    off = Offload({"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/9",
                   "OFFLOAD_DATA_DIR": str(tmp_path)})
    assert SECRET not in repr(off) and "127.0.0.1" in repr(off)
    assert SECRET not in off.broker_url
    assert SECRET not in repr(off.settings) and "127.0.0.1" in repr(off.settings)
    with pytest.raises(BrokerUnavailable) as submitted:
        off.submit(add, 1, 2)
    assert SECRET not in str(submitted.value) and str(port) in str(submitted.value)
    with pytest.raises(BrokerUnavailable) as pinged:
        off.status(timeout=0.5)
    assert SECRET not in str(pinged.value)


def test_files_under_the_data_dir_are_the_owners_only(tmp_path, monkeypatch):
    """A real local worker on the embedded broker: folder 0700, files 0600."""
    import importlib
    import os
    import stat

    data = tmp_path / "deep" / "data"
    monkeypatch.setenv("OFFLOAD_PRIVATE_DATA_DIR", str(data))
    import testapp.private

    off = importlib.reload(testapp.private).off
    off.start(timeout=60)
    try:
        assert off.submit(add, 1, 2).result(timeout=30) == 3
    finally:
        off.stop()

    def mode(path):
        return oct(stat.S_IMODE(os.stat(path).st_mode))

    assert {mode(p) for p in (tmp_path / "deep", data, data / "workers")} == {"0o700"}
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name.endswith("-wal") for p in files) and any(p.suffix == ".log" for p in files)
    assert {p.name: mode(p) for p in files} == {p.name: "0o600" for p in files}


def test_submit_on_commit_without_an_integration_says_what_to_do(tmp_path):
    from offload.exceptions import ConfigurationError

    off = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path), "OFFLOAD_ALLOW": ["testapp"]})
    with pytest.raises(ConfigurationError, match="offload.django"):
        off.submit(add, 7, 2, on_commit=True)


def test_submit_on_commit_sends_when_the_hook_says_and_checks_arguments_first(tmp_path):
    off = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path), "OFFLOAD_ALLOW": ["testapp"]})
    pending: list = []
    off.add_commit_hook(lambda send: pending.append(send) or True)
    future = off.submit(add, 7, 2, on_commit=True)
    assert not future.done() and len(pending) == 1
    with pytest.raises(TypeError, match="JSON-serializable"):
        off.submit(add, object(), 2, on_commit=True)  # refused now, not at commit
    assert len(pending) == 1
    pending[0]()  # the transaction commits
    assert future.result(timeout=5) == 9
    # A hook that sees no transaction: sent at once.
    declining = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path), "OFFLOAD_ALLOW": ["testapp"]})
    declining.add_commit_hook(lambda send: False)
    assert declining.submit(add, 9, 4, on_commit=True).result(timeout=5) == 13
