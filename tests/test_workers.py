"""Local workers (offload.workers): real worker processes on Redis.

Seed 002's "Workers", "Queues" and "Monitoring Tools": named workers started
by the app, routed queues, status and inspection, and no worker left behind
however the app that started them ends.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import require_service, wait_until, worker_env
from offload import ConfigurationError, Offload
from offload.workers import INSPECT_TARGETS, WorkersNotReady, _jsonable, inspect, worker_specs

HOST = socket.gethostname()


# CELERY_WORKERS, checked before any process starts --------------------------------

def test_workers_from_a_count_names_or_options():
    assert [w.nodename for w in worker_specs(2)] == [f"worker1@{HOST}", f"worker2@{HOST}"]
    assert [w.nodename for w in worker_specs(["foo", "bar"])] == [f"foo@{HOST}", f"bar@{HOST}"]
    (foo,) = worker_specs({"foo": {"concurrency": 10, "log-level": "error", "queues": ["low", "high"],
                                   "pidfile": "/tmp/offload-pids/%n.pid", "pool": "threads", "prefetch": 2}})
    args = list(foo.args)
    assert args[args.index("--concurrency") + 1] == "10"
    assert args[args.index("--loglevel") + 1] == "ERROR"
    assert args[args.index("--queues") + 1] == "low,high"
    assert args[args.index("--pool") + 1] == "threads"
    assert args[args.index("--prefetch-multiplier") + 1] == "2"
    assert foo.pidfile == "/tmp/offload-pids/foo.pid"


@pytest.mark.parametrize("setting, message", [
    ({"foo": {"colour": "red"}}, "unknown option"),
    ({"foo": {"concurrency": 0}}, "whole number"),
    ({"foo": {"pool": "rocket"}}, "pool"),
    ({"foo": {"queues": []}}, "queue names"),
    ({"foo": {"loglevel": "loud"}}, "log level"),
    (["foo", "foo"], "twice"),
    (["my worker"], "without spaces"),
    (True, "count"),
    (-1, "negative"),
])
def test_bad_workers_setting_says_what_is_wrong(setting, message, tmp_path):
    with pytest.raises(ConfigurationError, match=message):
        Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path),
                 "CELERY_WORKERS": setting}).workers


def test_inspect_rejects_an_unknown_target(tmp_path):
    off = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path)})
    with pytest.raises(ValueError, match="registered"):
        inspect(off.celery, "everything")


def test_control_replies_become_plain_json():
    import datetime

    odd = {("a", 1): {1, 2}, "when": datetime.datetime(2024, 1, 2), "raw": b"x", "nan": float("nan")}
    assert json.loads(json.dumps(_jsonable(odd), allow_nan=False)) == {
        "('a', 1)": [1, 2], "when": "2024-01-02T00:00:00", "raw": "x", "nan": "nan"}


# Real workers -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def routed(data_root):
    """foo and bar from ``testapp.routed``, started by this test process."""
    require_service("redis")
    from testapp.routed import off

    off.celery.control.purge()
    off.start(timeout=60)
    yield off
    pids = list(off.workers.running().values())
    off.stop()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_start_waits_for_every_worker_and_status_shows_them(routed):
    assert routed.status(timeout=2) == {
        "ping": True, "workers": {f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}}


def test_a_queue_only_bar_consumes_runs_on_bar(routed):
    from testapp import whoami
    from testapp.routed import BAR_ONLY

    futures = [routed.submit(whoami, queue=BAR_ONLY) for _ in range(4)]
    assert [f.result(timeout=30) for f in futures] == [f"bar@{HOST}"] * 4


def test_inspection_answers_plain_json_per_worker(routed):
    registered = routed.registered(timeout=1)
    assert set(registered) == {f"foo@{HOST}", f"bar@{HOST}"}
    assert all("offload.dispatch" in names for names in registered.values())
    for what in INSPECT_TARGETS:
        json.dumps(inspect(routed.celery, what, timeout=0.5), allow_nan=False)
    queues = inspect(routed.celery, "active_queues", timeout=1)
    from testapp.routed import BAR_ONLY

    assert BAR_ONLY in [q["name"] for q in queues[f"bar@{HOST}"]]
    assert BAR_ONLY not in [q["name"] for q in queues[f"foo@{HOST}"]]
    assert routed.stats(timeout=1)[f"bar@{HOST}"]["pool"]["max-concurrency"] == 1


def test_each_worker_logs_to_a_file_under_the_data_dir(routed):
    log = routed.workers.log_path("bar")
    assert log.parent == routed.workers.folder
    assert str(log).startswith(routed.settings.data_dir)
    assert f"bar@{HOST} ready" in log.read_text()


def test_a_worker_that_cannot_start_fails_start_with_its_log(data_root, tmp_path):
    require_service("redis")
    from testapp.local import local_settings

    off = Offload(local_settings("broken", CELERY_WORKERS=["broken"], OFFLOAD_DATA_DIR=str(tmp_path)))
    off.workers.app_spec = "testapp.no_such_module:off"
    started = time.monotonic()
    with pytest.raises(WorkersNotReady, match="exited with code") as info:
        off.start(timeout=60)
    assert time.monotonic() - started < 30  # it noticed the exit, not the timeout
    assert "no such module" in str(info.value)
    off.stop()


def test_first_submit_starts_workers_without_waiting_and_stop_kills_a_busy_one(data_root):
    require_service("redis")
    from testapp import add, sleep_then
    from testapp.autostart import off

    off.celery.control.purge()
    started = time.monotonic()
    future = off.submit(add, 2, 3)
    # A worker needs seconds to boot; submit must not have waited for it.
    assert time.monotonic() - started < 1.5
    pids = off.workers.running()
    assert list(pids) == [f"worker1@{HOST}"]
    assert future.result(timeout=60) == 5
    assert off.submit(add, 1, 1).result(timeout=30) == 2
    assert off.workers.running() == pids  # started once

    busy = off.submit(sleep_then, 120)
    assert wait_until(busy.running, 30, interval=0.05)
    group = [psutil.Process(pid) for pid in pids.values()]
    group += [c for p in list(group) for c in p.children(recursive=True)]
    started = time.monotonic()
    off.stop(timeout=1)
    assert time.monotonic() - started < 8  # warm shutdown gave up, then SIGKILL
    gone, alive = psutil.wait_procs(group, timeout=5)
    assert not alive
    off.celery.control.purge()


# No orphans -------------------------------------------------------------------------

def _starter(mode: str, data_dir: str) -> subprocess.Popen[str]:
    env = worker_env({"OFFLOAD_LOCAL_DATA_DIR": data_dir})
    return subprocess.Popen([sys.executable, "-m", "testapp.starter", mode], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _worker_tree(status: dict) -> list[psutil.Process]:
    mains = [psutil.Process(pid) for pid in status["pids"].values()]
    return mains + [child for main in mains for child in main.children(recursive=True)]


@pytest.mark.parametrize("ending", ["exit", "crash", "sigkill"])
def test_workers_never_outlive_the_app_that_started_them(ending, data_root, tmp_path):
    require_service("redis")
    app = _starter("hang" if ending == "sigkill" else ending, str(tmp_path))
    line = app.stdout.readline()
    assert line, app.stderr.read()
    status = json.loads(line)
    # Seed 002: CELERY_WORKERS = ["foo", "bar"]; off.start(); off.status()
    assert status["ping"] is True
    assert status["workers"] == {f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}
    tree = _worker_tree(status)
    assert len(tree) >= 4  # two workers, each with its pool
    if ending == "sigkill":
        app.kill()
    app.wait(30)
    if ending == "crash":
        assert app.returncode != 0 and "the web app crashed" in app.stderr.read()
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_several_processes_of_one_app_start_the_workers_once(data_root, tmp_path):
    """A pre-forking server: each process calls off.start(); one starts the workers."""
    require_service("redis")
    apps = [_starter("hang", str(tmp_path)) for _ in range(3)]
    try:
        statuses = [json.loads(app.stdout.readline()) for app in apps]
        assert all(set(s["workers"]) == {f"foo@{HOST}", f"bar@{HOST}"} for s in statuses)
        owners = [s for s in statuses if s["pids"]]
        assert len(owners) == 1
        workers = [c for app in apps for c in psutil.Process(app.pid).children() if "celery" in c.cmdline()]
        assert len(workers) == 2
        tree = _worker_tree(owners[0])
    finally:
        for app in apps:
            app.kill()
            app.wait(10)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive
