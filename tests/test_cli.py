"""The ``offload`` command and ``flask offload``: real processes on Redis.

Seed 002's "Command-Line Extensions": status, worker, flower, cluster, plus
inspect and app discovery (an Offload, a Flask factory, a Pyramid ini).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
from click.testing import CliRunner

from conftest import require_service, wait_until, worker_env
from offload.cli import main

HOST = socket.gethostname()
BIN = os.path.dirname(sys.executable)


def offload(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``offload`` console script."""
    return subprocess.run([os.path.join(BIN, "offload"), *args], env=worker_env(env), text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def routed(data_root):
    require_service("redis")
    from testapp.routed import off

    off.start(timeout=60)
    yield off
    off.stop()


# App discovery ----------------------------------------------------------------------

@pytest.mark.parametrize("spec, tried", [
    ("no_such_module", "no such module"),
    ("testapp.named:nothing", "has no attribute 'nothing'"),
    ("testapp:add", "could not be called without arguments"),
    ("testapp:BROKERS", "not an Offload, a Flask app or an app factory"),
    ("missing.ini", "no such ini file"),
])
def test_a_wrong_app_says_what_was_tried_and_how_to_fix_it(spec, tried, data_root):
    result = CliRunner().invoke(main, ["--app", spec, "status"])
    assert result.exit_code == 2
    assert f"could not find an Offload from {spec!r}" in result.output
    assert tried in result.output
    assert "--app" in result.output and "module:attr" in result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit


def test_no_app_at_all_is_explained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no app.py / wsgi.py for Flask to find
    monkeypatch.delenv("OFFLOAD_APP", raising=False)
    monkeypatch.delenv("FLASK_APP", raising=False)
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 2 and "OFFLOAD_APP" in result.output


def test_a_wrong_app_from_the_real_command_prints_no_traceback(data_root):
    result = offload("status", env={"OFFLOAD_APP": "testapp.named:nothing"})
    assert result.returncode == 2
    assert "has no attribute 'nothing'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_pyramid_ini_file_names_the_app(tmp_path, data_root):
    ini = tmp_path / "development.ini"
    ini.write_text("[app:main]\nuse = call:testapp.pyramidapp:main\n")
    from offload._boot import find_offload

    off = find_offload(str(ini))
    assert off.celery.conf.task_default_queue.startswith("offload-pyramid-")
    result = CliRunner().invoke(main, ["--app", str(ini), "status", "--timeout", "0.3"])
    assert result.exit_code == 1 and json.loads(result.stdout) == {"ping": False, "workers": {}}


def test_an_unknown_inspect_target_lists_the_valid_ones(data_root):
    result = CliRunner().invoke(main, ["--app", "testapp.idle:off", "inspect", "everything"])
    assert result.exit_code == 2
    for what in ("active", "scheduled", "reserved", "revoked", "registered", "stats"):
        assert what in result.output


@pytest.mark.parametrize("args", [
    ["worker", "--app", "shop", "--loglevel", "INFO"],
    ["worker", "--app=shop", "--loglevel", "INFO"],
    ["worker", "-Ashop", "--loglevel", "INFO"],
])
def test_an_app_named_after_the_command_is_shown_where_it_goes(args):
    result = CliRunner().invoke(main, args, prog_name="offload")
    assert result.exit_code == 2
    assert "offload --app shop worker --loglevel INFO" in result.output
    assert "No such option" not in result.output


def test_every_command_says_where_the_app_goes_under_a_framework_too():
    from offload.cli import group_for

    for name in main.commands:
        result = CliRunner().invoke(main, [name, "-A", "shop"], prog_name="offload")
        assert result.exit_code == 2 and f"offload --app shop {name}" in result.output, name
    managed = group_for(lambda: None, name="manage.py offload")
    result = CliRunner().invoke(managed, ["worker", "--app", "shop"])
    assert result.exit_code == 2
    assert "manage.py offload worker takes no --app" in result.output


def test_flask_names_the_app_before_its_offload_command(data_root):
    result = subprocess.run([os.path.join(BIN, "flask"), "--app", "testapp.flaskapp", "offload",
                             "worker", "--app", "testapp.flaskapp", "-c", "1"],
                            env=worker_env(), text=True, capture_output=True, timeout=60)
    assert result.returncode == 2
    assert "flask --app testapp.flaskapp offload worker -c 1" in result.stderr


def test_status_exits_1_when_no_worker_answers(data_root):
    require_service("redis")
    result = CliRunner().invoke(main, ["--app", "testapp.idle:off", "status", "--timeout", "0.3"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"ping": False, "workers": {}}


def test_demo_runs_the_demo_app_with_host_and_port(monkeypatch):
    import offload.demo

    calls = []
    monkeypatch.setattr(offload.demo, "run", lambda host, port, **options: calls.append((host, port, options)))
    result = CliRunner().invoke(main, ["demo", "--host", "0.0.0.0", "--port", "8123"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["demo", "--data-dir", "./demo-data", "--keep-ledger"])
    assert result.exit_code == 0, result.output
    assert calls == [("0.0.0.0", 8123, {"data_dir": None, "keep_ledger": False}),
                     ("127.0.0.1", 8000, {"data_dir": "./demo-data", "keep_ledger": True})]


# Against running workers ------------------------------------------------------------

def test_status_prints_the_json_of_off_status(routed):
    result = offload("--app", "testapp.routed:off", "status")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == routed.status() == {
        "ping": True, "workers": {f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}}


def test_inspect_registered_lists_the_dispatcher(routed):
    result = offload("--app", "testapp.routed:off", "inspect", "registered", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        f"bar@{HOST}": ["offload.dispatch", "offload.dispatch_chunk"],
        f"foo@{HOST}": ["offload.dispatch", "offload.dispatch_chunk"]}
    human = offload("inspect", "registered", env={"OFFLOAD_APP": "testapp.routed"})
    assert f"foo@{HOST}:\n  offload.dispatch" in human.stdout


def test_worker_runs_one_named_worker_with_its_queues(routed):
    from testapp.routed import BAR_ONLY

    proc = subprocess.Popen([os.path.join(BIN, "offload"), "--app", "testapp.routed:off", "worker",
                             "-n", "solo", "-Q", BAR_ONLY, "-c", "1", "-l", "warning"],
                            env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: f"solo@{HOST}" in routed.status(timeout=0.5)["workers"], 60, interval=0.1)
        queues = routed._inspect("active_queues", 1)[f"solo@{HOST}"]
        assert [q["name"] for q in queues] == [BAR_ONLY]
    finally:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        assert proc.wait(30) == 0


def test_flask_offload_uses_the_current_flask_apps_offload(data_root, tmp_path):
    """A factory app: local workers and `flask offload` both call create_app()."""
    require_service("redis")
    from testapp.flaskapp import app_name, create_app, off

    create_app()
    off.start(timeout=60)
    try:
        assert off.submit(app_name).result(timeout=30) == "testapp.flaskapp"
        result = subprocess.run([os.path.join(BIN, "flask"), "--app", "testapp.flaskapp", "offload",
                                 "status", "--json"], env=worker_env(), text=True, capture_output=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"ping": True, "workers": {f"web@{HOST}": "OK"}}
    finally:
        off.stop()


class _Lines:
    """The JSON lines a process prints, read by a thread so that nothing blocks."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(l) for l in proc.stdout], daemon=True).start()

    def next_event(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            data = json.loads(line)
            if data["event"] == event:
                return data


def test_cluster_runs_every_worker_restarts_a_dead_one_and_stops_on_ctrl_c(data_root, tmp_path):
    require_service("redis")
    from testapp.named import off

    proc = subprocess.Popen([os.path.join(BIN, "offload"), "--app", "testapp.named:off", "cluster",
                             "--json", "--no-flower"], env=worker_env({"OFFLOAD_LOCAL_DATA_DIR": str(tmp_path)}),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = _Lines(proc)
    try:
        ready = lines.next_event("ready")
        assert set(ready["workers"]) == {f"foo@{HOST}", f"bar@{HOST}"}
        foo = psutil.Process(ready["workers"][f"foo@{HOST}"])
        os.killpg(foo.pid, signal.SIGKILL)  # foo and its pool crash
        died = lines.next_event("died")
        assert (died["worker"], died["exit_code"], died["restart_in"]) == ("foo", -signal.SIGKILL, 0)
        restarted = lines.next_event("restarted")
        assert restarted["worker"] == "foo" and restarted["pid"] != foo.pid
        # It dies again at once: the same back-off as local workers (2 s), and
        # its pool processes go with it.
        foo = psutil.Process(restarted["pid"])
        assert wait_until(lambda: len(foo.children()) == 2, 60)
        pool = foo.children()
        foo.kill()
        died = lines.next_event("died")
        assert (died["worker"], died["restart_in"]) == ("foo", 2)
        gone, alive = psutil.wait_procs(pool, timeout=10)
        assert not alive
        restarted = lines.next_event("restarted")
        assert restarted["worker"] == "foo" and restarted["pid"] != foo.pid
        assert wait_until(lambda: off.status(timeout=0.5)["workers"] == {
            f"bar@{HOST}": "OK", f"foo@{HOST}": "OK"}, 60, interval=0.1)
        tree = [psutil.Process(restarted["pid"]), psutil.Process(ready["workers"][f"bar@{HOST}"])]
        tree += [c for p in list(tree) for c in p.children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        lines.next_event("stopped", timeout=30)
        assert proc.wait(30) == 0
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_flower_serves_its_dashboard(data_root):
    pytest.importorskip("flower")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([os.path.join(BIN, "offload"), "--app", "testapp.idle:off", "flower",
                             "--port", str(port)], env=worker_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        assert wait_until(answers, 60, interval=0.1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("command", [["status"], ["inspect", "active"]])
def test_broker_passwords_never_appear_in_the_output(command, data_root):
    from testapp.secret import PASSWORD

    result = offload("--app", "testapp.secret:off", *command, "--timeout", "0.5")
    assert result.returncode != 0
    assert "unreachable" in result.stderr and "127.0.0.1:1" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


# Errors said at once ---------------------------------------------------------------

def test_an_error_inside_an_app_factory_is_shown_with_its_traceback(tmp_path, data_root):
    (tmp_path / "broken_factory.py").write_text(
        "def create_app():\n"
        "    raise RuntimeError('DATABASE_URL is not set')\n")
    result = offload("--app", f"{tmp_path / 'broken_factory.py'}:create_app", "status")
    assert result.returncode != 0
    assert "could not be called without arguments" not in result.stderr
    assert "Traceback" in result.stderr and "RuntimeError: DATABASE_URL is not set" in result.stderr
    assert "broken_factory.py\", line 2, in create_app" in result.stderr
    assert "raised inside the app factory" in result.stderr


def test_a_factory_that_needs_arguments_is_still_said_so(tmp_path, data_root):
    (tmp_path / "needs_args.py").write_text("def create_app(config):\n    return None\n")
    result = offload("--app", f"{tmp_path / 'needs_args.py'}:create_app", "status")
    assert result.returncode == 2
    assert "could not be called without arguments" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
@pytest.mark.parametrize("command", [["worker"], ["cluster", "--no-flower"], ["status"]])
def test_a_dead_broker_fails_worker_cluster_and_status_at_once_with_one_message(command, scheme, tmp_path):
    from conftest import dead_broker_url

    url = dead_broker_url(scheme)
    (tmp_path / "deadapp.py").write_text(
        "from offload import Offload\n"
        f"off = Offload({{'CELERY_BROKER_URL': {url!r}, 'OFFLOAD_DATA_DIR': {str(tmp_path)!r}}})\n")
    started = time.monotonic()
    result = offload("--app", f"{tmp_path / 'deadapp.py'}:off", *command, timeout=60)
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert f"127.0.0.1:{port}" in result.stderr and "is unreachable" in result.stderr
    assert "Is it running?" in result.stderr and "Traceback" not in result.stderr
    assert "guest:guest" not in result.stderr


def test_cluster_names_the_queues_no_worker_consumes(tmp_path):
    require_service("redis")
    from testapp.local import local_settings

    settings = local_settings("unconsumed", OFFLOAD_DATA_DIR=str(tmp_path), OFFLOAD_ALLOW=["testapp"],
                              CELERY_WORKERS={"only": {"concurrency": 1, "queues": ["elsewhere"]}})
    (tmp_path / "unconsumed_app.py").write_text(
        f"from offload import Offload\noff = Offload({settings!r})\n")
    proc = subprocess.Popen([os.path.join(BIN, "offload"), "--app", f"{tmp_path / 'unconsumed_app.py'}:off",
                             "cluster", "--json", "--no-flower"], env=worker_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = _Lines(proc)
    try:
        event = lines.next_event("unconsumed")
        default = settings["CELERY_TASK_DEFAULT_QUEUE"]
        assert list(event["queues"]) == [default]
        assert f"{default!r} (the default queue" in event["message"] and "CELERY_WORKERS" in event["message"]
        lines.next_event("ready")
        proc.send_signal(signal.SIGINT)
        lines.next_event("stopped", timeout=30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
