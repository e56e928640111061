"""``off.map(fn, items)`` on real workers: several calls per message
(growing chunks by default, ``chunksize=n`` fixed), each with its own
future, id, state, exception and progress; a cancelled call skipped; a
redelivered chunk runs only the calls without a result; a chunk naming a
function that is not allowed runs nothing; a worker killed mid-chunk loses
no call and reruns fewer than it had stored."""

from __future__ import annotations

import importlib
import json
import os
import time
import uuid

import pytest
import redis
from celery import states
from celery.signals import before_task_publish

import offload
from offload import BrokerUnavailable, NotAllowedError, Offload
from offload.exceptions import RejectedMessage
from conftest import WorkerProcess, closed_port, dead_broker_url, require_service, wait_ready, wait_until
from testapp import test_id
from offload.core import MAP_CHUNK_MAX, chunk_sizes
from offload.dispatch import (CHUNK_TASK, DISPATCH_TASK, chunk_call_ids, read_states, results_channel,
                              store_results)
from testapp import add, div, mul
from testapp.calls import gated, mark, report_and_wait, unsendable
from testapp.reliable import TALLY_DB, tally


def test_chunked_map_gives_each_call_its_own_future(off):
    published = []

    def count(sender=None, **kwargs):
        published.append(sender)

    before_task_publish.connect(count, weak=False)
    try:
        futures = off.map(add, [[i, i] for i in range(25)], chunksize=10)
    finally:
        before_task_publish.disconnect(count)
    assert published == [CHUNK_TASK] * 3
    assert all(isinstance(f, offload.Future) for f in futures)
    assert len({f.id for f in futures}) == 25
    assert [f.result(timeout=60) for f in futures] == [2 * i for i in range(25)]
    assert all(f.state == states.SUCCESS for f in futures)
    # Each id is a task of its own for anyone who looks it up later.
    assert off.get(futures[7].id).result(timeout=60) == 14


def test_a_chunks_argsrepr_shows_its_head_and_its_count_of_calls(off):
    # Monitors show a chunk by its reference and first calls, not a walk over
    # all of them; the repr is in the headers only, not the properties too.
    seen = []

    def capture(sender=None, headers=None, properties=None, **kwargs):
        if sender == CHUNK_TASK:
            seen.append((headers.get("argsrepr"), dict(properties or {})))

    before_task_publish.connect(capture, weak=False)
    try:
        futures = off.map(add, [[i, 1] for i in range(10)], chunksize=10)
    finally:
        before_task_publish.disconnect(capture)
    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(10)]
    (argsrepr, properties), = seen
    # Celery's own repr of the first 3 calls (as deep as its task_repr_maxlevels), then the count.
    from celery.utils.saferepr import saferepr

    head = saferepr(("testapp:add", [[[i, 1], {}] for i in range(3)]), 1024,
                    maxlevels=off.celery.conf.task_repr_maxlevels)
    assert argsrepr == head[:-2] + ", ... 10 calls])", argsrepr
    assert argsrepr.startswith("('testapp:add', [")
    assert "argsrepr" not in properties and "kwargsrepr" not in properties


def test_a_large_map_sends_its_chunks_in_groups_as_their_futures_are_made(off):
    # The first chunk alone, then about MAP_SEND_GROUP calls' chunks at a time:
    # every result still reaches its own future.
    from offload.core import MAP_SEND_GROUP

    total = 3 * MAP_SEND_GROUP
    followed = []

    def note(sender=None, **kwargs):
        if sender == CHUNK_TASK:
            followed.append(off.hub.stats().listeners)

    before_task_publish.connect(note, weak=False)
    try:
        with Published() as published:
            futures = off.map(add, [[i, 1] for i in range(total)], chunksize=100)
    finally:
        before_task_publish.disconnect(note)
    assert [f.result(timeout=120) for f in futures] == [i + 1 for i in range(total)]
    assert [count for _name, count in published.messages] == chunk_sizes(total, 100)
    # When the first chunk left, only its own calls' futures were listening.
    assert followed[0] < total and followed[-1] >= followed[0]


