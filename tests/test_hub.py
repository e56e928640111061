"""The result hub itself (offload/hub.py) and its delivery strategies (offload/delivery/).

Listeners of the session's Offloads, whose real workers run the tasks on each
broker; the hub hears of them through the strategy its result backend calls for.
"""

from __future__ import annotations

import threading
import uuid

from offload.delivery import ChangeFeed, RedisPush, RpcPush, strategy_for
from offload.hub import LOST, ResultHub, TaskEvent, state_rank
from testapp import add, calls


class Recorder:
    """A listener that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []
        self.ended = threading.Event()

    def on_event(self, event: TaskEvent) -> None:
        self.events.append(event)
        if event.ready:
            self.ended.set()


def test_several_listeners_on_one_id_each_hear_every_state_once_in_order(off, gate):
    future = off.submit(calls.gated, gate, 7)
    recorders = [Recorder() for _ in range(3)]
    subscriptions = [off.hub.subscribe(future.id, recorder) for recorder in recorders]
    # Each was told the latest known state at once.
    assert all(recorder.events for recorder in recorders)
    open(gate, "w").close()
    for recorder in recorders:
        assert recorder.ended.wait(60), recorder.events
    for recorder in recorders:
        ranks = [state_rank(event.state) for event in recorder.events]
        assert ranks == sorted(ranks), recorder.events
        assert recorder.events[-1] == TaskEvent(future.id, "SUCCESS", 7)
        assert [event for event in recorder.events if event.ready] == [recorder.events[-1]]
    assert all(subscription.closed for subscription in subscriptions)


def test_a_listener_that_gives_up_hears_nothing_more_and_the_others_go_on(off, gate):
    future = off.submit(calls.gated, gate, "done")
    quitter, stayer = Recorder(), Recorder()
    leaving = off.hub.subscribe(future.id, quitter)
    staying = off.hub.subscribe(future.id, stayer)
    leaving.close()
    heard = len(quitter.events)
    open(gate, "w").close()
    assert stayer.ended.wait(60), stayer.events
    assert stayer.events[-1].result == "done"
    assert len(quitter.events) == heard and not quitter.ended.is_set()
    assert leaving.closed and staying.closed
    leaving.close()  # idempotent


def test_a_late_listener_is_told_the_end_at_once(off):
    future = off.submit(add, 2, 3)
    assert future.result(timeout=60) == 5
    late = Recorder()
    subscription = off.hub.subscribe(future.id, late)
    # Before subscribe returned: the final state, and the subscription closed.
    assert late.events == [TaskEvent(future.id, "SUCCESS", 5)]
    assert subscription.closed


def test_an_id_nothing_is_heard_of_is_told_lost_after_the_pending_limit(off):
    hub = ResultHub(lambda: off.celery.backend)
    hub.pending_limit = 0.2
    recorder = Recorder()
    subscription = hub.subscribe(f"never-sent-{uuid.uuid4()}", recorder)
    assert recorder.ended.wait(30), recorder.events
    assert recorder.events[-1].state == LOST
    assert subscription.closed and hub.stats().watching == 0


def test_a_result_stored_before_anyone_followed_it_is_found(off):
    # Not through the hub's memory of recent ends: a hub of its own, and a
    # result written straight into the backend, as another process would.
    backend = off.celery.backend
    stored, later = f"stored-{uuid.uuid4()}", f"later-{uuid.uuid4()}"
    backend.store_result(stored, 11, "SUCCESS")
    hub = ResultHub(lambda: off.celery.backend)
    first, second = Recorder(), Recorder()
    hub.subscribe(stored, first)
    assert first.ended.wait(30), first.events
    hub.subscribe(later, second)  # the hub is reading by now
    backend.store_result(later, 12, "SUCCESS")
    assert second.ended.wait(30), second.events
    assert (first.events[-1].result, second.events[-1].result) == (11, 12)


def test_the_strategy_follows_the_result_backend(off, broker):
    strategy = strategy_for(off.celery.backend)
    try:
        # The embedded store's changes are read as they come; Redis publishes (the RabbitMQ tests store results there).
        assert isinstance(strategy, ChangeFeed if broker == "embedded" else RedisPush)
        assert "task_id" in strategy.submit_options()
    finally:
        strategy.reset()


def test_rpc_results_come_back_to_one_reply_queue_per_process(rpc_off):
    strategy = strategy_for(rpc_off.celery.backend)
    try:
        assert isinstance(strategy, RpcPush)
    finally:
        strategy.reset()
    # The Offload's own hub asks that replies come to its queue, for every thread.
    options = [rpc_off.hub.submit_options() for _ in range(2)]
    assert options[0]["reply_to"] and options[0]["reply_to"] == options[1]["reply_to"]
    future = rpc_off.submit(add, 20, 22)
    assert future.result(timeout=60) == 42
    assert not rpc_off.hub.follows_foreign_tasks


def test_the_hub_offers_every_member_the_strategies_use():
    from offload.delivery.interface import Hub

    members = {name for name in vars(Hub) if not name.startswith("_")} | set(Hub.__annotations__)
    assert members == {"wakeup", "watched", "take_new", "ids", "deliver", "deliver_many", "count_read",
                       "housekeeping", "answered"}
    hub = ResultHub(lambda: None)
    assert all(hasattr(hub, name) for name in members)
