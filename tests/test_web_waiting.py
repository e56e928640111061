"""offload.web.waiting: every web waiter of a task shares one future, holds no
thread under asyncio, and never cancels the task by giving up."""

from __future__ import annotations

import asyncio
import threading

import pytest

from offload.web import waiting
from testapp import webtasks

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def off(_workers):
    return _workers("web_embedded")[0]


def test_many_coroutines_wait_on_one_task_through_the_hub_without_threads(off, tmp_path):
    release = tmp_path / "release"
    fut = off.submit(webtasks.wait_for_file, str(release))
    watching = off.hub.stats().watching

    async def main():
        waiters = [asyncio.ensure_future(waiting.wait_final(off, fut.id, 60)) for _ in range(200)]
        await asyncio.sleep(0)  # let every waiter subscribe
        stats = off.hub.stats()
        # The id was followed already: no new entry (the session's hub may
        # lose an earlier test's entry meanwhile, never gain one here).
        assert stats.watching <= watching
        with off.hub._lock:
            assert len(off.hub._entries[fut.id].subscriptions) >= 201  # the future and 200 waiters
        threads = threading.active_count()
        release.touch()
        snaps = await asyncio.gather(*waiters)
        return snaps, threads

    before = threading.active_count()
    snaps, during = asyncio.run(main())
    assert during <= before + 1  # the hub's thread at most, not one per waiter
    assert {s.result for s in snaps} == {"released"} and all(s.final for s in snaps)
    assert fut.result(timeout=10) == "released"  # the submitter's own future too


def test_a_waiter_that_gives_up_never_revokes(off, tmp_path):
    release = tmp_path / "release"
    fut = off.submit(webtasks.wait_for_file, str(release))

    async def give_up():
        snap = await waiting.wait_final(off, fut.id, 0.2)
        assert not snap.final
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(waiting.wait_final(off, fut.id, 60), 0.2)

    asyncio.run(give_up())
    assert not waiting.wait_final_sync(off, fut.id, 0.1).final
    release.touch()
    assert waiting.wait_final_sync(off, fut.id, 30).result == "released"


def test_follow_sees_progress_then_the_end(off, tmp_path):
    release = tmp_path / "release"
    fut = off.submit(webtasks.wait_for_file, str(release))  # reports progress, then waits

    async def collect():
        seen = []
        async for snap in waiting.follow(off, fut.id):
            seen.append(snap)
            if snap.state == "PROGRESS":
                release.touch()
        return seen

    snaps = asyncio.run(collect())
    assert snaps[-1].state == "SUCCESS" and snaps[-1].result == "released"
    assert any(s.state == "PROGRESS" and s.progress["message"] == "waiting" for s in snaps)
    fut = off.submit(webtasks.steps, 3, 0.05)
    synced = list(waiting.follow_sync(off, fut.id, timeout=60))
    assert synced[-1].result == 3


def test_follow_sync_is_bounded_and_sends_heartbeats(off, tmp_path):
    release = tmp_path / "release"
    fut = off.submit(webtasks.wait_for_file, str(release))
    seen = list(waiting.follow_sync(off, fut.id, timeout=0.5, heartbeat=0.1))
    assert None in seen and not any(s.final for s in seen if s is not None)
    release.touch()
    assert waiting.wait_final_sync(off, fut.id, 30).result == "released"


def subscribers(off, task_id) -> int:
    with off.hub._lock:
        entry = off.hub._entries.get(task_id)
        return len(entry.subscriptions) if entry else 0


def test_follow_is_bounded_sends_heartbeats_and_lets_go_when_cancelled(off, tmp_path):
    release = tmp_path / "release"
    fut = off.submit(webtasks.wait_for_file, str(release))

    async def bounded():
        return [snap async for snap in waiting.follow(off, fut.id, timeout=0.5, heartbeat=0.1)]

    seen = asyncio.run(bounded())
    assert seen.count(None) >= 2 and not any(s.final for s in seen if s is not None)

    async def cancelled():
        before = subscribers(off, fut.id)

        async def read():
            async for _ in waiting.follow(off, fut.id, heartbeat=30):
                pass

        reader = asyncio.ensure_future(read())
        while subscribers(off, fut.id) == before:
            await asyncio.sleep(0.01)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        return before, subscribers(off, fut.id)

    before, after = asyncio.run(cancelled())
    assert after == before  # the follower's subscription went with it; the task runs on
    release.touch()
    assert waiting.wait_final_sync(off, fut.id, 30).result == "released"


def test_failure_snapshot_has_type_and_message(off):
    fut = off.submit(webtasks.fail, "nope")
    snap = waiting.wait_final_sync(off, fut.id, 30)
    assert snap.to_json() == {"id": fut.id, "state": "FAILURE", "error": {"type": "ValueError", "message": "nope"}}
    assert waiting.lookup(off, fut.id) == snap


def test_seed_004_an_async_view_pauses_until_the_task_ends(off):
    """await a task inside a coroutine, with a timeout: its result, or its exception."""

    async def view():
        answer = await asyncio.wait_for(off.submit(webtasks.add, 2, 3), timeout=30)
        try:
            await asyncio.wait_for(off.submit(webtasks.fail, "broken"), timeout=30)
        except ValueError as exc:
            return answer, str(exc)

    assert asyncio.run(view()) == (5, "broken")
