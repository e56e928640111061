"""Seed 001's "Using" session against examples/pyramid_ledger, run the way its
"Running Locally" says: ``python -m pyramid_ledger`` (waitress) or ``pserve
development.ini``, and ``celery -A pyramid_ledger worker -l INFO`` (or the ini
worker), on the local Redis."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import Spawned, closed_port, reachable, require_service, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pyramid_ledger"
# The example's queue is Celery's default ("celery") and its ledger the key
# "ledger", as in the seed: each way of running it gets a database of its own
# (no other test uses those names), so the two may run at once. Databases 4
# and 7: the others serve other tests and the conformance suites.
REDIS_URLS = {"python -m": "redis://127.0.0.1:6379/4", "pserve": "redis://127.0.0.1:6379/7"}

pytestmark = pytest.mark.redis


def process(args: list[str], log: Path, redis_url: str) -> Spawned:
    """A command of the example's, run from its folder on ``redis_url``, with its log."""
    env = dict(os.environ, REDIS_URL=redis_url)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return Spawned(args, log, env, cwd=EXAMPLE)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(params=list(REDIS_URLS))
def how(request):
    return request.param


@pytest.fixture
def clean_redis(how):
    require_service("redis")
    import redis

    client = redis.Redis.from_url(REDIS_URLS[how])
    client.delete("ledger", "celery")
    yield client
    client.delete("ledger")
    client.close()


def start_web(how: str, port: int, tmp_path: Path) -> Spawned:
    if how == "python -m":
        return process([sys.executable, "-m", "pyramid_ledger", "--port", str(port)], tmp_path / "web.log",
                       REDIS_URLS[how])
    # pserve development.ini, on a free port instead of 8000.
    ini = tmp_path / "development.ini"
    ini.write_text((EXAMPLE / "development.ini").read_text().replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    return process([str(Path(sys.executable).parent / "pserve"), str(ini)], tmp_path / "web.log", REDIS_URLS[how])


def start_worker(how: str, tmp_path: Path) -> Spawned:
    if how == "python -m":
        args = ["celery", "-A", "pyramid_ledger", "worker", "-l", "INFO"]
    else:
        args = ["celery", "-A", "offload.pyramid", "worker", "--ini", "development.ini", "-l", "INFO"]
    return process([str(Path(sys.executable).parent / args[0]), *args[1:]], tmp_path / "worker.log",
                   REDIS_URLS[how])


def test_the_seeds_using_session(clean_redis, tmp_path, how):
    port = closed_port()
    web = start_web(how, port, tmp_path)
    worker = start_worker(how, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: reachable("127.0.0.1", port) or web.proc.poll() is not None, timeout=60)
        assert web.proc.poll() is None, (tmp_path / "web.log").read_text()

        assert get(f"{base}/append?value=10") == (200, "Done.\n")
        status, task_id = get(f"{base}/total?delay=5")
        assert status == 200 and len(task_id.strip()) == 36, task_id
        task_id = task_id.strip()
        # The worker may still be starting, and the task sleeps 5 s: pending first.
        assert get(f"{base}/result?id={task_id}") == (200, "Pending...\n")
        assert wait_until(lambda: get(f"{base}/result?id={task_id}") != (200, "Pending...\n"),
                          timeout=90, interval=0.25), (tmp_path / "worker.log").read_text()[-3000:]
        assert get(f"{base}/result?id={task_id}") == (200, "10\n")

        status, body = get(f"{base}/append")
        assert status == 400 and "Must include `value`." in body
        status, body = get(f"{base}/append?value=x")
        assert status == 400 and "`value` must be an integer." in body
        for bad in ("garbage%3Cscript%3E", "no%20such%20id", "", "%00", "x" * 4000):
            status, body = get(f"{base}/result?id={bad}")
            assert status == 400 and "Traceback" not in body, (bad, body)
        status, body = get(f"{base}/result")
        assert status == 400 and "Must include `id`." in body
        status, body = get(f"{base}/total?delay=soon")
        assert status == 400 and "`delay` must be a float." in body
        for bad in ("-1", "nan", "1e308"):
            assert get(f"{base}/total?delay={bad}")[0] == 400
        assert clean_redis.lrange("ledger", 0, -1) == [b"10"]  # the failed appends added nothing
    finally:
        web.stop()
        worker.stop()