class Published:
    """The task name and the number of calls of each message sent meanwhile."""

    def __init__(self):
        self.messages = []

    def _record(self, sender=None, body=None, **kwargs):
        args = body[0] if isinstance(body, (list, tuple)) else ()
        self.messages.append((sender, len(args[1]) if sender == CHUNK_TASK else 1))

    def __enter__(self):
        before_task_publish.connect(self._record, weak=False)
        return self

    def __exit__(self, *exc):
        before_task_publish.disconnect(self._record)


def test_map_chunks_by_default_growing_from_one_call(off):
    with Published() as published:
        futures = off.map(add, [[i, 1] for i in range(48)])
    # The first message carries one call, so the first result comes back as
    # soon as a single call's would; the chunks double from there.
    assert published.messages == [(CHUNK_TASK, size) for size in chunk_sizes(48, None)]
    assert [size for _, size in published.messages][:3] == [1, 2, 3]
    assert len({f.id for f in futures}) == 48
    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(48)]
    assert off.get(futures[30].id).result(timeout=60) == 31


def test_default_chunks_reach_their_largest_size_on_a_large_map():
    sizes = chunk_sizes(10_000, None)
    assert sizes[:8] == [1, 2, 4, 8, 16, 32, 64, 128] and max(sizes) == MAP_CHUNK_MAX
    assert sum(sizes) == 10_000 and len(sizes) == 85
    # A small map is still spread over several messages (several workers).
    assert len(chunk_sizes(200, None)) >= 16 and chunk_sizes(1, None) == [1]
    assert chunk_sizes(7, 3) == [3, 3, 1] and chunk_sizes(0, None) == []


def test_options_that_bound_one_task_keep_a_message_per_call_by_default(off):
    with Published() as published:
        futures = off.options(expires=300).map(add, [[1, 2], [3, 4], [5, 6]])
        off.options(soft_time_limit=60).map(add, [[1, 1]])
    assert published.messages == [(DISPATCH_TASK, 1)] * 4
    assert [f.result(timeout=60) for f in futures] == [3, 7, 11]


@pytest.mark.parametrize("chunksize", [3, None])
def test_a_chunked_call_reports_progress_and_runs_as_its_own_task(off, gate, chunksize):
    if not off.hub.follows_foreign_tasks:
        pytest.skip("rpc:// stores no result another process can read")
    futures = off.map(report_and_wait, [[gate, i] for i in range(3)], chunksize=chunksize)
    # progress() in the first call reaches that call's future, not its chunk's.
    assert wait_until(lambda: (futures[0].progress or {}).get("message") == "call 0", timeout=60)
    assert futures[0].state == "PROGRESS"
    open(gate, "w").close()
    assert [f.result(timeout=60) for f in futures] == [[i, f.id] for i, f in enumerate(futures)]


@pytest.mark.parametrize("chunksize", [4, None])
def test_one_failing_call_does_not_fail_its_neighbours(off, chunksize):
    futures = off.map(div, [[1, 1], [1, 0], [4, 2], {"x": 9, "y": 3}], chunksize=chunksize)
    assert futures[0].result(timeout=60) == 1
    with pytest.raises(ZeroDivisionError):
        futures[1].result(timeout=60)
    assert futures[1].state == states.FAILURE
    assert futures[2].result(timeout=60) == 2
    assert futures[3].result(timeout=60) == 3


def test_chunksize_is_checked(off):
    for wrong in (0, -1, "3", 2.5, True):
        with pytest.raises(ValueError, match="chunksize must be None or an int >= 1"):
            off.map(add, [[1, 2]], chunksize=wrong)
    with pytest.raises(TypeError, match="task_id"):
        off.options(task_id=str(uuid.uuid4())).map(add, [[1, 2], [3, 4]], chunksize=2)
    with pytest.raises(TypeError, match="nothing was sent"):
        off.map(add, [[1, 2], [object(), 3]], chunksize=2)
    assert off.map(add, [], chunksize=5) == []


