"""offload.Future on real workers: the concurrent.futures contract, and one
shared result watcher per process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time
import uuid

import pytest
from celery.exceptions import TaskRevokedError

from offload import Future, Offload
from offload.dispatch import CHUNK_TASK, chunk_call_ids
from offload.exceptions import ResultBackendLimit, TaskLost
from offload.futures import TaskEvents, wait_event
from offload.hub import LOST, TaskEvent, state_rank
from conftest import wait_until
from testapp import add, calls, crunch, div, noop, sleep_then


def listeners(off, task_id: str) -> int:
    """How many listeners the hub holds for ``task_id`` (0: not followed).

    The hub is the session's, shared with earlier tests in this process that
    may have left tasks of their own behind: count one id, never the total.
    """
    hub = off.hub
    with hub._lock:
        entry = hub._entries.get(task_id)
        return len(entry.subscriptions) if entry else 0




def test_is_a_concurrent_future(off):
    future = off.submit(add, 1, 2)
    assert isinstance(future, concurrent.futures.Future) and isinstance(future, Future)
    assert future.result(timeout=30) == 3
    assert future.id and future.state == "SUCCESS"
    assert off.get(future.id).result(timeout=30) == 3


def test_task_exception_keeps_type_and_message(off):
    future = off.submit(div, 1, 0)
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        future.result(timeout=30)
    assert isinstance(future.exception(timeout=1), ZeroDivisionError)
    assert future.state == "FAILURE"


def test_result_timeout_raises_timeouterror(off):
    future = off.submit(sleep_then, 3)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.2)
    assert time.monotonic() - started < 2
    assert future.result(timeout=30) is None


def test_running_is_true_only_once_started(off):
    # Both pool processes busy: the next task waits, so it cannot have
    # started yet however fast the broker delivers.
    busy = [off.submit(sleep_then, 1.0) for _ in range(2)]
    assert wait_until(lambda: all(f.running() for f in busy), 30)
    blocker = off.submit(sleep_then, 1.5)
    assert not blocker.running() and blocker.state == "PENDING"
    assert wait_until(blocker.running, 30), blocker.state
    assert blocker.state == "STARTED"
    # A running task is never killed by cancel().
    assert blocker.cancel() is False
    assert blocker.result(timeout=30) is None


def test_cancel_revokes_a_task_that_has_not_started(off):
    # Occupy both pool processes, then queue one more behind them.
    busy = [off.submit(sleep_then, 2) for _ in range(2)]
    assert wait_until(lambda: all(f.running() for f in busy), 30)
    queued = off.submit(add, 40, 2)
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(timeout=1)
    for f in busy:
        f.result(timeout=30)
    # The revoked task never ran: Celery records it as REVOKED.
    assert wait_until(lambda: off.celery.AsyncResult(queued.id).state == "REVOKED", 30)


def test_revoked_elsewhere_completes_the_future(off):
    busy = [off.submit(sleep_then, 1.5) for _ in range(2)]
    queued = off.submit(add, 1, 1)
    off.celery.control.revoke(queued.id)
    for f in busy:
        f.result(timeout=30)
    with pytest.raises((concurrent.futures.CancelledError, TaskRevokedError)):
        queued.result(timeout=30)


def test_done_callbacks_fire_without_result_calls(off):
    fired = threading.Event()
    off.submit(add, 1, 1).add_done_callback(lambda fut: fired.set())
    assert fired.wait(30)


def test_wait_and_as_completed(off):
    futures = [off.submit(add, i, 1) for i in range(5)] + [off.submit(div, 1, 0)]
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert not not_done
    first_error = concurrent.futures.wait(
        [off.submit(sleep_then, 5), off.submit(div, 1, 0)], timeout=30,
        return_when=concurrent.futures.FIRST_EXCEPTION)
    assert any(isinstance(f.exception(), ZeroDivisionError) for f in first_error.done)
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures[:5], timeout=30)) == [1, 2, 3, 4, 5]


def test_await(off):
    async def main():
        return await asyncio.gather(off.submit(add, 1, 2), off.submit(add, 3, 4))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == [3, 7]


def test_progress_is_visible_on_the_future(off):
    future = off.submit(crunch, 30, 0.05)
    assert wait_until(lambda: future.progress is not None, 30)
    seen = future.progress
    assert seen["total"] == 30 and seen["message"] == "crunching"
    assert future.running()
    assert future.result(timeout=30) is True
    # Polling backends may miss the last report before SUCCESS overwrites it.
    assert future.progress["message"] in ("crunching", "done")


def test_a_thousand_futures_share_one_watcher_thread(redis_off):
    redis_off.submit(noop).result(timeout=30)  # the watcher thread exists now
    watcher_thread = redis_off.hub._thread
    threads_before = threading.active_count()
    futures = [redis_off.submit(noop) for _ in range(1000)]
    # Unrelated threads (a pool's, a finished test's) may come and go: allow a
    # few, never one per future.
    assert threading.active_count() <= threads_before + 3
    done, not_done = concurrent.futures.wait(futures, timeout=120)
    assert not not_done
    assert threading.active_count() <= threads_before + 3
    # The same single thread served all thousand, and none of them is still
    # followed. (The hub is the session's: an earlier test in this process may
    # have left a task of its own behind, so count only these ids.)
    assert redis_off.hub._thread is watcher_thread and watcher_thread.is_alive()
    assert not any(listeners(redis_off, f.id) for f in futures)


def test_redis_watcher_survives_its_connection_being_killed(redis_off):
    """Redis drops the watcher's pub/sub connection mid-task: it reconnects,
    subscribes again (its own ids and another process's), and misses nothing."""
    import redis

    own = redis_off.submit(sleep_then, 2.0, "own")
    sent = redis_off.celery.send_task("offload.dispatch", args=["testapp:sleep_then", [2.0, "foreign"], {}])
    foreign = redis_off.get(sent.id)
    watcher = redis_off.hub
    assert wait_until(lambda: sent.id in watcher._strategy.channels.values(), timeout=10)
    assert not own.done() and not foreign.done()
    pubsub = watcher._strategy.pubsub
    host, port = pubsub.connection._sock.getsockname()[:2]
    server = redis.Redis.from_url(redis_off.celery.conf.broker_url)
    assert server.client_kill_filter(_type=None, addr=f"{host}:{port}") == 1
    assert own.result(timeout=30) == "own"
    assert foreign.result(timeout=30) == "foreign"
    # A new connection, still the one thread, and it hears new results.
    assert wait_until(lambda: watcher._strategy.pubsub is not pubsub, timeout=10)
    later = redis_off.submit(add, 1, 2)
    assert later.result(timeout=30) == 3
    assert not any(listeners(redis_off, i) for i in (own.id, sent.id, later.id))


def test_get_rejects_a_bad_id(redis_off):
    with pytest.raises(ValueError, match="is not a task id: a task id is 1 to 255 characters"):
        redis_off.get("")
    with pytest.raises(ValueError):
        redis_off.get(None)


class TestRpcBackend:
    """rpc:// replies go to one queue per process, whichever thread submitted."""

    def test_results_errors_and_progress(self, rpc_off):
        assert rpc_off.celery.conf.result_backend == "rpc://"
        assert [f.result(timeout=30) for f in rpc_off.map(add, [[1, 2], [3, 4]])] == [3, 7]
        with pytest.raises(ZeroDivisionError):
            rpc_off.submit(div, 1, 0).result(timeout=30)
        future = rpc_off.submit(crunch, 10, 0.05)
        assert wait_until(lambda: future.progress is not None, 30)
        assert future.result(timeout=30) is True

    def test_submitted_from_another_thread(self, rpc_off):
        results = []
        thread = threading.Thread(target=lambda: results.append(rpc_off.submit(add, 5, 5)))
        thread.start()
        thread.join()
        assert results[0].result(timeout=30) == 10


def test_get_follows_a_task_sent_by_someone_else(off):
    # Not submitted through this Offload (no future, an id of Celery's own).
    sent = off.celery.send_task("offload.dispatch", args=["testapp:add", [20, 22], {}])
    assert off.get(sent.id).result(timeout=30) == 42
    slow = off.celery.send_task("offload.dispatch", args=["testapp:sleep_then", [0.5, "late"], {}])
    future = off.get(slow.id)
    assert future.result(timeout=30) == "late"


# The result hub: many listeners per id ----------------------------------------


class Recorder:
    """A hub listener that keeps every event it is told."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []
        self.threads: set[str] = set()
        self.done = threading.Event()

    def on_event(self, event: TaskEvent) -> None:
        self.events.append(event)
        self.threads.add(threading.current_thread().name)
        if event.ready:
            self.done.set()

    @property
    def states(self) -> list[str]:
        return [e.state for e in self.events]


def test_any_number_of_futures_follow_one_id(off):
    future = off.submit(sleep_then, 1.0, 42)
    first, second = off.get(future.id), off.get(future.id)
    assert [f.result(timeout=30) for f in (future, first, second)] == [42, 42, 42]
    # A late one is answered from the final states the hub keeps.
    assert off.get(future.id).result(timeout=30) == 42
    # The id leaves the hub once its end is delivered (just after the futures see it).
    assert wait_until(lambda: not listeners(off, future.id), 10), off.hub.stats()


def test_a_listener_is_told_every_state_in_order(off, broker):
    future = off.submit(crunch, 4, 0.2)
    recorder = Recorder()
    subscription = off.hub.subscribe(future.id, recorder)
    # Told the latest known state at once, in subscribe() itself: PENDING, or
    # a later state when the worker was quicker than this line.
    assert recorder.events and recorder.states[0] in ("PENDING", "STARTED", "PROGRESS")
    assert recorder.done.wait(30), recorder.states
    assert subscription.closed and future.result(timeout=30) is True
    states = recorder.states
    assert states[-1] == "SUCCESS" and "PROGRESS" in states
    ranks = [state_rank(s) for s in states]
    assert ranks == sorted(ranks), states
    # Each PROGRESS is new (no repeats of an unchanged meta).
    progress = [e.result for e in recorder.events if e.state == "PROGRESS"]
    assert all(a != b for a, b in zip(progress, progress[1:]))
    if broker == "redis":  # pushed: nothing is skipped
        assert "STARTED" in states and len(progress) >= 4


def test_rpc_futures_and_listeners_share_one_reply(rpc_off):
    future = rpc_off.submit(sleep_then, 0.5, "x")
    again = rpc_off.get(future.id)  # its own task: rpc:// can serve it
    recorder = Recorder()
    rpc_off.hub.subscribe(future.id, recorder)
    assert future.result(timeout=30) == again.result(timeout=30) == "x"
    assert recorder.done.wait(30) and recorder.states[-1] == "SUCCESS"


def test_hub_states_never_move_backwards(redis_off):
    task_id = str(uuid.uuid4())  # nobody runs it: the hub is fed by hand
    future = redis_off.get(task_id)
    recorder = Recorder()
    redis_off.hub.subscribe(task_id, recorder)
    hub = redis_off.hub
    assert hub.deliver(task_id, {"status": "STARTED", "result": {"pid": 1}})
    assert hub.deliver(task_id, {"status": "PROGRESS", "result": {"current": 1}})
    assert not hub.deliver(task_id, {"status": "PROGRESS", "result": {"current": 1}})
    assert not hub.deliver(task_id, {"status": "RECEIVED"})
    assert hub.deliver(task_id, {"status": "SUCCESS", "result": 7})
    assert not hub.deliver(task_id, {"status": "STARTED", "result": {"pid": 1}})
    assert recorder.states == ["PENDING", "STARTED", "PROGRESS", "SUCCESS"]
    assert future.result(timeout=1) == 7 and future.state == "SUCCESS"
    # The future itself ignores an older state handed to it directly.
    future.on_event(TaskEvent(task_id, "STARTED"))
    assert future.state == "SUCCESS"


# Waiting never cancels; cancel() is persisted -------------------------------------


def _occupy_both_pool_processes(off, gate):
    """Two calls that hold the worker's two processes until ``gate`` opens."""
    busy = [off.submit(calls.gated, gate) for _ in range(2)]
    assert wait_until(lambda: all(f.running() for f in busy), 30)
    return busy


def _release(gate, busy):
    open(gate, "w").close()
    for f in busy:
        f.result(timeout=30)


def test_an_await_that_times_out_does_not_revoke(off, gate):
    busy = _occupy_both_pool_processes(off, gate)
    queued = off.submit(add, 40, 2)

    async def give_up():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(queued, 0.2)
        # A coroutine cancelled while it awaits (a client that went away).
        waiter = asyncio.ensure_future(_await(queued))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(give_up())
    assert not queued.cancelled()
    _release(gate, busy)
    assert queued.result(timeout=30) == 42


async def _await(future):
    return await future


def test_await_gives_the_result_or_the_error(off):
    async def main():
        ok = await off.submit(add, 1, 2)
        with pytest.raises(ZeroDivisionError):
            await off.submit(div, 1, 0)
        return ok

    assert asyncio.run(main()) == 3


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_cancel_is_kept_for_a_worker_that_starts_later(kind, _workers, data_root):
    """Revoked while no worker consumes the queue: a worker started afterwards skips it."""
    from conftest import WorkerProcess, require_service
    from testapp import test_id

    if kind == "redis":
        require_service("redis")
    off = _workers(kind)[0]
    queue = f"hub-later-{uuid.uuid4().hex[:8]}"
    queued = off.options(queue=queue).submit(sleep_then, 0, "ran")
    assert queued.cancel() is True
    assert queued.cancelled() and queued.state == "REVOKED"
    assert off.celery.AsyncResult(queued.id).state == "REVOKED"
    worker = WorkerProcess(f"testapp.on_{kind}", f"later-{kind}-{test_id()}@%h",
                           data_root / f"worker-later-{kind}.log", concurrency=1, queues=queue)
    try:
        # One process, prefetch 1, late acks: the marker runs after the
        # revoked message was dealt with.
        marker = off.options(queue=queue).submit(add, 1, 1)
        assert marker.result(timeout=60) == 2, worker.log_tail()
        assert wait_until(lambda: "Discarding revoked task" in worker.log_tail(200)
                          and queued.id in worker.log_tail(200), timeout=10), worker.log_tail()
    finally:
        worker.stop()
    assert off.celery.AsyncResult(queued.id).state == "REVOKED"
    with pytest.raises((concurrent.futures.CancelledError, TaskRevokedError)):
        off.get(queued.id).result(timeout=30)


def test_cancel_on_rpc_says_it_cannot_be_kept(rpc_off):
    queue = f"hub-rpc-{uuid.uuid4().hex[:8]}"
    queued = rpc_off.options(queue=queue).submit(add, 1, 1)
    # rpc:// stores nothing a later worker could read: the honest answer.
    assert queued.cancel() is False
    assert not queued.cancelled() and queued.state == "PENDING"
    queued.unfollow()
    assert _queue_length(rpc_off, queue) == 1  # still there, not revoked


def test_a_cancelled_future_counts_as_done_for_wait(off, gate):
    busy = _occupy_both_pool_processes(off, gate)
    queued = off.submit(add, 1, 1)
    assert queued.cancel() is True
    done, not_done = concurrent.futures.wait([queued], timeout=5)
    assert done == {queued} and not not_done
    assert list(concurrent.futures.as_completed([queued], timeout=5)) == [queued]

    async def awaited():
        with pytest.raises(asyncio.CancelledError):
            await queued

    asyncio.run(awaited())
    _release(gate, busy)


# asyncio adapter: long-poll and event streams --------------------------------------


def test_awaiting_a_future_long_polls_and_events_stream(off):
    future = off.submit(crunch, 3, 0.3)

    async def main():
        follower = off.get(future.id)  # a task known by its id, as a web view has it
        try:
            await asyncio.wait_for(follower, 0.05)
            timed_out = False
        except asyncio.TimeoutError:
            timed_out = True
        first_state = follower.state
        final = await asyncio.wait_for(off.get(future.id), 30)
        streamed = []
        async with TaskEvents(off.hub, future.id) as events:
            async for event in events:
                streamed.append(event)
        return timed_out, first_state, final, follower.done(), streamed

    timed_out, first_state, final, follower_done, streamed = asyncio.run(main())
    assert timed_out and first_state in ("PENDING", "STARTED", "PROGRESS")  # the task untouched
    assert final is True and follower_done  # the future that timed out still completed
    # Subscribed after the end: the final state at once, then the end.
    assert [e.state for e in streamed] == ["SUCCESS"]
    assert future.result(timeout=1) is True


def test_wait_event_is_a_deprecated_second_way_to_wait_that_still_works(off):
    future = off.submit(crunch, 3, 0.3)

    async def main():
        with pytest.warns(DeprecationWarning, match=r"wait_event\(\) is deprecated.*asyncio.wait_for"):
            first = await wait_event(off.hub, future.id, timeout=0.05)
        with pytest.warns(DeprecationWarning, match=r"wait_event\(\) is deprecated"):
            final = await wait_event(off.hub, future.id, timeout=30)
        async with TaskEvents(off.hub, future.id) as events:
            with pytest.warns(DeprecationWarning, match=r"TaskEvents.wait_ready\(\) is deprecated"):
                again = await events.wait_ready(1)
        return first, final, again

    first, final, again = asyncio.run(main())
    assert not first.ready  # the timeout passed: the latest state, task untouched
    assert final.ready and final.state == "SUCCESS" and final.result is True
    assert again.state == "SUCCESS"
    assert future.result(timeout=1) is True


def test_event_stream_sees_progress_and_leaving_it_leaves_the_task(off):
    future = off.submit(crunch, 20, 0.1)

    async def follow_a_little():
        seen = []
        async with TaskEvents(off.hub, future.id) as events:
            async for event in events:
                seen.append(event.state)
                if event.state == "PROGRESS":
                    break
        return seen

    seen = asyncio.run(follow_a_little())
    assert seen[0] in ("PENDING", "STARTED", "PROGRESS") and seen[-1] == "PROGRESS"
    assert future.result(timeout=30) is True and not future.cancelled()


# Bounded ----------------------------------------------------------------------------


@pytest.fixture
def embedded_off(_workers):
    return _workers("embedded")[0]


def test_an_unchanged_progress_task_lets_the_poll_back_off(embedded_off):
    """One task sitting in PROGRESS: the batched poll backs off (it used to
    stay at 2 ms, about 450 backend reads per second)."""
    hub = embedded_off.hub
    future = embedded_off.submit(crunch, 1, 3.0)  # one report, then 3 s unchanged
    assert wait_until(lambda: future.progress is not None, 30)
    reads, started = hub.stats().reads, time.monotonic()
    assert future.result(timeout=30) is True
    rate = (hub.stats().reads - reads) / (time.monotonic() - started)
    print(f"backend reads per second, one PROGRESS task: {rate:.1f}")
    # At the 250 ms ceiling about 4 reads/s; the first steps of the back-off add a few.
    assert rate < 40, rate


def test_a_burst_of_submits_wakes_no_reader_of_the_embedded_results(tmp_path):
    """Ids handed out for submits can only hear of their task through the
    results file's change feed, whose writers poke the reader: each submit
    of a burst used to wake the hub's thread for a read of its own."""
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path), "OFFLOAD_ALLOW": ["testapp"],
                   "CELERY_TASK_DEFAULT_QUEUE": f"burst-{uuid.uuid4().hex[:8]}"})  # no worker
    hub = off.hub
    first = off.submit(noop)
    assert wait_until(lambda: hub.stats().reads >= 2, 10)  # the feed knows its position
    assert wait_until(lambda: not hub.wakeup.is_set(), 10)
    reads = hub.stats().reads
    futures = [off.submit(noop) for _ in range(300)]
    burst = hub.stats().reads - reads
    assert burst < 50, burst  # a few polls backing off, not one read per submit
    # Nothing is missed for it: a result stored now reaches its future.
    off.celery.backend.store_result(futures[-1].id, 7, "SUCCESS")
    assert futures[-1].result(timeout=10) == 7
    assert not first.done()


