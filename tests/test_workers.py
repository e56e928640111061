"""Local workers (offload.workers): real worker processes on Redis.

Seed 002's "Workers", "Queues" and "Monitoring Tools": named workers started
by the app, routed queues, status and inspection, and no worker left behind
however the app that started them ends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import require_service, wait_until, worker_env
from offload import BrokerUnavailable, ConfigurationError, Offload
from offload.monitor import jsonable
from offload.workers import INSPECT_TARGETS, Backoff, WorkersNotReady, inspect, worker_specs
from testapp.local import local_settings

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
        Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path),  # noqa: B018 (reading
                 "CELERY_WORKERS": setting}).workers                                  # .workers checks it)


def test_inspect_rejects_an_unknown_target(tmp_path):
    off = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path)})
    with pytest.raises(ValueError, match="registered"):
        inspect(off.celery, "everything")


def test_an_unreachable_broker_is_a_clear_error_without_its_password(tmp_path):
    off = Offload({"CELERY_BROKER_URL": "redis://:s3cret@127.0.0.1:1/0", "OFFLOAD_DATA_DIR": str(tmp_path)})
    for ask in (off.status, off.active, off.stats):
        with pytest.raises(BrokerUnavailable, match="Is it running") as info:
            ask(timeout=0.2)
        assert "127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)


def test_backoff_and_restart_refuse_nonsense(tmp_path):
    assert [Backoff(base=1, cap=5).delay(n) for n in range(1, 6)] == [0, 1, 2, 4, 5]
    for bad in ({"base": 0}, {"cap": -1}, {"stable_after": 0}):
        with pytest.raises(ValueError, match="Backoff needs"):
            Backoff(**bad)
    off = Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path), "CELERY_WORKERS": ["foo"]})
    with pytest.raises(ValueError, match="no worker 'bar' run by this process"):
        off.workers.restart("bar")
    with pytest.raises(ValueError, match="no worker 'foo' run by this process"):
        off.workers.restart("foo")  # configured, but this process runs no workers


def test_control_replies_become_plain_json():
    import datetime

    odd = {("a", 1): {1, 2}, "when": datetime.datetime(2024, 1, 2), "raw": b"x", "nan": float("nan")}
    assert json.loads(json.dumps(jsonable(odd), allow_nan=False)) == {
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
        # A program a task started goes with its worker too.
        from testapp import spawn_sleeper
        from testapp.named import off

        tree.append(psutil.Process(off.submit(spawn_sleeper, 300).result(timeout=30)))
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


def test_a_forked_child_neither_holds_the_starter_lock_nor_owns_the_workers(data_root, tmp_path):
    """A pre-forking server: children forked after the parent started the workers."""
    require_service("redis")
    app = _starter("fork", str(tmp_path))
    child = None
    try:
        lines = [json.loads(app.stdout.readline()) for _ in range(2)]
        child = next(line for line in lines if line.get("child"))
        parent = next(line for line in lines if not line.get("child"))
        # A first child exited normally (its atexit hooks ran): the workers
        # are still the parent's and still answer.
        assert parent["owner"] is True and parent["pid"] == app.pid
        assert parent["workers"] == {f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}
        tree = _worker_tree(parent)

        os.kill(app.pid, signal.SIGKILL)  # the parent dies; its child lives on
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive
        # The child never held the lock: another process of the app can take it.
        probe = Offload(local_settings("named", CELERY_WORKERS=["foo", "bar"], OFFLOAD_DATA_DIR=str(tmp_path)))
        assert probe.workers.acquire(), f"the starter lock is still held ({probe.workers.owner_pid()})"
        probe.workers.stop()  # lets it go again

        # And the child itself takes over on its next ensure_started.
        os.kill(child["pid"], signal.SIGUSR1)
        took_over = json.loads(app.stdout.readline())
        # It never believed it owned its parent's workers...
        assert took_over["before"] == {"pid": child["pid"], "owner": False, "pids": {}}
        # ...and now runs its own.
        assert took_over["started"] is True and took_over["owner"] is True
        assert set(took_over["pids"]) == {f"bar@{HOST}", f"foo@{HOST}"}
        assert wait_until(lambda: probe.status(timeout=0.5)["workers"] == {
            f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}, 60, interval=0.1)
        tree = _worker_tree(took_over)
        app.stdin.close()  # the child returns: its atexit hook stops its workers
        gone, alive = psutil.wait_procs([psutil.Process(child["pid"])] + tree, timeout=30)
        assert not alive
    finally:
        for pid in (app.pid, child and child["pid"]):
            if pid and psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
        app.wait(10)


# Supervision: back off, and end whole process groups ---------------------------------

def _starts(off, name: str) -> int:
    """How many times the worker was started (each start writes a line to its log)."""
    log = off.workers.log_path(name)
    return log.read_text().count("--- offload: starting") if log.exists() else 0


def test_a_worker_that_keeps_exiting_is_backed_off_not_started_by_every_submit(data_root, tmp_path, caplog):
    require_service("redis")
    from testapp import add

    off = Offload(local_settings("crashing", CELERY_START_LOCAL_WORKERS=True, CELERY_WORKERS=["crashing"],
                                 OFFLOAD_DATA_DIR=str(tmp_path)))
    off.workers.app_spec = "testapp.no_such_module:off"  # every start exits at once
    caplog.set_level(logging.INFO, logger="offload.workers")
    futures = []

    def submit_and_count(starts: int) -> bool:
        futures.append(off.submit(add, 1, 1))
        return _starts(off, "crashing") >= starts

    try:
        # Started at once, again at once after its first exit, then after 2 s.
        assert wait_until(lambda: submit_and_count(3), 60)
        assert wait_until(lambda: off.workers.running() == {}, 60)  # the third run exited
        # Submits go on: the first sees the exit and backs off (4 s), none starts it.
        for _ in range(50):
            futures.append(off.submit(add, 1, 1))
        assert _starts(off, "crashing") == 3
        assert off.workers.pending_restarts()["crashing"] > 0  # submits returned while it waits
        assert {f.state for f in futures[-50:]} == {"PENDING"}
        exits = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                 and r.name == "offload.workers"]  # other threads of this process log too
        assert len(exits) == 3
        assert f"worker crashing@{HOST} exited with code" in exits[0] and "starts again at once" in exits[0]
        assert "3 times in a row; it starts again in 4s" in exits[2]
        assert "no such module" in exits[2]  # the tail of its log says why

        # An explicit start does not wait out the back-off, and says why it failed.
        assert off.workers.pending_restarts()["crashing"] > 0
        with pytest.raises(WorkersNotReady, match="no such module"):
            off.start(timeout=60)
        assert _starts(off, "crashing") >= 4
    finally:
        off.stop()
        off.celery.control.purge()


def _group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def test_a_worker_found_dead_is_replaced_with_its_whole_group_gone(data_root):
    """Its main process was SIGKILLed; a program a task started lives on in its group."""
    require_service("redis")
    from testapp import add, spawn_sleeper
    from testapp.respawn import off

    off.celery.control.purge()
    try:
        sleeper = psutil.Process(off.submit(spawn_sleeper, 300).result(timeout=60))
        (old,) = off.workers.running().values()
        assert os.getpgid(sleeper.pid) == old  # in the worker's group
        os.kill(old, signal.SIGKILL)  # the main process only
        assert wait_until(lambda: off.workers.running() == {}, 30)
        assert off.submit(add, 2, 2).result(timeout=60) == 4  # the next submit replaced it
        assert list(off.workers.running().values()) != [old]
        gone, alive = psutil.wait_procs([sleeper], timeout=10)
        assert not alive
    finally:
        off.stop()


def test_restart_and_stop_end_the_whole_group(data_root):
    require_service("redis")
    from testapp import spawn_sleeper
    from testapp.respawn import off

    off.celery.control.purge()
    try:
        off.start(timeout=60)
        sleeper = psutil.Process(off.submit(spawn_sleeper, 300).result(timeout=60))
        (old,) = off.workers.running().values()
        old_group = _group(old)
        assert sleeper in old_group and len(old_group) == 4  # the worker, its pool of two, the program
        new = off.workers.restart("respawn")
        gone, alive = psutil.wait_procs(old_group, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        assert off.workers.running() == {f"respawn@{HOST}": new}
        sleeper = psutil.Process(off.submit(spawn_sleeper, 300).result(timeout=60))
        assert os.getpgid(sleeper.pid) == new

        new_group = _group(new)
        off.stop()
        gone, alive = psutil.wait_procs(new_group, timeout=10)
        assert not alive
        assert off.workers.running() == {}
    finally:
        off.stop()


def test_after_start_a_worker_that_dies_is_started_again(routed):
    """No submit needed: off.start() keeps looking after the workers until off.stop()."""
    (foo,) = [pid for name, pid in routed.workers.running().items() if name.startswith("foo@")]
    os.killpg(foo, signal.SIGKILL)
    assert wait_until(lambda: routed.workers.running().get(f"foo@{HOST}") not in (None, foo), 30)
    assert wait_until(lambda: routed.status(timeout=0.5)["workers"] == {
        f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}, 60, interval=0.1)


def test_when_the_process_running_the_workers_ends_another_takes_over(data_root, tmp_path):
    """A pre-forking server recycles the process that started the workers."""
    require_service("redis")
    from testapp.named import off

    apps = [_starter("hang", str(tmp_path)) for _ in range(3)]
    try:
        statuses = [json.loads(app.stdout.readline()) for app in apps]
        (owner,) = [s for s in statuses if s["pids"]]
        old = _worker_tree(owner)
        app = next(a for a in apps if a.pid == owner["pid"])
        app.stdin.close()  # it returns normally: its atexit hook stops its workers
        assert app.wait(30) == 0
        gone, alive = psutil.wait_procs(old, timeout=10)
        assert not alive

        def workers_of_the_others() -> list[psutil.Process]:
            return [c for a in apps if a is not app for c in psutil.Process(a.pid).children()
                    if "celery" in c.cmdline()]

        assert wait_until(lambda: len(workers_of_the_others()) == 2, 30)
        assert wait_until(lambda: off.status(timeout=0.5)["workers"] == {
            f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}, 60, interval=0.1)
        assert len({w.ppid() for w in workers_of_the_others()}) == 1  # one new starter
        tree = workers_of_the_others()
        tree += [c for w in list(tree) for c in w.children(recursive=True)]
    finally:
        for app in apps:
            app.kill()
            app.wait(10)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive


def _celery_mains(data_dir: str) -> list[psutil.Process]:
    """The main processes of the local workers started for ``data_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "offload._boot:app" not in (proc.info["cmdline"] or []):
            continue
        try:
            if os.getpgid(proc.pid) == proc.pid and proc.environ().get("OFFLOAD_LOCAL_DATA_DIR") == data_dir:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


