"""Marks of tasks the web task API may show (offload/exposure.py), on each
kind of result backend: key-value (the embedded store, Redis), a database
(PostgreSQL), none (rpc://: this process only)."""

from __future__ import annotations

import uuid

import pytest

from conftest import require_service
from offload import Offload, TaskError
from offload.exceptions import ConfigurationError
from offload.exposure import Exposures
from offload.web import TaskAPI
from testapp import xdist_index


class Refused(TaskError):
    pass


def backends(tmp_path) -> dict[str, dict]:
    return {
        "embedded": {},
        "redis": {"CELERY_BROKER_URL": f"redis://127.0.0.1:6379/{1 + xdist_index() % 15}"},
        "postgresql": {"CELERY_BROKER_URL": "sqlite://", "CELERY_RESULT_BACKEND":
                       "db+postgresql+psycopg://127.0.0.1/test"},
    }


@pytest.mark.parametrize("kind", ["embedded", "redis", "postgresql"])
def test_a_mark_is_read_by_another_process_on_each_backend(kind, tmp_path):
    if kind == "redis":
        require_service("redis")
    if kind == "postgresql":
        pytest.importorskip("sqlalchemy")
        pytest.importorskip("psycopg")
    config = {"OFFLOAD_DATA_DIR": str(tmp_path), **backends(tmp_path)[kind]}
    sender = Offload(config)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    sender.exposures.mark(ids, "myapp.tasks.crunch", (ValueError,))
    # Another process has its own Offload: nothing in memory, the backend only.
    reader = Exposures(lambda: Offload(config).celery.backend)
    for task_id in ids:
        exposure = reader.find(task_id)
        assert exposure is not None and exposure.name == "myapp.tasks.crunch"
        assert exposure.is_public(ValueError("shown")) and exposure.is_public(Refused("shown"))
        assert not exposure.is_public(RuntimeError("hidden"))
    assert reader.find(str(uuid.uuid4())) is None
    assert reader.find(ids[0]) is reader.known(ids[0])  # remembered once read
    # Many at once (one read where the backend reads many keys), unknown ids as None.
    unknown = str(uuid.uuid4())
    many = Exposures(lambda: Offload(config).celery.backend).find_many([*ids, unknown])
    assert [many[task_id].name for task_id in ids] == ["myapp.tasks.crunch"] * 3  # type: ignore[union-attr]
    assert many[unknown] is None


def test_asgi_lookups_of_many_requests_share_one_worker_thread(tmp_path):
    """Requests arriving together for tasks this process has not seen read their marks together.

    A thread-pool call per lookup started a worker thread for each request
    waiting on one (up to anyio's 40): the thread count grew with the load.
    """
    import asyncio
    import threading

    import httpx

    config = {"OFFLOAD_DATA_DIR": str(tmp_path)}
    sender = Offload(config)
    ids = [str(uuid.uuid4()) for _ in range(300)]
    sender.exposures.mark(ids, "myapp.tasks.crunch")
    backend = sender.celery.backend
    for number, task_id in enumerate(ids):
        backend.store_result(task_id, number, "SUCCESS")
    api = TaskAPI(Offload(config), prefix="/offload")  # a web process of its own: nothing in memory

    async def main() -> tuple[list[httpx.Response], int]:
        peak = threading.active_count()
        transport = httpx.ASGITransport(app=api.asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            requests = asyncio.gather(*(client.get(f"/offload/tasks/{task_id}", params={"wait": 30})
                                        for task_id in ids))
            while not requests.done():
                peak = max(peak, threading.active_count())
                await asyncio.sleep(0.001)
            return requests.result(), peak

    before = threading.active_count()
    answers, peak = asyncio.run(main())
    assert [answer.json().get("result") for answer in answers] == list(range(300))
    assert peak - before <= 3  # the hub's thread, one worker thread (and the hub's callbacks at most)


def test_the_task_api_refuses_a_backend_that_keeps_no_results(tmp_path):
    off = Offload({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
                   "CELERY_RESULT_BACKEND": "rpc://", "OFFLOAD_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigurationError, match="CELERY_RESULT_BACKEND"):
        TaskAPI(off)
    # With nothing set, RabbitMQ's result backend is the embedded store: served.
    default = Offload({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "OFFLOAD_DATA_DIR": str(tmp_path)})
    assert default.celery.conf.result_backend.startswith("sqlite://")
    TaskAPI(default)