def test_a_future_is_light_for_the_garbage_collector_and_still_a_concurrent_future():
    """A map of 5,000 calls made 15 objects per future for the cyclic
    collector (a Condition with its bound methods, locks, lists), and the
    collections took a third of the time map spent sending."""
    import gc

    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        before = len(gc.get_objects())
        futures = [Future(f"light-{index}") for index in range(1000)]
        per_future = (len(gc.get_objects()) - before - 1) / len(futures)
    finally:
        if gc_was_on:
            gc.enable()
    assert per_future <= 4, per_future
    # Every field of the base class's own is set (a Python that adds one
    # fails here, not in a user's wait()).
    assert set(vars(concurrent.futures.Future())) - {"_condition"} <= set(vars(futures[0]))
    import concurrent.futures._base as base

    from offload import futures as module

    assert (module._PENDING, module._RUNNING, module._FINISHED) == (base.PENDING, base.RUNNING, base.FINISHED)
    assert module._CANCELLED_STATES == {base.CANCELLED, base.CANCELLED_AND_NOTIFIED}
    # Ended while nobody waited: no Condition was made for it.
    futures[5].set_result(6)
    assert futures[5].result() == 6 and futures[5].done() and "_made_condition" not in vars(futures[5])
    with pytest.raises(concurrent.futures.InvalidStateError):
        futures[5].set_result(7)
    # A waiter in another thread makes it, and is woken by the end.
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(futures[6].result(timeout=10)))
    waiter.start()
    assert wait_until(lambda: "_made_condition" in vars(futures[6]), 10)
    futures[6].set_result(7)
    waiter.join(10)
    assert got == [7]
    # The base class's API, its lock made when first needed.
    futures[0].set_result(1)
    futures[1].set_exception(ValueError("no"))
    assert futures[2].cancel() and futures[3].set_running_or_notify_cancel()
    done, not_done = concurrent.futures.wait(futures[:4], timeout=0)
    assert done == set(futures[:3]) and not_done == {futures[3]}
    finisher = threading.Timer(0.05, futures[3].set_result, (4,))
    finisher.start()
    assert [future.result() for future in concurrent.futures.as_completed(futures[3:4], timeout=10)] == [4]
    seen: list[int] = []
    futures[4].add_done_callback(lambda future: seen.append(future.result()))
    futures[4]._finish(5)  # no hub: the callback runs in the finishing thread
    assert seen == [5]
    assert "finished returned int" in concurrent.futures.Future.__repr__(futures[0])


