"""The functions the test suite sends to real workers.

One Offload per broker lives in ``testapp.on_<broker>``; a worker for it is
``python -m celery -A testapp.on_redis worker``. Settings come from the
environment so that the test process and its workers agree on them.
"""

from __future__ import annotations

import os
import subprocess
import time

from offload import Offload, current_task, progress

BROKERS = ("embedded", "redis", "rabbitmq")


def test_id() -> str:  # noqa: PT004 (not a test)
    """Each pytest-xdist process gets brokers of its own (db, queues, exchange).

    OFFLOAD_TEST_NAMESPACE keeps two test runs on one machine apart.
    """
    return os.environ.get("OFFLOAD_TEST_NAMESPACE", "") + os.environ.get("PYTEST_XDIST_WORKER", "gw0")


test_id.__test__ = False  # imported into test modules: not a test itself


def xdist_index() -> int:
    """0 for gw0 (or no xdist), 1 for gw1, ...: picks a Redis database."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)


def settings(kind: str) -> dict:
    wid = test_id()
    index = xdist_index()
    redis_db = 1 + index % 15
    common = {
        "CELERY_TASK_DEFAULT_QUEUE": f"offload-test-{wid}",
        "CELERY_CONTROL_EXCHANGE": f"offload-test-{wid}",
        "CELERY_EVENT_EXCHANGE": f"offload-test-ev-{wid}",
        "OFFLOAD_DATA_DIR": os.path.join(os.environ.get("OFFLOAD_TEST_DATA_DIR", "/tmp/offload-tests"), wid, kind),
    }
    if kind == "redis":
        common["CELERY_BROKER_URL"] = f"redis://127.0.0.1:6379/{redis_db}"
    elif kind == "rabbitmq":
        common["CELERY_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:5672//"
        common["CELERY_RESULT_BACKEND"] = f"redis://127.0.0.1:6379/{redis_db}"
    elif kind == "rpc":  # RabbitMQ with Celery's rpc:// result backend
        common["CELERY_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:5672//"
        common["CELERY_RESULT_BACKEND"] = "rpc://"
        common["CELERY_TASK_DEFAULT_QUEUE"] = f"offload-test-rpc-{wid}"
    elif kind != "embedded":
        raise ValueError(kind)
    return common


def make(kind: str) -> Offload:
    off = Offload(settings(kind))
    off.task(name="testapp.mul")(mul)
    from testapp.coroutines import add_later

    off.task(name="testapp.async_add")(add_later)
    from testapp.hostile import leave

    off.task(name="testapp.leave")(leave)  # sys.exit() in a task: its pool process ends
    return off


def noop():
    return None


def add(x, y):
    return x + y


def div(x, y):
    return x / y


def mul(x, y):
    return x * y


def time_out(message):
    """A task whose own error is a TimeoutError."""
    raise TimeoutError(message)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def crunch(n, pause=0.0):
    """Seed 002's "Status Updates": progress and current_task from a task."""
    for i in range(n):
        progress(i + 1, n, message="crunching")
        time.sleep(pause)
    current_task.update_state(state="PROGRESS", meta={"current": n, "total": n, "message": "done"})
    return bool(current_task)


def spawn_sleeper(seconds):
    """Start a program that outlives the task (in the worker's process group); its pid."""
    return subprocess.Popen(["sleep", str(seconds)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid


def whoami():
    return current_task.request.hostname


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


class Shapes:
    @staticmethod
    def square(x):
        return x * x

    @classmethod
    def name(cls):
        return cls.__name__
