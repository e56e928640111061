"""``offload demo`` for real: the ledger app in a subprocess, its worker on the
embedded broker, spoken to over HTTP on loopback, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import closed_port, wait_until


class Demo:
    """``python -m offload.demo`` on a free port with its own data folder."""

    def __init__(self, data_dir: Path, command: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = closed_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "demo.log"
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, OFFLOAD_DEMO_DATA_DIR=str(data_dir / "data"), **(env or {}))
        # cwd in the temp folder: nothing the demo writes lands in the repo.
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "offload.demo"]), "--port", str(self.port)],
            cwd=data_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        if not wait_until(self._answers, timeout=60):
            self.close()
            pytest.fail(f"the demo did not answer on port {self.port}:\n{self.log_tail()}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the demo exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def workers(self) -> list[psutil.Process]:
        """The celery worker processes (and their pool) under the demo."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return children

    def close(self) -> None:
        """Leave nothing running, whatever a test did."""
        leftovers = self.workers()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for child in leftovers:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()


def is_celery(process: psutil.Process) -> bool:
    try:
        return "celery" in " ".join(process.cmdline())
    except psutil.Error:  # exited meanwhile
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    running = Demo(tmp_path_factory.mktemp("demo"))
    yield running
    running.close()


def readme_session(demo: Demo) -> str:
    """The README's curl session: append 10 and 32, total, poll the result."""
    assert demo.get("/append?value=10") == (200, "Done.\n")
    assert demo.get("/append?value=32") == (200, "Done.\n")
    status, task_id = demo.get("/total?delay=0.2")
    assert status == 200, task_id
    answers = [""]

    def total_ready() -> bool:
        answers[0] = demo.get(f"/result?id={task_id.strip()}")[1]
        return answers[0] != "Pending...\n"

    assert wait_until(total_ready, timeout=60, interval=0.1), demo.log_tail()
    return answers[0]


def test_offload_demo_takes_data_dir_and_a_second_session_answers_42_again(tmp_path):
    command = [os.path.join(os.path.dirname(sys.executable), "offload"), "demo",
               "--data-dir", str(tmp_path / "named")]
    for run in range(2):
        demo = Demo(tmp_path, command)
        try:
            assert readme_session(demo) == "42\n", f"run {run + 1}:\n{demo.log_tail()}"
            assert str(tmp_path / "named") in demo.log_tail()
        finally:
            demo.proc.send_signal(signal.SIGTERM)
            demo.proc.wait(30)
            demo.close()
    assert (tmp_path / "named" / "ledger.sqlite3").exists()


def test_the_demo_worker_runs_the_demo_whatever_app_the_shell_exports(tmp_path):
    """The guides tell users to export OFFLOAD_APP for their own app; the
    demo's worker builds the demo's app all the same, not theirs (where the
    demo's tasks are not registered)."""
    (tmp_path / "mytasks.py").write_text(
        "from offload import Offload\n"
        "off = Offload({'CELERY_BROKER_URL': 'memory://', 'CELERY_RESULT_BACKEND': 'cache+memory://'})\n")
    command = [os.path.join(os.path.dirname(sys.executable), "offload"), "demo"]
    demo = Demo(tmp_path, command, env={"OFFLOAD_APP": "mytasks:off", "FLASK_APP": "mytasks:off"})
    try:
        assert readme_session(demo) == "42\n", demo.log_tail()
        assert "not registered" not in demo.log_path.read_text(errors="replace")
    finally:
        demo.proc.send_signal(signal.SIGTERM)
        demo.proc.wait(30)
        demo.close()


def test_totals_the_ledger_on_a_worker(demo):
    assert demo.get("/append?value=10") == (200, "Done.\n")
    assert demo.get("/append?value=32") == (200, "Done.\n")
    status, body = demo.get("/total?delay=0.2")
    assert status == 200
    task_id = body.strip()
    assert len(task_id) == 36, body

    answers: list[str] = []

    def total_ready() -> bool:
        status, body = demo.get(f"/result?id={task_id}")
        assert status == 200, body
        answers.append(body)
        return body != "Pending...\n"

    assert wait_until(total_ready, timeout=60, interval=0.1), demo.log_tail()
    assert answers[-1] == "42\n"


@pytest.mark.parametrize("path, message", [
    ("/append", "Must include `value`."),
    ("/append?value=", "`value` must be an integer."),
    ("/append?value=ten", "`value` must be an integer."),
    ("/append?value=1.5", "`value` must be an integer."),
    (f"/append?value={2**64}", "`value` must be a 64-bit integer"),
    ("/total?delay=soon", "`delay` must be a float."),
    ("/total?delay=-1", "`delay` must be a number of seconds"),
    ("/total?delay=nan", "`delay` must be a number of seconds"),
    ("/result", "Must include `id`"),
    ("/result?id=", "Must include `id`"),
])
def test_bad_input_gets_400_with_a_reason(demo, path, message):
    status, body = demo.get(path)
    assert status == 400
    assert body.startswith(message), body


def test_index_explains_the_urls_and_unknown_pages_are_404(demo):
    status, page = demo.get("/")
    assert status == 200
    for link in ('href="/append?value=10"', 'href="/total?delay=5"', "/result?id="):
        assert link in page
    assert demo.get("/nope")[0] == 404
    request = urllib.request.Request(demo.base + "/append?value=1", method="POST")
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(request, timeout=10)
    assert excinfo.value.code == 405


def test_the_front_page_is_styled_and_links_the_dashboard(demo):
    status, page = demo.get("/")
    assert status == 200
    assert 'href="/offload/static/offload.css"' in page and 'href="/offload/dashboard"' in page
    status, css = demo.get("/offload/static/offload.css")
    assert status == 200 and "prefers-color-scheme: dark" in css
    status, board = demo.get("/offload/dashboard")
    assert status == 200 and "data-worker=" in board


def test_sigterm_stops_the_server_and_its_worker(demo):
    # The worker has run a task in this module, or is about to be found.
    assert wait_until(lambda: any(is_celery(p) for p in demo.workers()), timeout=30), demo.log_tail()
    workers = demo.workers()
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(30) == 0, demo.log_tail()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"left running: {alive}\n{demo.log_tail()}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", demo.port), timeout=1).close()


def test_a_busy_port_is_a_clear_error_and_starts_no_worker(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "offload.demo", "--port", str(port)], cwd=tmp_path,
            env=dict(os.environ, OFFLOAD_DEMO_DATA_DIR=str(tmp_path / "data")),
            capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
    assert not (tmp_path / "data" / "workers").exists()  # bound before any worker starts