def test_chunksize_one_and_registered_tasks_send_a_message_per_call(off):
    task = off.celery.tasks["testapp.mul"]
    assert [f.result(timeout=60) for f in off.map(task, [[2, 3], [4, 5]], chunksize=2)] == [6, 20]
    assert [f.result(timeout=60) for f in off.map(mul, [[2, 3]], chunksize=1)] == [6]
    published = []

    def count(sender=None, **kwargs):
        published.append(sender)

    before_task_publish.connect(count, weak=False)
    try:
        off.options(ignore_result=True).map(add, [[1, 2], [3, 4]], chunksize=2)
    finally:
        before_task_publish.disconnect(count)
    assert published == [DISPATCH_TASK] * 2


def test_rpc_backend_sends_a_message_per_call(rpc_off):
    futures = rpc_off.map(add, [[1, 2], [3, 4], [5, 6]], chunksize=3)
    assert [f.result(timeout=60) for f in futures] == [3, 7, 11]


@pytest.mark.parametrize("chunksize", [5, None])
def test_cancel_skips_a_call_that_has_not_started(off, gate, tmp_path, chunksize):
    if not off.hub.follows_foreign_tasks:
        pytest.skip("rpc:// records no revoke")
    holders = [off.submit(gated, gate, i) for i in range(2)]
    assert wait_until(lambda: all(f.running() for f in holders), timeout=60)
    ran = tmp_path / "ran"
    ran.mkdir()
    futures = off.map(mark, [[str(ran), i, i] for i in range(5)], chunksize=chunksize)
    assert futures[2].cancel() is True
    open(gate, "w").close()
    assert [f.result(timeout=60) for f in holders] == [0, 1]
    assert [futures[i].result(timeout=60) for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    assert futures[2].cancelled()
    assert sorted(os.listdir(ran)) == ["0", "1", "3", "4"]


def test_a_redelivered_chunk_runs_only_the_calls_without_a_result(off, tmp_path):
    # What a worker killed mid-chunk leaves: the first call's result stored,
    # the message back in the queue. The next worker skips the stored call.
    if not off.hub.follows_foreign_tasks:
        pytest.skip("rpc:// stores no result another process can read")
    chunk_id = str(uuid.uuid4())
    done_id, todo_id = chunk_call_ids(chunk_id, 2)
    backend = off.celery.backend
    store_results(backend, [(done_id, states.SUCCESS, "stored before", None)])
    assert read_states(backend, [done_id, todo_id]) == {done_id: states.SUCCESS}
    off.celery.send_task(CHUNK_TASK, ("testapp.calls:mark", [
        [[str(tmp_path), "first", "ran again"], {}],
        [[str(tmp_path), "second", "ran"], {}],
    ]), task_id=chunk_id)
    assert off.get(todo_id).result(timeout=60) == "ran"
    assert off.get(done_id).result(timeout=60) == "stored before"
    assert os.listdir(tmp_path) == ["second"]


def test_a_forged_chunk_runs_nothing_and_fails_each_call(off, tmp_path):
    if not off.hub.follows_foreign_tasks:
        pytest.skip("rpc:// stores no result another process can read")
    chunk_id = str(uuid.uuid4())
    off.celery.send_task(CHUNK_TASK, ("os:system", [[[f"touch {tmp_path}/owned"], {}]]), task_id=chunk_id)
    error = off.get(chunk_call_ids(chunk_id, 1)[0]).exception(timeout=60)
    assert "not allowed" in str(error)
    assert not (tmp_path / "owned").exists()


def test_a_forged_chunk_cannot_write_over_another_tasks_result(off, tmp_path):
    # A finished task's id named as a chunk's call (the old message form),
    # and as the chunk's own id: neither turns its SUCCESS into a FAILURE.
    if not off.hub.follows_foreign_tasks:
        pytest.skip("rpc:// stores no result another process can read")
    done = off.submit(add, 1, 2)
    assert done.result(timeout=60) == 3
    forged = off.celery.send_task(CHUNK_TASK, ("os:system", [[done.id, ["true"], {}]]))
    with pytest.raises(RejectedMessage, match="dispatch_chunk takes"):
        forged.get(timeout=30)
    chunk_id = str(uuid.uuid4())
    victim = chunk_call_ids(chunk_id, 1)[0]
    store_results(off.celery.backend, [(victim, states.SUCCESS, "kept", None)])
    second = chunk_call_ids(chunk_id, 2)[1]
    off.celery.send_task(CHUNK_TASK, ("os:system", [[["true"], {}], [["true"], {}]]), task_id=chunk_id)
    with pytest.raises(NotAllowedError):
        off.get(second).result(timeout=60)
    assert off.get(victim).result(timeout=30) == "kept"
    # Once more with a function that runs: only the call that has not ended does.
    off.celery.send_task(CHUNK_TASK, ("testapp.calls:mark", [
        [[str(tmp_path), name, "ran"], {}] for name in ("first", "second", "third")]), task_id=chunk_id)
    assert off.get(chunk_call_ids(chunk_id, 3)[2]).result(timeout=60) == "ran"
    assert off.get(victim).result(timeout=30) == "kept"
    assert os.listdir(tmp_path) == ["third"]
    assert off.get(done.id).result(timeout=30) == 3


def test_batched_results_read_as_celerys_own(off):
    if not off.hub.follows_foreign_tasks:
        pytest.skip("rpc:// stores no result another process can read")
    ok, failed = str(uuid.uuid4()), str(uuid.uuid4())
    store_results(off.celery.backend, [(ok, states.SUCCESS, {"a": [1, 2]}, None),
                                       (failed, states.FAILURE, KeyError("k"), "Traceback ...")])
    assert off.celery.AsyncResult(ok).get(timeout=10) == {"a": [1, 2]}
    meta = off.celery.backend.get_task_meta(failed, cache=False)
    assert meta["status"] == states.FAILURE and isinstance(meta["result"], KeyError)
    assert meta["traceback"] == "Traceback ..."


def test_batched_results_stored_on_a_redis_that_refuses_scripts(tmp_path):
    # On Redis a batch is stored by one script call; a server that takes no
    # scripts (a managed Redis may refuse EVAL) gets the same writes and
    # publishes by pipeline.
    import shutil
    import subprocess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = closed_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--rename-command", "EVALSHA", "", "--rename-command", "EVAL", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        assert wait_until(lambda: _pings(client), 20)
        app = Offload({"CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0"})
        backend = app.celery.backend
        listener = client.pubsub()
        first = str(uuid.uuid4())
        channel = results_channel(first[:8])
        listener.subscribe(channel)
        assert wait_until(lambda: listener.get_message(timeout=0.1) is not None, 10)  # the confirmation
        ids = [first[:8] + str(uuid.uuid4())[8:] for _ in range(3)]
        store_results(backend, [(task_id, states.SUCCESS, index, None) for index, task_id in enumerate(ids)])
        for index, task_id in enumerate(ids):
            meta = backend.get_task_meta(task_id, cache=False)
            assert (meta["status"], meta["result"]) == (states.SUCCESS, index)
            assert 0 < client.ttl(backend.get_key_for_task(task_id)) <= int(backend.expires)
        message = None
        deadline = time.monotonic() + 10
        while message is None and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)
        assert message is not None, "no batch message was published"
        assert [meta["task_id"] for meta in json.loads(message["data"])] == ids
        listener.close()
        client.close()
    finally:
        server.kill()
        server.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_unreachable_broker_fails_fast_and_leaves_no_follower(scheme):
    off = Offload({"CELERY_BROKER_URL": dead_broker_url(scheme),
                   "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/9"})
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="unreachable"):
        off.map(add, [[1, 2], [3, 4], [5, 6]], chunksize=2)
    with pytest.raises(BrokerUnavailable, match="unreachable"):
        off.executor().map(add, [1, 2], [3, 4])
    assert time.monotonic() - started < 10
    assert off.hub.stats().listeners == 0  # the futures of unsent calls stopped listening


