"""A task's state stored in one round trip on Redis (offload.result_store.OneCallStore),
with the rules Celery's own Redis backend keeps, on a real Redis."""

from __future__ import annotations

import logging
import uuid

import pytest
import redis
from celery import states

from conftest import require_service
from offload import Offload
from offload.result_store import REVOKED_BEFORE_START, OneCallStore, store_results

pytestmark = pytest.mark.xdist_group("result-store")

REDIS_URL = "redis://127.0.0.1:6379/11"


@pytest.fixture
def backend(tmp_path):
    require_service("redis")
    off = Offload({"CELERY_BROKER_URL": REDIS_URL, "CELERY_RESULT_EXPIRES": 3600,
                   "CELERY_RESULT_FAILURE_EXPIRES": 60, "OFFLOAD_DATA_DIR": str(tmp_path),
                   "CELERY_START_LOCAL_WORKERS": False})
    return off.celery.backend


def commands(backend, monkeypatch) -> list[str]:
    sent: list[str] = []
    original = backend.client.execute_command

    def counting(*args, **kwargs):
        sent.append(str(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(backend.client, "execute_command", counting)
    return sent


def test_a_redis_backend_stores_in_one_call_and_keeps_celerys_rules(backend, monkeypatch):
    assert isinstance(backend, OneCallStore)
    task_id = f"store-{uuid.uuid4()}"
    sent = commands(backend, monkeypatch)
    backend.store_result(task_id, {"pid": 1}, states.STARTED)
    assert sent == ["EVALSHA"]  # the read, the write and the message, in one round trip
    backend.store_result(task_id, 42, states.SUCCESS)
    # A lost worker's late write leaves the SUCCESS alone, as Celery's own does.
    backend.store_result(task_id, ValueError("late"), states.FAILURE)
    backend.store_result(task_id, {"pid": 2}, states.STARTED)
    meta = backend.get_task_meta(task_id, cache=False)
    assert meta["status"] == states.SUCCESS and meta["result"] == 42 and meta["task_id"] == task_id
    assert 3500 < backend.client.ttl(backend.get_key_for_task(task_id)) <= 3600


def test_a_failure_keeps_result_failure_expires(backend):
    task_id = f"store-{uuid.uuid4()}"
    backend.store_result(task_id, ValueError("boom"), states.FAILURE)
    meta = backend.get_task_meta(task_id, cache=False)
    assert meta["status"] == states.FAILURE and isinstance(meta["result"], ValueError)
    assert 0 < backend.client.ttl(backend.get_key_for_task(task_id)) <= 60


def test_each_store_is_published_under_its_key(backend):
    task_id = f"store-{uuid.uuid4()}"
    pubsub = backend.client.pubsub()
    key = backend.get_key_for_task(task_id).decode()
    pubsub.subscribe(key)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    backend.store_result(task_id, "done", states.SUCCESS)
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert message is not None and backend.decode(message["data"])["result"] == "done"


def test_a_started_over_a_revoked_is_not_written_and_marks_the_request(backend):
    class Request:
        pass

    task_id = f"store-{uuid.uuid4()}"
    backend.store_result(task_id, None, states.REVOKED)
    request = Request()
    backend.store_result(task_id, {"pid": 1}, states.STARTED, request=request)
    assert backend.get_task_meta(task_id, cache=False)["status"] == states.REVOKED
    assert getattr(request, REVOKED_BEFORE_START) is True
    # Any other state is stored over it, as Celery does (a retry, a failure).
    fresh = Request()
    backend.store_result(f"store-{uuid.uuid4()}", {"pid": 1}, states.STARTED, request=fresh)
    assert not hasattr(fresh, REVOKED_BEFORE_START)


def test_a_server_that_refuses_scripts_gets_celerys_way(tmp_path, caplog):
    require_service("redis")
    admin = redis.Redis.from_url(REDIS_URL)
    user, password = f"offload-noscript-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                      commands=["+@all", "-@scripting"])
    try:
        off = Offload({"CELERY_BROKER_URL": f"redis://{user}:{password}@127.0.0.1:6379/11",
                       "OFFLOAD_DATA_DIR": str(tmp_path), "CELERY_START_LOCAL_WORKERS": False})
        backend = off.celery.backend
        caplog.set_level(logging.WARNING, logger="offload.result_store")
        ids = [f"store-{uuid.uuid4()}" for _ in range(3)]
        for task_id in ids:
            backend.store_result(task_id, {"pid": 1}, states.STARTED)
            backend.store_result(task_id, task_id, states.SUCCESS)
        assert [backend.get_task_meta(t, cache=False)["result"] for t in ids] == ids
        # A chunk's results too (offload.result_store.store_results).
        chunk = [f"store-{uuid.uuid4()}" for _ in range(4)]
        store_results(backend, [(t, states.SUCCESS, t, None) for t in chunk[:2]])
        store_results(backend, [(t, states.SUCCESS, t, None) for t in chunk[2:]])
        assert [backend.get_task_meta(t, cache=False)["result"] for t in chunk] == chunk
        refusals = [r.getMessage() for r in caplog.records if "refused the store script" in r.getMessage()]
        assert sum("as Celery does" in m for m in refusals) == 1
        assert sum("with a pipeline" in m for m in refusals) == 1
    finally:
        admin.acl_deluser(user)