def test_a_callback_that_cancels_another_future_does_not_hang():
    """Futures share one lock for a cancel's race with the hub; a hub-less
    future runs its callbacks inline, and one may cancel another future."""
    first, second = Future("cancel-first"), Future("cancel-second")
    first.add_done_callback(lambda _future: second.cancel())
    canceller = threading.Thread(target=first.cancel, daemon=True)
    canceller.start()
    canceller.join(10)
    assert not canceller.is_alive()
    assert first.cancelled() and second.cancelled()
    assert concurrent.futures.wait([first, second], timeout=0).not_done == set()


def test_the_embedded_results_wake_the_hubs_own_thread(tmp_path):
    """The hub's thread sleeps on the socket the results file's writers
    poke, and a subscription's wake-up pokes that socket too: no thread of
    its own stands between a write and the read."""
    from offload.delivery.interface import Wakeup
    from offload.transport.wakeup import Waker

    waker, wakeup = Waker(), Wakeup()
    try:
        wakeup.attach(waker.poke)
        wakeup.set()
        assert wakeup.is_set() and waker.wait(0)
        wakeup.clear()
        wakeup.attach(None)
        wakeup.set()
        assert not waker.wait(0)
    finally:
        waker.close()

    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path), "OFFLOAD_ALLOW": ["testapp"],
                   "CELERY_TASK_DEFAULT_QUEUE": f"feed-{uuid.uuid4().hex[:8]}"})  # no worker
    hub = off.hub

    def result_threads() -> list[str]:
        return sorted(thread.name for thread in threading.enumerate() if thread.name.startswith("offload-result"))

    before = result_threads()  # other tests' hubs
    future = off.submit(noop)
    assert wait_until(lambda: hub.stats().reads >= 2, 10)
    assert result_threads() == sorted([*before, "offload-result-hub"])
    # A write by another connection (a worker's) reaches the future; so
    # does one of an id subscribed later, which wakes the thread itself.
    writer = off.celery.backend  # this thread's: the hub's thread has its own
    writer.store_result(future.id, 5, "SUCCESS")
    assert future.result(timeout=10) == 5
    later = f"later-{uuid.uuid4()}"
    writer.store_result(later, 6, "SUCCESS")
    assert off.get(later).result(timeout=10) == 6


