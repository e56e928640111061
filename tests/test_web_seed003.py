"""Seed 003 on RabbitMQ, as its own client speaks: JSON-RPC 1.0 (Pyjamas'
``JSONProxy``: no "jsonrpc" member, ``application/json-rpc``), a job started
through one web process and polled on a timer through another, with
offload's default result backend for RabbitMQ. A real worker, two real web
processes."""

from __future__ import annotations

import json
import sys

import httpx
import pytest
from conftest import (
    TESTS,
    Spawned,
    WorkerProcess,
    closed_port,
    purge,
    require_service,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.timeout(240)

STATE_ORDER = {"PENDING": 0, "RECEIVED": 1, "STARTED": 2, "PROGRESS": 3, "SUCCESS": 4}


def pyjamas_call(base: str, request_id, method: str, params: list):
    """What the seed's JSONProxy sends: {"id", "method", "params"} as application/json-rpc."""
    answer = httpx.post(f"{base}/offload/rpc", content=json.dumps({"id": request_id, "method": method,
                                                                  "params": params}),
                        headers={"content-type": "application/json-rpc"}, timeout=30)
    return answer


@pytest.fixture
def seed003(tmp_path):
    require_service("rabbitmq")
    from testapp import seed003, test_id

    assert seed003.off.celery.conf.result_backend.startswith("sqlite://")  # the default, not rpc://
    purge(seed003.off)
    worker = WorkerProcess("testapp.seed003", f"seed003-{test_id()}@%h", tmp_path / "worker.log")
    webs = []
    try:
        for n in range(2):
            port = closed_port()
            # Imported, not run as __main__: the task keeps its name (testapp.seed003.echo).
            serve = "import sys; from testapp.seed003 import main; main(int(sys.argv[1]))"
            web = Spawned([sys.executable, "-c", serve, str(port)], tmp_path / f"web{n}.log",
                          env=worker_env(), cwd=TESTS)
            webs.append((web, f"http://127.0.0.1:{port}"))
        for web, base in webs:
            def up(web=web, base=base) -> bool:
                assert web.proc.poll() is None, web.text()
                try:
                    return httpx.get(f"{base}/offload/openapi.json", timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_until(up, timeout=60), web.text()
        yield worker, [base for _web, base in webs]
    finally:
        for web, _base in webs:
            web.stop()
        worker.stop()


def test_seed003_polls_a_job_from_a_second_web_process_over_json_rpc_1_0(seed003):
    worker, (first, second) = seed003
    started = pyjamas_call(first, 1, "echo", ["hello from pyjamas"])
    assert started.status_code == 200
    answer = started.json()
    assert set(answer) == {"result", "error", "id"} and answer["error"] is None and answer["id"] == 1
    task_id = answer["result"]

    seen: list[str] = []

    def finished() -> bool:
        # The seed's repeating timer, asking the *other* web process.
        status = pyjamas_call(second, len(seen) + 2, "task.status", [task_id]).json()
        assert status["error"] is None and set(status) == {"result", "error", "id"}, status
        seen.append(status["result"]["state"])
        return seen[-1] in ("SUCCESS", "FAILURE", "REVOKED")

    assert wait_until(finished, timeout=90, interval=0.2), (seen, worker.log_tail())
    assert seen[-1] == "SUCCESS", (seen, worker.log_tail())
    ranks = [STATE_ORDER[state] for state in seen]
    assert ranks == sorted(ranks), seen  # never backwards
    result = pyjamas_call(second, 99, "task.status", [task_id]).json()["result"]
    assert result["result"] == "hello from pyjamas"
    # A long-poll, then a plain read, on either process: SUCCESS stays SUCCESS.
    for base in (first, second):
        assert httpx.get(f"{base}/offload/tasks/{task_id}", params={"wait": 10}).json()["state"] == "SUCCESS"
        assert httpx.get(f"{base}/offload/tasks/{task_id}").json()["state"] == "SUCCESS"
    # 1.0's notification (an id of null) gets no answer; its errors come in 1.0's form.
    assert pyjamas_call(first, None, "echo", ["unheard"]).status_code == 204
    unknown = pyjamas_call(first, 7, "nope", []).json()
    assert unknown["result"] is None and unknown["error"]["code"] == -32601 and unknown["id"] == 7
