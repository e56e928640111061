"""offload.beat: schedules on tasks and CELERY_BEAT_SCHEDULE, run by one
scheduler per deployment on the embedded broker, Redis and RabbitMQ."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from celery.schedules import crontab

from conftest import Spawned, require_service, wait_until, worker_env
from offload import Offload
from offload.beat import SCHEDULER, has_schedule, state_file, task_entries


OFFLOAD = str(Path(sys.executable).parent / "offload")


def noop():
    return None


# Declaring schedules -------------------------------------------------------------------

def test_schedule_takes_seconds_a_timedelta_or_a_celery_schedule(tmp_path):
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path)})
    assert not has_schedule(off)
    every = off.task(name="every", schedule=30)(noop)
    cron = off.task(name="cron", schedule=crontab(minute="*/5"))(noop)
    delta = off.task(name="delta", schedule=datetime.timedelta(minutes=1))(noop)
    assert every.schedule.run_every == datetime.timedelta(seconds=30)
    assert cron.schedule == crontab(minute="*/5")
    assert delta.schedule.run_every == datetime.timedelta(minutes=1)
    assert sorted(task_entries(off.celery)) == ["cron", "delta", "every"]
    assert has_schedule(off)
    assert off.celery.conf.beat_scheduler == SCHEDULER
    assert state_file(off) == tmp_path / "beat" / "celerybeat-schedule"


@pytest.mark.parametrize("bad, error", [
    ("*/5 * * * *", TypeError), (True, TypeError), ([1], TypeError),
    (0, ValueError), (-3.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (datetime.timedelta(0), ValueError),
])
def test_a_wrong_schedule_is_refused_where_it_is_declared(tmp_path, bad, error):
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path)})
    with pytest.raises(error, match="schedule"):
        off.task(name="bad", schedule=bad)(noop)
    assert "bad" not in off.celery.tasks


def test_the_beat_schedule_setting_counts_and_a_users_scheduler_is_kept(tmp_path):
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path),
                   "CELERY_BEAT_SCHEDULE": '{"t": {"task": "x", "schedule": 5}}',
                   "CELERY_BEAT_SCHEDULER": "myapp:MyScheduler"})
    assert has_schedule(off)
    off.task(name="every", schedule=30)(noop)
    assert off.celery.conf.beat_scheduler == "myapp:MyScheduler"


def test_offload_beat_with_nothing_scheduled_says_what_to_do(tmp_path, data_root):
    (tmp_path / "plain.py").write_text(
        f"from offload import Offload\noff = Offload({{'OFFLOAD_DATA_DIR': {str(tmp_path)!r}}})\n")
    proc = subprocess.run([OFFLOAD, "--app", "plain:off", "beat"], cwd=tmp_path, env=worker_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "nothing to schedule" in proc.stderr and "Traceback" not in proc.stderr


# Running on a schedule -----------------------------------------------------------------

def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(params=["embedded", "redis", "rabbitmq"])
def scheduled(request, data_root):
    kind = request.param
    if kind != "embedded":
        require_service("redis")  # RabbitMQ's tests keep their results in Redis
        require_service(kind)
    env = worker_env({"OFFLOAD_TEST_SCHEDULED_BROKER": kind})
    # Where its files go; and no tick left in its queue by an interrupted run.
    probe = subprocess.run(
        [sys.executable, "-c", "from testapp import scheduled; off = scheduled.off; "
         "off.celery.control.purge() if off.settings.celery.get('broker_url') else None; "
         "print(off.settings.data_dir)"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    data_dir = Path(probe.stdout.strip())
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    return kind, env, data_dir


def test_a_task_runs_every_second_and_two_schedulers_never_send_twice(scheduled):
    kind, env, data_dir = scheduled
    worker = Spawned([OFFLOAD, "--app", "testapp.scheduled:off", "worker", "-c", "1", "-n", f"beat-{kind}@%h"],
                     data_dir / "worker.log", env)
    # Two processes both start a scheduler for the same app on this host.
    first = Spawned([OFFLOAD, "--app", "testapp.scheduled:off", "beat"], data_dir / "beat-1.log", env)
    second = Spawned([OFFLOAD, "--app", "testapp.scheduled:off", "beat"], data_dir / "beat-2.log", env)
    schedulers = [first, second]
    try:
        ticks, tocks = data_dir / "tick.runs", data_dir / "tock.runs"
        assert wait_until(lambda: (lines(ticks) >= 3 and lines(tocks) >= 3) or worker.proc.poll() is not None,
                          timeout=120, interval=0.2)
        assert lines(ticks) >= 3 and lines(tocks) >= 3, (
            worker.text()[-3000:] + first.text()[-2000:] + second.text()[-2000:])
        sending = [s for s in schedulers if "Sending due task" in s.text()]
        assert len(sending) == 1, [s.text()[-1500:] for s in schedulers]
        active = sending[0]
        standby = second if active is first else first
        assert "another scheduler" in standby.text() and "waits" in standby.text()

        # The active one stops: the one that waited takes over, and the runs go on.
        active.stop()
        before = lines(ticks)
        assert wait_until(lambda: "Sending due task" in standby.text() and lines(ticks) >= before + 2,
                          timeout=120, interval=0.2), standby.text()[-3000:]
    finally:
        for proc in schedulers:
            proc.stop()
    # Every run was sent once, by one scheduler: as many runs as sends.
    sent = sum(s.text().count("Sending due task tick-") + s.text().count("Sending due task testapp.scheduled.tick")
               for s in schedulers)
    try:
        assert wait_until(lambda: lines(ticks) == sent, timeout=60, interval=0.2), (lines(ticks), sent)
    finally:
        worker.stop()
    assert state_file_exists(data_dir)


def state_file_exists(data_dir: Path) -> bool:
    return any(p.name.startswith("celerybeat-schedule") for p in (data_dir / "beat").iterdir())


def test_offload_cluster_runs_the_scheduler_beside_the_workers(scheduled):
    kind, env, data_dir = scheduled
    cluster = Spawned([OFFLOAD, "--app", "testapp.scheduled:off", "cluster", "--no-flower", "--json"],
                      data_dir / "cluster.log", env)
    ticks = data_dir / "tick.runs"
    beat_log = data_dir / "workers" / "beat.log"
    try:
        assert wait_until(lambda: lines(ticks) >= 2 or cluster.proc.poll() is not None, timeout=120, interval=0.2)
        assert lines(ticks) >= 2, cluster.text()[-3000:] + (beat_log.read_text()[-2000:] if beat_log.exists() else "")
        assert '"event": "beat"' in cluster.text()
        # A scheduler started by hand for the same app waits: the cluster's sends.
        extra = Spawned([OFFLOAD, "--app", "testapp.scheduled:off", "beat"], data_dir / "beat-extra.log", env)
        try:
            assert wait_until(lambda: "waits" in extra.text(), timeout=60, interval=0.2), extra.text()
            before = lines(ticks)
            assert wait_until(lambda: lines(ticks) >= before + 2, timeout=60, interval=0.2)
            assert "Sending due task" not in extra.text()
        finally:
            extra.stop()
    finally:
        cluster.stop()
    assert cluster.proc.returncode == 0, cluster.text()[-2000:]
    assert '"event": "stopped"' in cluster.text()
    # The cluster's scheduler went with it.
    events = [json.loads(line) for line in cluster.text().splitlines() if line.startswith("{")]
    beat_pid = next(e["pid"] for e in events if e["event"] == "beat")
    assert not psutil.pid_exists(beat_pid) or psutil.Process(beat_pid).status() == psutil.STATUS_ZOMBIE


# On several machines ------------------------------------------------------------------------

def host(kind: str, root: Path) -> tuple[dict[str, str], Path]:
    """The environment and data folder of one "machine": a data folder of its own."""
    env = worker_env({"OFFLOAD_TEST_SCHEDULED_BROKER": kind, "OFFLOAD_TEST_DATA_DIR": str(root)})
    probe = subprocess.run([sys.executable, "-c", "from testapp import scheduled; print(scheduled.off.settings.data_dir)"],
                           env=env, capture_output=True, text=True, timeout=60, check=True)
    data_dir = Path(probe.stdout.strip())
    data_dir.mkdir(parents=True, exist_ok=True)
    return env, data_dir


def sends(data_dir: Path) -> int:
    beat_log = data_dir / "workers" / "beat.log"
    text = beat_log.read_text(errors="replace") if beat_log.exists() else ""
    return text.count("Sending due task testapp.scheduled.tick")


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_two_hosts_clusters_on_one_broker_run_a_schedule_once_and_the_survivor_takes_over(kind, tmp_path):
    require_service("redis")
    require_service(kind)
    (env_a, dir_a), (env_b, dir_b) = host(kind, tmp_path / "host-a"), host(kind, tmp_path / "host-b")
    subprocess.run([sys.executable, "-c", "from testapp import scheduled; scheduled.off.celery.control.purge()"],
                   env=env_a, timeout=60, check=True)
    command = [OFFLOAD, "--app", "testapp.scheduled:off", "cluster", "--no-flower", "--json"]
    clusters = {"a": Spawned(command, dir_a / "cluster.log", env_a), "b": Spawned(command, dir_b / "cluster.log", env_b)}
    dirs = {"a": dir_a, "b": dir_b}
    try:
        assert wait_until(lambda: sends(dir_a) + sends(dir_b) >= 6, timeout=120, interval=0.2), (
            clusters["a"].text()[-2000:] + clusters["b"].text()[-2000:])
        # Both clusters run a scheduler; one sends, once per tick.
        holders = [name for name in dirs if sends(dirs[name])]
        assert len(holders) == 1, {name: sends(d) for name, d in dirs.items()}
        holder, survivor = holders[0], ("b" if holders[0] == "a" else "a")
        started, before = time.monotonic(), sends(dirs[holder])
        assert wait_until(lambda: sends(dirs[holder]) >= before + 5, timeout=30, interval=0.1)
        assert sends(dirs[survivor]) == 0
        assert sends(dirs[holder]) - before <= (time.monotonic() - started) + 2  # once a second, not twice

        # The holder's machine dies: its cluster and its scheduler, SIGKILLed.
        events = [json.loads(line) for line in clusters[holder].text().splitlines() if line.startswith("{")]
        beat_pid = next(e["pid"] for e in events if e["event"] == "beat")
        os.killpg(clusters[holder].proc.pid, signal.SIGKILL)
        os.kill(beat_pid, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: sends(dirs[survivor]) >= 2, timeout=30, interval=0.1), (
            (dirs[survivor] / "workers" / "beat.log").read_text()[-2000:])
        print(f"taken over in {time.monotonic() - killed:.1f} s")
    finally:
        for cluster in clusters.values():
            cluster.stop()


# Beside local workers --------------------------------------------------------------------

STARTER = ("import sys, threading\n"
           "from testapp import scheduled_local as app\n"
           "app.off.submit(app.noop).result(timeout=90)\n"
           "print('ready', flush=True)\n"
           "try:\n"
           "    threading.Event().wait()\n"
           "except KeyboardInterrupt:\n"
           "    sys.exit(0)\n")


def test_local_workers_bring_the_scheduler_and_two_processes_never_send_twice(data_root, tmp_path):
    """Two web processes with CELERY_START_LOCAL_WORKERS: the one that runs the
    workers runs the scheduler too, once; it stops with them."""
    env = worker_env({"OFFLOAD_LOCAL_DATA_DIR": str(tmp_path)})
    first = Spawned([sys.executable, "-c", STARTER], tmp_path / "first.log", env)
    second = None
    ticks, beat_log = tmp_path / "tick.runs", tmp_path / "workers" / "beat.log"
    try:
        assert wait_until(lambda: "ready" in first.text() or first.proc.poll() is not None, 120, 0.2), first.text()
        second = Spawned([sys.executable, "-c", STARTER], tmp_path / "second.log", env)
        assert wait_until(lambda: "ready" in second.text() or second.proc.poll() is not None, 120, 0.2), \
            second.text()
        assert wait_until(lambda: lines(ticks) >= 3, 120, 0.2), beat_log.read_text()[-3000:]
        # One scheduler, started by the process that runs the workers.
        log = beat_log.read_text()
        assert log.count("starting the periodic-task scheduler") == 1, log
        scheduler = [p for p in psutil.Process(first.proc.pid).children()
                     if " beat " in " ".join(p.cmdline()) + " "]
        assert len(scheduler) == 1
        assert not [p for p in psutil.Process(second.proc.pid).children()]
    finally:
        # Ctrl-C: the workers and the scheduler stop with the process that started them.
        first.stop(signal.SIGINT)
        if second is not None:
            second.stop(signal.SIGINT)
    assert first.proc.returncode == 0, first.text()
    assert wait_until(lambda: not scheduler[0].is_running() or scheduler[0].status() == psutil.STATUS_ZOMBIE,
                      30, 0.2)
    # Every run was sent once, by one scheduler: no more runs than sends (the
    # last send may still wait in the queue, its worker stopped).
    sent = beat_log.read_text().count("Sending due task")
    assert sent >= 3 and sent - 1 <= lines(ticks) <= sent, (lines(ticks), sent)