def test_an_id_nothing_is_heard_of_leaves_the_hub(off):
    hub = off.hub
    hub.pending_limit = 0.5
    try:
        lost = off.get(str(uuid.uuid4()))
        assert listeners(off, lost.id) == 1
        assert isinstance(lost.exception(timeout=30), TaskLost)
        assert lost.state == LOST
    finally:
        hub.pending_limit = None
    assert wait_until(lambda: not listeners(off, lost.id), 10)
    # A task that runs is not lost for waiting longer than nothing.
    assert off.submit(add, 1, 2).result(timeout=30) == 3


def test_an_id_leaves_the_hub_with_its_last_listener(off):
    unknown = str(uuid.uuid4())
    futures = [off.get(unknown), off.get(unknown)]
    assert listeners(off, unknown) == 2
    futures[0].unfollow()
    assert listeners(off, unknown) == 1
    futures[1].unfollow()
    assert listeners(off, unknown) == 0 and not off.hub.knows(unknown)
    assert not futures[0].done()


def test_ignore_result_tasks_are_not_followed(off):
    future = off.options(ignore_result=True).submit(add, 1, 2)
    assert listeners(off, future.id) == 0


def test_what_the_hub_holds_stays_bounded_under_steady_load(embedded_off):
    hub = embedded_off.hub
    long = embedded_off.submit(sleep_then, 2.0)  # keeps the hub busy throughout
    futures = [embedded_off.submit(noop) for _ in range(300)]
    done, not_done = concurrent.futures.wait(futures, timeout=120)
    assert not not_done
    assert long.result(timeout=30) is None
    assert not any(listeners(embedded_off, f.id) for f in [long, *futures])
    assert hub.stats().recent <= hub.RECENT_LIMIT