@pytest.mark.parametrize("preload", [True, False])
def test_under_gunicorn_one_process_starts_the_workers(preload, data_root, tmp_path):
    require_service("redis")
    pytest.importorskip("gunicorn")
    from testapp.named import off

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "gunicorn", "-w", "3", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "20",
            *(["--preload"] if preload else []), "testapp.wsgi_starter:application"]
    server = subprocess.Popen(args, env=worker_env({"OFFLOAD_LOCAL_DATA_DIR": str(tmp_path)}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        master = psutil.Process(server.pid)
        assert wait_until(lambda: len(_celery_mains(str(tmp_path))) == 2 and off.status(
            timeout=0.5)["workers"] == {f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}, 90, interval=0.1)
        mains = _celery_mains(str(tmp_path))
        (starter,) = {m.ppid() for m in mains}  # one starter
        if preload:
            assert starter == master.pid
            assert wait_until(lambda: len(master.children()) == 3 + 2, 60)  # its gunicorn workers + ours
            # Each gunicorn worker was forked with the master's lock open: none keeps it.
            web = [c for c in master.children() if c.pid != starter and "gunicorn" in " ".join(c.cmdline())]
            assert not [w for w in web if any(f.path.endswith("starter.lock") for f in w.open_files())]
        else:
            assert starter in {c.pid for c in master.children()}
        tree = mains + [c for m in mains for c in m.children(recursive=True)]
        # Gunicorn replaces the worker that started them (max-requests, a reload): another takes over.
        if not preload:
            os.kill(starter, signal.SIGTERM)
            gone, alive = psutil.wait_procs(tree, timeout=30)
            assert not alive
            assert wait_until(lambda: len(_celery_mains(str(tmp_path))) == 2 and starter not in {
                m.ppid() for m in _celery_mains(str(tmp_path))}, 60)
            mains = _celery_mains(str(tmp_path))
            tree = mains + [c for m in mains for c in m.children(recursive=True)]
        server.send_signal(signal.SIGTERM)  # gunicorn's graceful stop
        assert server.wait(60) == 0
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
