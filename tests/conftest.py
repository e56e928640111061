"""Shared fixtures: real brokers and real worker processes, one set per session.

Each broker gets one worker process (2 pool processes) per pytest-xdist
process, started on first use and stopped at the end of the session. Tests
wait on conditions (a result, a ping), never on fixed sleeps.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

#: Fixtures shared by the web task API's test modules (tests/web_fixtures.py).
pytest_plugins = ["web_fixtures"]

SERVICES = {"redis": ("127.0.0.1", 6379), "rabbitmq": ("127.0.0.1", 5672)}


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(kind: str) -> None:
    """Skip when a broker is missing on a developer's machine; fail under CI."""
    if kind not in SERVICES or reachable(*SERVICES[kind]):
        return
    message = f"{kind} is not running on {SERVICES[kind]}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must start it: see .ci/run)")
    pytest.skip(message)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OFFLOAD_TEST_DATA_DIR", os.environ["OFFLOAD_TEST_DATA_DIR"])
    env.update(extra or {})
    return env


class WorkerProcess:
    """One ``celery worker`` process for a test app, with its log file."""

    def __init__(self, app_module: str, name: str, log_path: Path, concurrency: int = 2,
                 queues: str | None = None, extra_args: list[str] | None = None) -> None:
        self.app_module = app_module
        self.name = name
        self.log_path = log_path
        args = [sys.executable, "-m", "celery", "-A", app_module, "worker",
                "-n", name, "-c", str(concurrency), "-l", "info",
                "--without-gossip", "--without-mingle"]
        if queues:
            args += ["-Q", queues]
        args += extra_args or []
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, env=worker_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once (a crash)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        self._log.close()


class Spawned:
    """A command in a process group of its own, its output in ``log``.

    ``stop()`` sends SIGTERM to the whole group (the command and whatever it
    started) and SIGKILL if it has not exited in ``timeout`` seconds.
    """

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then closed)."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    return port


def dead_broker_url(scheme: str) -> str:
    """A ``redis`` or ``amqp`` broker URL on a port where nothing listens."""
    port = closed_port()
    return f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"amqp://guest:guest@127.0.0.1:{port}//"


@pytest.fixture
def gate(tmp_path):
    """A file path a ``testapp.calls.gated`` call waits for; opened at the end whatever happens."""
    path = tmp_path / "gate"
    yield str(path)
    path.touch()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes (a condition, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_ready(off, worker: WorkerProcess, timeout: float = 60.0) -> None:
    """Wait until a worker has run a task for ``off`` (works on every broker)."""
    from testapp import noop

    future = off.submit(noop)
    try:
        future.result(timeout=timeout)
    except Exception as exc:
        raise RuntimeError(f"worker {worker.name} did not start: {exc!r}\n{worker.log_tail()}") from exc


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("offload-data")
    os.environ["OFFLOAD_TEST_DATA_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def _workers(data_root):
    started: dict[str, tuple[object, WorkerProcess]] = {}

    def get(kind: str):
        if kind not in started:
            module = importlib.import_module(f"testapp.on_{kind}")
            off = module.off
            purge(off)
            from testapp import test_id

            worker = WorkerProcess(f"testapp.on_{kind}", f"{kind}-{test_id()}@%h",
                                   data_root / f"worker-{kind}.log")
            wait_ready(off, worker)
            started[kind] = (off, worker)
        return started[kind]

    yield get
    for _off, worker in started.values():
        worker.stop()


def purge(off) -> None:
    """Drop what an earlier, interrupted run left in this test id's queues."""
    try:
        off.celery.control.purge()
    except Exception:
        pass


@pytest.fixture(params=["embedded", "redis", "rabbitmq"])
def broker(request) -> str:
    require_service(request.param) if request.param != "embedded" else None
    if request.param == "rabbitmq":
        require_service("redis")  # its result backend in the tests
    return request.param


@pytest.fixture
def off(broker, _workers):
    """An Offload with a live worker on each broker in turn."""
    return _workers(broker)[0]


@pytest.fixture
def redis_off(_workers):
    require_service("redis")
    return _workers("redis")[0]


@pytest.fixture
def rpc_off(_workers):
    """RabbitMQ with Celery's rpc:// result backend (chosen by name: offload's default is the embedded store)."""
    require_service("rabbitmq")
    return _workers("rpc")[0]


@pytest.fixture
def worker_of(_workers):
    """The WorkerProcess serving a broker: ``worker_of("redis")``."""
    return lambda kind: _workers(kind)[1]