# Registered before publish -------------------------------------------------------------


def test_the_future_listens_before_its_message_leaves(off):
    from celery.signals import before_task_publish

    known = []

    def check(sender=None, headers=None, body=None, **kwargs):
        if sender == CHUNK_TASK:  # map's chunks: the calls' ids come from the chunk's own
            known.extend(off.hub.knows(call_id) for call_id in chunk_call_ids(headers["id"], len(body[0][1])))
        else:
            known.append(off.hub.knows(headers["id"]))

    before_task_publish.connect(check, weak=False)
    try:
        futures = [off.submit(add, 1, 1)] + off.map(add, [[2, 2], [3, 3]])
    finally:
        before_task_publish.disconnect(check)
    assert known == [True, True, True]
    assert [f.result(timeout=30) for f in futures] == [2, 4, 6]


def test_rpc_get_of_another_process_task_says_which_backend_to_use(rpc_off):
    with pytest.raises(ResultBackendLimit, match=r"rpc://.*CELERY_RESULT_BACKEND='redis://"):
        rpc_off.get(str(uuid.uuid4()))


# Callbacks and fork -----------------------------------------------------------------------


def test_a_blocking_done_callback_stalls_no_other_future(off):
    gate = threading.Event()
    threads = []
    first = off.submit(add, 1, 1)

    def blocks(fut):
        threads.append(threading.current_thread().name)
        gate.wait(60)

    first.add_done_callback(blocks)
    assert first.result(timeout=30) == 2
    assert wait_until(lambda: threads, 10)
    later = off.submit(add, 2, 2)
    chained = []
    waits_on_other = off.submit(add, 3, 3)
    waits_on_other.add_done_callback(lambda fut: chained.append(off.submit(add, 4, 4).result(timeout=30)))
    try:
        assert later.result(timeout=30) == 4
        assert waits_on_other.result(timeout=30) == 6
        assert wait_until(lambda: chained == [8], 30)
    finally:
        gate.set()
    assert threads and not threads[0].startswith("offload-result-hub")


