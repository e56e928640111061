"""A broker that dies and comes back loses nothing.

Each test runs a broker of its own (a durable redis-server, a second
RabbitMQ node), kills or stops it while short tasks run, starts it again,
and checks that every task ``submit`` accepted ends with its result and
that none is reported REVOKED, which nobody asked for.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from conftest import WorkerProcess, closed_port, require_service, wait_ready, wait_until
from testapp import test_id
from testapp.reliable import tally
from test_reliability import tallies

TASKS = 250
#: How long the broker stays down: long enough for every part to notice.
OUTAGE = 3.0

pytestmark = pytest.mark.xdist_group("broker-restart")


class DurableRedis:
    """A redis-server of the test's own: AOF with fsync on every write, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed (CI must have it: see .ci/run)")
            pytest.skip("redis-server is not installed")
        self.folder = folder
        self.port = closed_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
             "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        assert wait_until(lambda: _answers(client), 20), (self.folder / "redis.log").read_text()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def durable_redis(tmp_path):
    server = DurableRedis(tmp_path)
    yield server
    server.stop()


RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class PrivateRabbitMQ:
    """A RabbitMQ node of the test's own, beside the shared one: its own name,
    ports, data and log folders, config (no shared listener) and no plugins.

    Run as this user straight from RabbitMQ's own bin folder (the wrappers in
    /usr/sbin switch to the ``rabbitmq`` user), so ``rabbitmqctl`` shares this
    user's Erlang cookie with it.
    """

    def __init__(self, folder: Path) -> None:
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not server.exists():
            if os.environ.get("CI"):
                pytest.fail("rabbitmq-server is not installed (CI must have it: see .ci/run)")
            pytest.skip("rabbitmq-server is not installed")
        self.folder = folder
        self.port, dist_port = closed_port(), closed_port()
        self.node = f"offload-test-{test_id()}-{self.port}@localhost"
        (folder / "mnesia").mkdir()
        (folder / "log").mkdir()
        (folder / "plugins").write_text("")
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (folder / "env.conf").write_text(
            'ERL_EPMD_ADDRESS=127.0.0.1\nexport ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n')
        env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
               "RABBITMQ_DIST_PORT": str(dist_port), "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
               "RABBITMQ_LOG_BASE": str(folder / "log"), "RABBITMQ_PID_FILE": str(folder / "pid"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "plugins"),
               "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
               "RABBITMQ_CONF_ENV_FILE": str(folder / "env.conf")}
        self.proc = subprocess.Popen([str(server)], env=env, stdout=open(folder / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        # await_startup fails at once until the node's distribution listens.
        if not wait_until(lambda: self.proc.poll() is None and self._ctl("await_startup")[0] == 0, 90, 0.5):
            self.stop()
            pytest.fail(f"the private RabbitMQ node did not start:\n{self.log_tail()}")
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _ctl(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
                              capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    def ctl(self, *args: str, timeout: float = 60) -> None:
        code, output = self._ctl(*args, timeout=timeout)
        assert code == 0, (args, output, self.log_tail())

    def log_tail(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=60)
                self.proc.wait(30)
            except (AssertionError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def private_rabbitmq(tmp_path):
    node = PrivateRabbitMQ(tmp_path)
    yield node
    node.stop()


def restart_app(monkeypatch, broker: str, backend: str = ""):
    """``testapp.restart`` imported afresh on ``broker``, as its worker will import it."""
    monkeypatch.setenv("OFFLOAD_TEST_RESTART_BROKER", broker)
    monkeypatch.setenv("OFFLOAD_TEST_RESTART_BACKEND", backend)
    sys.modules.pop("testapp.restart", None)
    return importlib.import_module("testapp.restart").off


def burst_across_an_outage(off, worker: WorkerProcess, down, up) -> tuple[list, str]:
    """Submit TASKS 20 ms tasks, call ``down()`` while they run, ``up()`` OUTAGE s later.

    Returns the futures once every one is done, and the run's token.
    """
    token = uuid.uuid4().hex
    wait_ready(off, worker)
    futures = [off.submit(tally, token, i, 0.02) for i in range(TASKS)]
    assert wait_until(lambda: len(tallies(token)) >= 20, 60), worker.log_tail()
    down()
    time.sleep(OUTAGE)  # the outage itself, not a wait for a condition
    up()
    for future in futures:
        try:
            future.result(timeout=120)
        except Exception as exc:
            raise AssertionError(f"task {future.id} ended {future.state}: {exc!r}\n{worker.log_tail(60)}") from exc
    return futures, token


def check_nothing_lost(futures: list, token: str, worker: WorkerProcess) -> None:
    states = {f.state for f in futures}
    assert states == {"SUCCESS"}, (states, worker.log_tail(60))
    counts = tallies(token)
    assert sorted(counts) == list(range(TASKS)), "every task ran"
    print(f"{TASKS} tasks, {sum(c - 1 for c in counts.values())} ran twice")


@pytest.mark.parametrize("scheme", ["redis", "offload-redis"])
def test_a_killed_redis_restarted_loses_no_task(scheme, durable_redis, monkeypatch, data_root, caplog):
    require_service("redis")  # the tally
    port = durable_redis.port
    off = restart_app(monkeypatch, f"{scheme}://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1")
    assert off.celery.conf.worker_cancel_long_running_tasks_on_connection_loss is True
    worker = WorkerProcess("testapp.restart", f"restart-{scheme}-{test_id()}@%h",
                           data_root / f"restart-{scheme}.log", concurrency=2)
    caplog.set_level(logging.INFO, logger="offload.hub")
    try:
        futures, token = burst_across_an_outage(off, worker, durable_redis.kill, durable_redis.start)
        check_nothing_lost(futures, token, worker)
        # This hub told of the outage once, and of its end once.
        hub_lines = [r.getMessage() for r in caplog.records
                     if r.name == "offload.hub" and f":{port}/" in r.getMessage()]
        assert len([m for m in hub_lines if "unreachable" in m]) == 1, hub_lines
        assert len([m for m in hub_lines if "answers again" in m]) == 1, hub_lines
    finally:
        worker.stop()


def test_a_received_unstarted_task_goes_back_at_once_when_redis_restarts(durable_redis, monkeypatch, data_root):
    # The window the burst above hits about one run in eight: one pool
    # process runs A, and B, prefetched, waits for it; Redis dies. Celery
    # cancels A (handed back) and drops B's request when it reconnects; B's
    # lease could not be restored at close (Redis was down), so without the
    # transport's give-back it would wait out the visibility timeout, an
    # hour here.
    require_service("redis")  # the tally
    port = durable_redis.port
    monkeypatch.setenv("OFFLOAD_TEST_RESTART_VISIBILITY", "3600")
    off = restart_app(monkeypatch, f"offload-redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1")
    assert off.celery.conf.broker_transport_options["visibility_timeout"] == 3600
    log = data_root / f"restart-unstarted-{test_id()}.log"
    worker = WorkerProcess("testapp.restart", f"restart-unstarted-{test_id()}@%h", log, concurrency=1,
                           extra_args=["--prefetch-multiplier", "2"])
    token = uuid.uuid4().hex
    try:
        wait_ready(off, worker)
        running = off.submit(tally, token, 0, 5.0)
        waiting = off.submit(tally, token, 1)
        assert wait_until(lambda: running.state == "STARTED", 60), worker.log_tail()
        assert wait_until(lambda: f"[{waiting.id}] received" in log.read_text(), 30), worker.log_tail()
        durable_redis.kill()
        assert tallies(token) == {}, "A still ran and B had not started when Redis died"
        assert wait_until(lambda: "Connection to broker lost" in log.read_text(), 30), worker.log_tail()
        durable_redis.start()
        # Well within the visibility timeout: given back, not swept back.
        assert waiting.result(timeout=60) and running.result(timeout=60), worker.log_tail(60)
        assert sorted(tallies(token)) == [0, 1]
        text = log.read_text()
        assert "go back to their queue as soon as a new connection reaches it" in text, worker.log_tail(60)
        assert "message(s) held when the Redis connection was lost: back on their queue" in text, worker.log_tail(60)
    finally:
        worker.stop()


def test_a_rabbitmq_stopped_and_started_again_loses_no_task(private_rabbitmq, monkeypatch, data_root):
    require_service("redis")  # the result store and the tally: it stays up
    from testapp import settings

    backend = settings("redis")["CELERY_BROKER_URL"]
    off = restart_app(monkeypatch, private_rabbitmq.url, backend)
    worker = WorkerProcess("testapp.restart", f"restart-amqp-{test_id()}@%h",
                           data_root / "restart-amqp.log", concurrency=2)
    try:
        futures, token = burst_across_an_outage(off, worker, lambda: private_rabbitmq.ctl("stop_app"),
                                                lambda: private_rabbitmq.ctl("start_app"))
        check_nothing_lost(futures, token, worker)
    finally:
        worker.stop()
