"""examples/async_wait (seed 004) under uvicorn: a view that times out cancels
its task, so timed-out requests leave nothing queued behind them."""

from __future__ import annotations

import concurrent.futures
import re

import pytest

from conftest import wait_until
from test_web_examples import async_wait_app

pytestmark = pytest.mark.timeout(240)

REQUESTS = 8


def test_timed_out_requests_cancel_their_tasks_and_leave_none_queued(tmp_path):
    from offload import Offload

    with async_wait_app(tmp_path) as c:
        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
            pages = list(pool.map(lambda _: c.get("/slow", params={"seconds": 2, "timeout": 0.3}),
                                  range(REQUESTS)))
        assert [page.status_code for page in pages] == [504] * REQUESTS
        ids = [re.search(r"from task ([0-9a-f-]{36})", page.text).group(1) for page in pages]
        cancelled = [i for i, page in zip(ids, pages) if "it was cancelled" in page.text]
        # One local worker runs as many tasks at once as it has pool processes (2 here).
        assert len(cancelled) >= REQUESTS - 2, [page.text for page in pages]

        def states() -> list[str]:
            return [c.get(f"/offload/tasks/{task_id}").json()["state"] for task_id in ids]

        assert wait_until(lambda: set(states()) <= {"REVOKED", "SUCCESS"}, timeout=60), states()
        final = dict(zip(ids, states()))
        assert all(final[task_id] == "REVOKED" for task_id in cancelled), final

        # Nothing left in the queue for the worker to get to later.
        off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path)})

        def queued() -> int:
            with off.celery.connection_for_read() as connection:
                return connection.default_channel.queue_declare("celery", passive=True).message_count

        assert wait_until(lambda: queued() == 0, timeout=30), queued()