def test_a_forked_child_submits_and_waits(off):
    assert off.submit(add, 1, 1).result(timeout=30) == 2  # the hub thread runs
    pending = off.submit(sleep_then, 0.5, "inherited")
    pid = os.fork()
    if pid == 0:  # the child: a fresh hub thread and connection
        code = 1
        try:
            ok = off.submit(add, 2, 3).result(timeout=30) == 5
            ok = ok and pending.result(timeout=30) == "inherited"
            code = 0 if ok else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    status = []
    assert wait_until(lambda: status.append(os.waitpid(pid, os.WNOHANG)) or status[-1][0] == pid, 60)
    assert os.waitstatus_to_exitcode(status[-1][1]) == 0
    assert pending.result(timeout=30) == "inherited"
    assert off.submit(add, 3, 4).result(timeout=30) == 7


GUNICORN_APP = '''
import os
from testapp import add, sleep_then
from testapp.on_{kind} import off

# In the master, before the fork (--preload): the hub thread starts here,
# and one future is still outstanding when the workers are forked.
assert off.submit(add, 1, 2).result(timeout=60) == 3
inherited = off.submit(sleep_then, 1.0, "from the master")


def app(environ, start_response):
    value = off.submit(add, 2, 3).result(timeout=30)
    assert inherited.result(timeout=30) == "from the master"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%s %s" % (value, os.getpid())).encode()]
'''


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_gunicorn_preload_workers_submit_after_the_master_did(kind, _workers, tmp_path):
    import subprocess
    import sys
    import urllib.request

    from conftest import require_service, worker_env

    if kind == "redis":
        require_service("redis")
    _workers(kind)  # the Celery worker serving testapp.on_<kind>
    (tmp_path / "preloaded.py").write_text(GUNICORN_APP.format(kind=kind))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = worker_env({"PYTHONPATH": os.pathsep.join([str(tmp_path), worker_env()["PYTHONPATH"]])})
    log = open(tmp_path / "gunicorn.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "-b", f"127.0.0.1:{port}",
         "--timeout", "60", "preloaded:app"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def answers():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=40) as response:
                    return response.read().decode()
            except OSError:
                return None

        assert wait_until(lambda: answers() is not None, 60), (tmp_path / "gunicorn.log").read_text()
        bodies = [answers() for _ in range(8)]
        assert all(body and body.split()[0] == "5" for body in bodies), bodies
    finally:
        server.terminate()
        server.wait(30)
        log.close()


