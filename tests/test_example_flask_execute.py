"""examples/flask_execute, run the way its README says: ``flask --app
flask_execute run`` with ``CELERY_START_LOCAL_WORKERS`` (the app starts its
own workers, ``foo`` and ``bar``), on the embedded broker, driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import closed_port, reachable, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_execute"


class Client:
    """JSON over HTTP to the example's views."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, form: dict | None = None) -> tuple[int, dict]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            assert "Traceback" not in body
            return exc.code, json.loads(body)

    def finished(self, task_id: str, timeout: float = 60) -> dict:
        states: list[dict] = []

        def done() -> bool:
            states.append(self.call("GET", f"/tasks/{task_id}")[1])
            return states[-1]["state"] in ("SUCCESS", "FAILURE")

        assert wait_until(done, timeout, interval=0.1), states[-3:]
        return states[-1]


@pytest.fixture
def example(tmp_path):
    """The example served by `flask run`, its data (broker, workers, SQLite) in tmp_path."""
    port = closed_port()
    env = dict(os.environ, FLASK_OFFLOAD_DATA_DIR=str(tmp_path / "data"),
               FLASK_SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'notes.sqlite3'}")
    env.pop("OFFLOAD_APP", None)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log = open(tmp_path / "flask.log", "ab")
    flask_bin = str(Path(sys.executable).parent / "flask")
    proc = subprocess.Popen([flask_bin, "--app", "flask_execute", "run", "--port", str(port)],
                            cwd=EXAMPLE, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert wait_until(lambda: reachable("127.0.0.1", port) or proc.poll() is not None, 60, interval=0.1)
        assert proc.poll() is None, (tmp_path / "flask.log").read_text()
        yield proc, Client(port), tmp_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the app stops its workers on the way out
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_the_seed_in_a_flask_app_with_local_workers(example):
    proc, client, tmp_path = example

    # Submitting Task to Workers: the first submit starts foo and bar.
    status, sent = client.call("POST", "/add?x=1&y=2")
    assert status == 202
    assert client.finished(sent["id"]) == {"id": sent["id"], "state": "SUCCESS", "result": 3}
    workers = [p for p in psutil.Process(proc.pid).children() if "celery" in " ".join(p.cmdline())]
    assert sorted(w.cmdline()[w.cmdline().index("--hostname") + 1].partition("@")[0] for w in workers) \
        == ["bar", "foo"]

    # Queues: `low-priority` is bar's alone, `high-priority` foo's.
    for queue in ("low-priority", "high-priority"):
        status, sent = client.call("POST", f"/add?x=2&y=3&queue={queue}")
        assert status == 202 and client.finished(sent["id"])["result"] == 5
    assert client.call("GET", "/status")[1]["ping"] is True

    # map over an iterator of pairs.
    assert client.call("GET", "/map?pairs=1,2;3,4;5,6") == (200, {"results": [3, 7, 11]})

    # Status Updates: PROGRESS with the task's meta while it runs, then the result.
    status, sent = client.call("POST", "/crunch?steps=6")
    seen: list[dict] = []
    assert wait_until(lambda: seen.append(client.call("GET", f"/tasks/{sent['id']}")[1])
                      or seen[-1]["state"] in ("PROGRESS", "SUCCESS"), 60, interval=0.05)
    assert seen[-1]["state"] == "PROGRESS", seen[-1]
    assert seen[-1]["progress"]["steps"] == 6
    assert client.finished(sent["id"])["result"] == 6

    # The task runs in the app context: current_app and Flask-SQLAlchemy work,
    # and what it committed is what the view reads afterwards.
    status, sent = client.call("POST", "/notes", {"text": "written by a task"})
    assert client.finished(sent["id"])["result"] == {"app": "flask_execute", "notes": ["written by a task"]}
    assert client.call("GET", "/notes") == (200, {"notes": ["written by a task"]})
    status, sent = client.call("POST", "/notes/count")  # the registered task, .delay()
    assert client.finished(sent["id"])["result"] == 1

    # add_done_callback runs in the web process when the task ends.
    status, sent = client.call("POST", "/add?x=20&y=22")
    assert wait_until(lambda: sent["id"] in client.call("GET", "/finished")[1]["ids"], 60, interval=0.1)
    assert client.finished(sent["id"])["result"] == 42

    # A task id nobody sent is still a task id: pending, and cancel revokes it.
    unknown = str(uuid.uuid4())
    assert client.call("GET", f"/tasks/{unknown}") == (200, {"id": unknown, "state": "PENDING"})
    assert client.call("DELETE", f"/tasks/{unknown}") == (200, {"id": unknown, "cancelled": True})

    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0 or proc.returncode is not None
    assert wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                      for w in workers), 30)


@pytest.mark.parametrize(("method", "path", "form"), [
    ("GET", "/tasks/garbage", None),
    ("GET", "/tasks/" + "a" * 5000, None),
    ("DELETE", "/tasks/not-an-id", None),
    ("POST", "/add?x=one&y=2", None),
    ("POST", "/add?y=2", None),
    ("POST", "/add?x=1&y=2&queue=nope", None),
    ("GET", "/map?pairs=1,2;x", None),
    ("GET", "/map?pairs=1,2,3", None),
    ("POST", "/crunch?steps=0", None),
    ("POST", "/notes", {"text": ""}),
])
def test_bad_input_is_a_400_never_a_traceback(example, method, path, form):
    _proc, client, _tmp = example
    status, body = client.call(method, path, form)
    assert status == 400
    assert body["error"]