def test_a_result_json_cannot_carry_fails_its_call_alone(off):
    futures = off.map(unsendable, [1, 2, 3], chunksize=3)
    assert futures[0].result(timeout=60) == 1
    with pytest.raises(Exception, match="cannot be stored"):
        futures[1].result(timeout=60)
    assert futures[2].result(timeout=60) == 3


def tallies(token: str) -> dict[int, int]:
    """How many times each call of run ``token`` ran (testapp.reliable.tally)."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=TALLY_DB)
    return {int(k): int(v) for k, v in client.hgetall(f"tally:{token}").items()}


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_a_worker_killed_mid_chunk_loses_no_call_and_reruns_few(kind, data_root):
    # One chunk of 40 calls of 50 ms: kill its worker when some 10 have run,
    # start another. The chunk comes back (late ack); the calls whose results
    # were stored (every 0.2 s) are skipped, the others run.
    require_service("redis")
    require_service(kind)
    off = importlib.import_module(f"testapp.reliable_{kind}").off
    off.celery.control.purge()
    token = uuid.uuid4().hex

    def start(n: int) -> WorkerProcess:
        return WorkerProcess(f"testapp.reliable_{kind}", f"chunk{n}-{kind}-{test_id()}@%h",
                             data_root / f"chunk-{kind}-{n}.log", concurrency=2)

    first = start(1)
    try:
        wait_ready(off, first)
        futures = off.map(tally, [[token, i, 0.05] for i in range(40)], chunksize=40)
        assert wait_until(lambda: len(tallies(token)) >= 10, 60), first.log_tail()
        first.kill()
        ran_before = len(tallies(token))
        assert ran_before < 40
    finally:
        first.stop()
    second = start(2)
    try:
        for future in futures:
            future.result(timeout=90)
        counts = tallies(token)
        assert sorted(counts) == list(range(40)), "every call ran"
        again = [i for i, c in counts.items() if c > 1]
        print(f"{kind}: {ran_before} calls ran before the kill, {len(again)} ran again")
        assert len(again) < ran_before, "calls whose results were stored ran again"
    finally:
        second.stop()


def test_the_hub_hears_a_chunks_results_in_one_message(redis_off):
    # Besides each call's own key and channel (for AsyncResult.get() and
    # off.get(id) anywhere), a chunk publishes its results as one array on
    # the channel of its ids' prefix, which the sender's hub reads.
    prefix = redis_off.hub.new_task_ids(1)[0][:8]
    client = redis.Redis.from_url(redis_off.celery.conf.result_backend)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(results_channel(prefix))
    try:
        assert wait_until(lambda: pubsub.get_message(timeout=0.1) is None and pubsub.subscribed, timeout=10)
        futures = redis_off.map(div, [[8, 2]] * 40 + [[1, 0]], chunksize=41)
        assert [f.id[:8] for f in futures] == [prefix] * 41
        assert [f.result(timeout=60) for f in futures[:40]] == [4] * 40
        with pytest.raises(ZeroDivisionError):
            futures[40].result(timeout=60)
        batches = []
        assert wait_until(lambda: batches.append(pubsub.get_message(timeout=0.1)) or
                          sum(len(json.loads(m["data"])) for m in batches if m) == 41, timeout=10)
        metas = [meta for m in batches if m for meta in json.loads(m["data"])]
        assert [meta["task_id"] for meta in metas] == [f.id for f in futures]
        assert metas[40]["status"] == states.FAILURE
    finally:
        pubsub.close()
        client.close()


def test_a_chunk_that_expired_while_queued_ends_each_call_revoked(off, broker, gate, tmp_path):
    """An explicit chunk sent with ``expires`` that passes while it waits:
    the worker revokes the chunk, and each call's own future ends cancelled
    (REVOKED) at once, none of them run. On RabbitMQ too: offload gives the
    message no broker TTL, which would drop it unseen."""
    holders = [off.submit(gated, gate, i) for i in range(2)]
    assert wait_until(lambda: all(f.running() for f in holders), timeout=60)
    ran = tmp_path / "ran"
    ran.mkdir()
    expires_at = time.time() + 1.0
    futures = off.options(expires=expires_at - time.time()).map(
        mark, [[str(ran), i, i] for i in range(4)], chunksize=4)
    # The workers stay busy until the chunk's expiry has passed.
    assert wait_until(lambda: time.time() > expires_at + 0.2, timeout=10)
    open(gate, "w").close()
    assert [f.result(timeout=60) for f in holders] == [0, 1]
    assert wait_until(lambda: all(f.done() for f in futures), timeout=60)
    assert all(f.cancelled() for f in futures)
    assert os.listdir(ran) == []