# map --------------------------------------------------------------------------------------


def test_map_sends_nothing_when_an_item_cannot_be_encoded(off):
    queue = f"hub-map-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    with pytest.raises(TypeError, match=r"item 1 of map\('add', \.\.\.\).*nothing was sent"):
        off.options(queue=queue).map(add, [[1, 2], [object(), 1], [3, 4]])
    assert _queue_length(off, queue) == 0


def _queue_length(off, queue: str) -> int:
    """Messages waiting in ``queue`` (0 if it was never declared); deletes it."""
    with off.celery.connection_for_write() as conn:
        channel = conn.channel()
        try:
            length = channel.queue_declare(queue=queue, passive=True).message_count
        except Exception:  # not declared: nothing was ever published to it
            return 0
        channel.queue_delete(queue)
        return length


def test_the_library_contract_future_relies_on():
    """Future uses only public concurrent.futures API, but relies on these
    documented behaviours: if one changes, this fails."""
    base = concurrent.futures.Future()
    assert base.cancel() is True
    # wait() counts a cancelled future as done only once notified.
    assert concurrent.futures.wait([base], timeout=0).not_done == {base}
    assert base.set_running_or_notify_cancel() is False
    assert concurrent.futures.wait([base], timeout=0).done == {base}
    order = []
    other = concurrent.futures.Future()
    other.add_done_callback(lambda f: order.append("first"))
    other.set_result(1)
    other.add_done_callback(lambda f: order.append("at once"))
    assert order == ["first", "at once"]


def test_a_hub_on_a_dead_backend_logs_the_outage_once_then_backs_off(tmp_path, caplog):
    """A result store that stays down: one warning for the outage (the
    traceback only at debug level), the retries at debug level, and they slow
    down instead of spinning."""
    import logging

    from conftest import closed_port
    from offload import Offload

    # A port of this test's own: other tests' hubs on other dead ports may
    # retry in this process too, and their lines must not mix with these.
    port = closed_port()
    dead = Offload({"CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0", "OFFLOAD_DATA_DIR": str(tmp_path)})
    caplog.set_level(logging.DEBUG, logger="offload.hub")
    future = dead.get(str(uuid.uuid4()))
    try:
        def retries():
            # This hub's only: other tests' hubs on dead ports may retry in this process too.
            return [r for r in caplog.records if r.name == "offload.hub" and "still unreachable" in r.getMessage()
                    and f"127.0.0.1:{port}." in r.getMessage()]

        assert wait_until(lambda: len(retries()) >= 3, 30), caplog.text
        # Only this hub's (other tests' hubs may log in this process too).
        warnings = [r for r in caplog.records if r.name == "offload.hub" and r.levelno >= logging.WARNING
                    and f"127.0.0.1:{port}/" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert f"redis://127.0.0.1:{port}/0 is unreachable" in warnings[0].getMessage()
        assert warnings[0].exc_info is None
        assert all(r.levelno == logging.DEBUG for r in retries())
        records = retries()
        gaps = [b.created - a.created for a, b in zip(records, records[1:3])]
        assert gaps[1] > gaps[0], gaps  # backing off
    finally:
        future.unfollow()


def test_a_loop_inbox_wakes_its_loop_once_for_a_burst():
    # Many calls handed over from another thread while the loop is busy run
    # in order, in one callback of the loop: one wake-up, not one per call.
    from offload.futures import loop_inbox

    async def main():
        loop = asyncio.get_running_loop()
        inbox = loop_inbox(loop)
        assert loop_inbox(loop) is inbox
        wakeups = []
        real = loop.call_soon_threadsafe

        def counting(*args):
            wakeups.append(args)
            return real(*args)

        loop.call_soon_threadsafe = counting
        ran = []
        sender = threading.Thread(target=lambda: [inbox.call(ran.append, i) for i in range(1000)])
        sender.start()
        sender.join()  # the loop is blocked meanwhile: everything piles up
        assert ran == []
        for _ in range(3):
            await asyncio.sleep(0)
        return ran, len(wakeups)

    ran, wakeups = asyncio.run(main())
    assert ran == list(range(1000)) and wakeups == 1


def test_a_loop_inbox_of_a_closed_loop_refuses_calls():
    from offload.futures import loop_inbox

    loop = asyncio.new_event_loop()
    inbox = loop_inbox(loop)
    loop.close()
    assert inbox.call(print, "never") is False


# The Redis hub's reading of result messages ----------------------------------------


def test_the_redis_hub_decodes_every_result_as_celery_does(redis_off):
    import datetime
    import decimal

    from celery.backends.base import compress_payload
    from offload.delivery.redis_push import RedisPush as _RedisPush

    backend = redis_off.celery.backend
    push = _RedisPush(backend)
    metas = [
        {"status": "SUCCESS", "result": {"a": [1, 2.5, None, "é"]}, "task_id": "t1"},
        {"status": "SUCCESS", "result": {"when": datetime.datetime(2026, 11, 24, 1, 2, 3),
                                         "amount": decimal.Decimal("1.10")}, "task_id": "t2"},
        {"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad"],
                                         "exc_module": "builtins"}, "task_id": "t3"},
        {"status": "STARTED", "result": {"pid": 1, "hostname": "h"}, "task_id": "t4"},
    ]
    for meta in metas:
        payload = backend.encode(meta)
        payload = payload.encode() if isinstance(payload, str) else payload
        for data in (payload, compress_payload(payload, "zlib")):
            mine, celerys = push._decode(data), backend.decode_result(data)
            assert type(mine["result"]) is type(celerys["result"])
            assert repr(mine) == repr(celerys)
        # Whitespace around the document, as another client might write it.
        padded = (payload.decode() + " \n").encode()
        assert repr(push._decode(padded)) == repr(backend.decode_result(padded))
    for broken in (b'{"status": "SUCCESS"} trailing', b'{"status": "SUCC', b'{"status": "\xff"}'):
        assert push._decode(broken) is None  # skipped with a warning, as json.loads would refuse it


def test_an_unreadable_result_message_is_skipped_and_the_stream_goes_on(redis_off):
    import redis

    future = redis_off.submit(sleep_then, 0.5, "after")
    channel = bytes(redis_off.celery.backend.get_key_for_task(future.id))
    client = redis.Redis.from_url(redis_off.celery.conf.broker_url)
    assert wait_until(lambda: client.publish(channel, b"\xff not json {") >= 1, 10)
    assert future.result(timeout=30) == "after"
