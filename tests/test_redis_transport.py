"""offload's Redis transport (offload.transport.redis): a message taken is in
the queue or leased, never nowhere, and everything kombu's Redis transport
offers still works."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import kombu
import kombu.exceptions
import pytest
import redis

import test_reliability as reliability
from test_broker_restart import DurableRedis
from conftest import require_service, wait_ready, wait_until, worker_env
from offload import BrokerUnavailable, Offload
from offload.transport.redis import Transport, orphans
from testapp import noop, test_id
from testapp.reliable import tally

pytestmark = pytest.mark.xdist_group("redis-transport")

#: The Redis DB these tests own (the suite's own apps use 1-15 by xdist index).
DB = 10


@pytest.fixture()
def raw() -> redis.Redis:
    require_service("redis")
    return redis.Redis(host="127.0.0.1", port=6379, db=DB)


@pytest.fixture()
def names(raw):
    """Queue names of this test (its keys are deleted afterwards)."""
    prefix = f"rt-{test_id()}-{uuid.uuid4().hex[:8]}"
    yield prefix
    for key in raw.scan_iter(f"*{prefix}*"):
        raw.delete(key)


def url(db: int = DB) -> str:
    return f"offload-redis://127.0.0.1:6379/{db}"


def queue(name: str) -> kombu.Queue:
    return kombu.Queue(name, kombu.Exchange(name), name, max_priority=10)


def publish(connection: kombu.Connection, q: kombu.Queue, bodies, **options) -> None:
    with connection.Producer() as producer:
        for body in bodies:
            producer.publish(body, exchange=q.exchange, routing_key=q.routing_key,
                             declare=[q], serializer="json", **options)


def bodies_in(raw: redis.Redis, name: str) -> set:
    """Bodies of the messages queued on ``name`` (every priority) and leased."""
    found = set()
    for key in raw.scan_iter(f"{name}*"):
        if raw.type(key) == b"list" and not key.endswith(b"wake"):
            for item in raw.lrange(key, 0, -1):
                found.add(_body(json.loads(item)))
    for value in raw.hvals("unacked"):
        payload, _exchange, _routing_key = json.loads(value)
        if payload["properties"]["delivery_info"]["routing_key"] == name:
            found.add(_body(payload))
    return found


def _body(payload: dict):
    return json.loads(base64.b64decode(payload["body"]))


# The take ------------------------------------------------------------------


def test_the_url_and_offload_apps_select_the_transport():
    with kombu.Connection(url()) as connection:
        assert isinstance(connection.transport, Transport)
    off = Offload({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/10"})
    with off.celery.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)
    assert off.celery.conf.result_backend == "redis://127.0.0.1:6379/10"
    # kombu's own transport stays one setting away.
    stock = Offload({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/10", "CELERY_BROKER_TRANSPORT": "redis"})
    with stock.celery.connection_for_write() as connection:
        assert type(connection.transport).__module__ == "kombu.transport.redis"


def test_a_taken_message_is_leased_in_kombus_format(raw, names):
    q = queue(names)
    with kombu.Connection(url()) as connection:
        publish(connection, q, ["one"])
        message = q(connection).get(no_ack=False)
        assert message.payload == "one"
        # Leased by the take itself, before anything else ran in the client.
        leased = json.loads(raw.hget("unacked", message.delivery_tag))
        assert leased == [message._raw, names, names]
        assert raw.zscore("unacked_index", message.delivery_tag) is not None
        message.ack()
        assert raw.hget("unacked", message.delivery_tag) is None
        assert raw.zscore("unacked_index", message.delivery_tag) is None
        # no_ack: nothing to lease.
        publish(connection, q, ["two"])
        unleased = q(connection).get(no_ack=True)
        assert unleased.payload == "two"
        assert raw.hget("unacked", unleased.delivery_tag) is None


def test_a_consumer_killed_anywhere_loses_nothing(raw, names, data_root):
    """SIGKILL a consumer of 1 ms tasks at random points, many times: after
    each kill every message is queued, leased or done; after the visibility
    timeout every one is done."""
    count, kills = 300, 25
    q = queue(names)
    done = f"{names}-done"
    with kombu.Connection(url()) as connection:
        publish(connection, q, [str(i) for i in range(count)])
    everything = {str(i) for i in range(count)}
    rng = random.Random(os.getpid())

    def done_set() -> set:
        return {m.decode() for m in raw.smembers(done)}

    def taker() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "testapp.redis_taker", url(), names, done],
                                env=worker_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)

    lost_after_kill = []
    for _ in range(kills):
        before = len(done_set())
        if before >= count:
            break
        proc = taker()
        target = min(count, before + rng.randint(1, 12))
        try:
            assert wait_until(lambda: raw.scard(done) >= target or proc.poll() is not None, 60), (
                f"stalled at {raw.scard(done)} done of {target}: "
                f"{len(bodies_in(raw, names))} queued or leased, restore mutex ttl "
                f"{raw.ttl('unacked_mutex')} s, wake tokens {raw.llen(f'{names}' + chr(6) + chr(22) + 'wake')}")
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc.stderr.close()
        # On the server, right after the kill: queued, leased or done.
        missing = everything - done_set() - bodies_in(raw, names)
        lost_after_kill.append(missing)
    assert not any(lost_after_kill), f"messages nowhere after a kill: {lost_after_kill}"

    # A last consumer: the leases of the killed ones come back to it.
    proc = taker()
    try:
        assert wait_until(lambda: len(done_set()) == count, 120), (
            f"lost: {sorted(everything - done_set(), key=int)}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()
    print(f"{kills} kills of a consumer of {count} 1 ms tasks: 0 lost")


def test_priorities_are_kombus(raw, names):
    """The same order as kombu's transport: its per-priority lists, 0 first."""
    orders = {}
    for scheme in ("redis", "offload-redis"):
        q = queue(f"{names}-{scheme}")
        with kombu.Connection(f"{scheme}://127.0.0.1:6379/{DB}") as connection:
            for priority in (9, 0, 5, 3, 9, 0):
                publish(connection, q, [priority], priority=priority)
            got = []
            while (message := q(connection).get(no_ack=True)) is not None:
                got.append(message.payload)
            orders[scheme] = got
    assert orders["offload-redis"] == orders["redis"]
    assert orders["redis"][:2] == [0, 0] and orders["redis"][-2:] == [9, 9]


def test_messages_of_kombus_own_producers_are_taken(raw, names):
    """A stock producer pushes no wake token: the consumer's wait times out
    (1 s, as kombu's own BRPOP does) and takes it anyway."""
    q = queue(names)
    got = []
    with kombu.Connection(url()) as consumer_connection, \
            kombu.Connection(f"redis://127.0.0.1:6379/{DB}") as stock:
        with consumer_connection.Consumer(q, callbacks=[lambda body, m: (got.append(body), m.ack())]):
            publish(stock, q, ["from stock"])
            assert wait_until(lambda: _drain(consumer_connection) or got, 30)
    assert got == ["from stock"]
    assert raw.hlen("unacked") == 0 or all(
        json.loads(v)[0]["properties"]["delivery_info"]["routing_key"] != names
        for v in raw.hvals("unacked"))


def _drain(connection: kombu.Connection, timeout: float = 0.2) -> bool:
    try:
        connection.drain_events(timeout=timeout)
    except socket.timeout:
        pass
    return False


def test_a_queue_keeps_one_wake_token_while_it_holds_messages(raw, names):
    """One token wakes one waiting consumer; a queue with messages keeps one
    for a consumer that waits while another is busy, an empty one none."""
    q = queue(names)
    with kombu.Connection(url()) as connection:
        wake = connection.default_channel.wake_key(names)
        publish(connection, q, range(3))
        assert raw.llen(wake) == 1  # not one per message, even without consumers
        raw.delete(wake)  # as if a waiting consumer had popped it
        assert q(connection).get(no_ack=True).payload == 0
        assert raw.llen(wake) == 1  # messages left: a token for another consumer
        assert q(connection).get(no_ack=True).payload == 1
        assert q(connection).get(no_ack=True).payload == 2
        assert raw.exists(wake) == 0  # the take that emptied the queue dropped it
        publish(connection, q, ["again"])
        assert raw.llen(wake) == 1
        q(connection).purge()
        assert raw.exists(wake) == 0


def test_two_waiting_consumers_are_both_woken(raw, names):
    """Two consumers wait on one queue; two messages published together wake
    both (their waits would otherwise last the whole 60 s brpop_timeout)."""
    q = queue(names)
    got: list[list] = [[], []]
    options = {"brpop_timeout": 60}
    with kombu.Connection(url(), transport_options=options) as a, \
            kombu.Connection(url(), transport_options=options) as b, \
            kombu.Connection(url()) as producer:
        consumers = [conn.Consumer(q, callbacks=[lambda body, m, i=i: (got[i].append(body), m.ack())],
                                   prefetch_count=1)
                     for i, conn in enumerate((a, b))]
        for consumer in consumers:
            consumer.consume()
        for conn in (a, b):  # each takes, finds nothing, and waits
            _drain(conn)
        publish(producer, q, ["x", "y"])
        assert wait_until(lambda: _drain(a, 0.05) or _drain(b, 0.05) or (got[0] and got[1]), 30)
        for consumer in consumers:
            consumer.cancel()
    assert sorted(got[0] + got[1]) == ["x", "y"]


@pytest.mark.parametrize("layout", ["a header named properties", "compact separators"])
def test_a_message_of_another_layout_is_leased_whole(raw, names, layout):
    """The take decodes only a message's trailing ``properties`` when kombu
    wrote it; any other layout is decoded whole, and leased just the same."""
    tag = uuid.uuid4().hex
    properties = {"delivery_tag": tag, "delivery_info": {"exchange": names, "routing_key": names},
                  "body_encoding": "base64", "priority": 0}
    message = {"body": base64.b64encode(b'"hello"').decode(), "content-encoding": "utf-8",
               "content-type": "application/json",
               "headers": {"properties": {"delivery_tag": "not this one"}}, "properties": properties}
    if layout == "a header named properties":
        item = json.dumps(message)
    else:
        message["headers"] = {}
        item = json.dumps(message, separators=(",", ":"))
    with kombu.Connection(url()) as connection:
        q = queue(names)
        q(connection).declare()
        raw.lpush(names, item)
        got = q(connection).get(no_ack=False)
        assert got.payload == "hello" and got.delivery_tag == tag
        assert json.loads(raw.hget("unacked", tag)) == [json.loads(item), names, names]
        got.ack()
        assert raw.hget("unacked", tag) is None


# Acknowledgements that cannot reach Redis ----------------------------------------


@pytest.fixture()
def own_redis(tmp_path):
    """A redis-server of this test's own, on a free loopback port, that it can pause."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI must have it)")
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        assert wait_until(lambda: _pings(client), 20)
        yield proc, port, client
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_failed_ack_frees_its_prefetch_slot(own_redis):
    proc, port, client = own_redis
    q = queue("acks")
    options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5, "visibility_timeout": 3600}
    with kombu.Connection(f"offload-redis://127.0.0.1:{port}/0", transport_options=options,
                          connect_timeout=0.5) as connection:
        publish(connection, q, ["first", "second"])
        received = []
        consumer = connection.Consumer(q, callbacks=[lambda body, m: received.append(m)])
        consumer.qos(prefetch_count=1)
        with consumer:
            assert wait_until(lambda: _drain(connection) or received, 20)
            qos = connection.default_channel.qos
            assert not qos.can_consume()
            os.kill(proc.pid, signal.SIGSTOP)  # Redis stops answering: the ack times out
            try:
                received[0].ack()
                assert qos.can_consume(), "the failed ack still holds the prefetch slot"
                assert list(qos.pending_acks) == [received[0].delivery_tag]
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            # The slot is free: the second message comes; its ack flushes the first.
            assert wait_until(lambda: _drain(connection) or len(received) == 2, 30)
            received[1].ack()
    assert not qos.pending_acks
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_a_server_that_lost_its_scripts_is_taken_from(own_redis):
    _proc, port, client = own_redis
    q = queue("noscript")
    got = []
    with kombu.Connection(f"offload-redis://127.0.0.1:{port}/0") as connection:
        with connection.Consumer(q, callbacks=[lambda body, m: (got.append(body), m.ack())]):
            publish(connection, q, [1])
            assert wait_until(lambda: _drain(connection) or got, 20)
            client.script_flush()  # a restarted server has none
            publish(connection, q, [2])
            assert wait_until(lambda: _drain(connection) or len(got) == 2, 20)
        assert q(connection).get() is None
        publish(connection, q, [3])
        client.script_flush()
        message = q(connection).get(no_ack=False)
        assert message.payload == 3 and client.hexists("unacked", message.delivery_tag)
        message.ack()
    assert got == [1, 2]


def test_a_silent_broker_is_not_waited_on_again_at_once(own_redis):
    """A timed-out publish marks the broker silent for one socket timeout:
    kombu's retries then fail at once instead of waiting again each."""
    proc, port, _client = own_redis
    q = queue("silent")
    options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    with kombu.Connection(f"offload-redis://127.0.0.1:{port}/0", transport_options=options) as connection:
        publish(connection, q, ["warm"])
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(kombu.exceptions.OperationalError):
                publish(connection, q, ["lost?"], retry=True,
                        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0})
            with pytest.raises(redis.ConnectionError, match="timed out a moment ago"):
                connection.transport.check_not_silent()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # Once the window is over, the broker is used again.
        assert wait_until(lambda: _publishes(connection, q), 20)


def _publishes(connection: kombu.Connection, q: kombu.Queue) -> bool:
    try:
        publish(connection, q, ["again"])
        return True
    except (kombu.exceptions.OperationalError, redis.ConnectionError):
        return False


def test_lease_renewal_flushes_failed_acks(own_redis):
    proc, port, client = own_redis
    q = queue("renew")
    options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    with kombu.Connection(f"offload-redis://127.0.0.1:{port}/0", transport_options=options) as connection:
        publish(connection, q, ["a", "b"])
        first = q(connection).get(no_ack=False)
        second = q(connection).get(no_ack=False)
        qos = first.channel.qos
        assert qos.held_tags() == [first.delivery_tag, second.delivery_tag]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            first.ack()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert qos.held_tags() == [second.delivery_tag]
        before = client.zscore("unacked_index", second.delivery_tag)
        assert qos.renew_leases() == 1
        assert client.zscore("unacked_index", second.delivery_tag) >= before
        assert client.hexists("unacked", first.delivery_tag) is False
        second.ack()


# Real workers --------------------------------------------------------------------


@pytest.fixture()
def reliable_redis(data_root):
    require_service("redis")
    from testapp.reliable_redis import off

    with off.celery.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)
    off.celery.control.purge()
    return off


def test_remote_control_and_inspect_work(reliable_redis, data_root):
    off = reliable_redis
    worker = reliability.start("redis", data_root, 5)
    try:
        wait_ready(off, worker)
        prefix = worker.name.partition("@")[0] + "@"
        assert wait_until(lambda: any(name.startswith(prefix) for name in off.status()["workers"]),
                          30), off.status()
        queues = off.celery.control.inspect(timeout=2).active_queues() or {}
        assert any(q["name"] == off.celery.conf.task_default_queue
                   for qs in queues.values() for q in qs), queues
    finally:
        worker.stop()


def test_a_long_task_with_a_short_visibility_timeout_runs_once(reliable_redis, data_root):
    off = reliable_redis
    timeout = off.celery.conf.broker_transport_options["visibility_timeout"]
    token = uuid.uuid4().hex
    worker = reliability.start("redis", data_root, 6)
    other = reliability.start("redis", data_root, 7)  # idle, and sweeping
    try:
        wait_ready(off, worker)
        off.submit(tally, token, 0, timeout * 2.5).result(timeout=60)
        off.submit(tally, token, 1, 0).result(timeout=30)
        assert reliability.tallies(token) == {0: 1, 1: 1}
    finally:
        worker.stop()
        other.stop()


def test_a_worker_killed_mid_burst_loses_nothing(reliable_redis, data_root):
    off = reliable_redis
    token = uuid.uuid4().hex
    first = reliability.start("redis", data_root, 8)
    try:
        wait_ready(off, first)
        futures = [off.submit(tally, token, i, 0.001) for i in range(300)]
        assert wait_until(lambda: len(reliability.tallies(token)) >= 100, 60), first.log_tail()
        first.kill()
    finally:
        first.stop()
    second = reliability.start("redis", data_root, 9)
    try:
        for future in futures:
            future.result(timeout=120)
        counts = reliability.tallies(token)
        assert sorted(counts) == list(range(300))
        print(f"300 tasks, worker SIGKILLed mid-burst: 0 lost, "
              f"{sum(c - 1 for c in counts.values())} ran twice")
    finally:
        second.stop()


def test_submit_to_an_unreachable_redis_raises_broker_unavailable():
    off = Offload({"CELERY_BROKER_URL": "redis://127.0.0.1:1/0"})
    with pytest.raises(BrokerUnavailable):
        off.submit(noop)


def test_a_channel_keeps_one_client_per_pool_and_publishes_through_a_new_pool(raw, names):
    """Publishing reuses one redis-py client (kombu builds one per call); a
    channel whose pool was replaced (after a reconnect) gets a client of the
    new pool, and what it publishes arrives."""
    q = queue(names)
    with kombu.Connection(url()) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.connection_pool is channel.pool
        given = object()
        with channel.conn_or_acquire(client=given) as client:
            assert client is given
        publish(connection, q, ["before"])
        channel._pool = None  # what kombu does when it drops its pools
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool
        publish(connection, q, ["after"])
        assert [q(connection).get(no_ack=True).payload for _ in range(2)] == ["before", "after"]


def test_pipelined_puts_send_in_order_when_the_block_ends_and_nothing_if_it_raises(raw, names):
    q = queue(names)
    with kombu.Connection(url()) as connection:
        channel = connection.default_channel
        publish(connection, q, ["declared"])  # declares the queue and its binding
        assert q(connection).get(no_ack=True).payload == "declared"
        with channel.pipelined_puts():
            publish(connection, q, range(5))
            with channel.pipelined_puts():  # nested: sent with the outer block
                publish(connection, q, [5])
            assert q(connection).get(no_ack=True) is None  # nothing sent yet
        assert [q(connection).get(no_ack=True).payload for _ in range(6)] == list(range(6))
        assert raw.llen(channel.wake_key(names)) == 0  # the takes emptied the queue and its token
        with pytest.raises(RuntimeError, match="abandoned"):
            with channel.pipelined_puts():
                publish(connection, q, ["never"])
                raise RuntimeError("abandoned")
        assert q(connection).get(no_ack=True) is None
        publish(connection, q, ["after"])  # publishing outside a block is unchanged
        assert q(connection).get(no_ack=True).payload == "after"


def test_closing_a_channel_after_its_connection_was_collected_leaves_its_messages_to_the_next(own_redis):
    """A worker that loses Redis closes its connection a second time after
    kombu dropped the channel's pools and the transport's client: the restore
    of its unacked messages must not raise an AttributeError (which stopped
    the worker for good); what it held is left to the next channel."""
    _proc, port, client = own_redis
    q = queue("collected")
    with kombu.Connection(f"offload-redis://127.0.0.1:{port}/0") as connection:
        publish(connection, q, ["held"])
        channel = connection.channel()
        message = channel.basic_get(q.name)  # unacked: close restores it
        assert message is not None
        # What a collected connection leaves behind (kombu.Connection.collect).
        channel._disconnect_pools()
        channel.connection.client = None
        channel.close()
        assert set(orphans.held(channel.lease_scope)) == {message.delivery_tag}
        assert client.hexists("unacked", message.delivery_tag)
    with kombu.Connection(f"offload-redis://127.0.0.1:{port}/0") as connection:
        assert connection.default_channel.qos.settle_orphans() == 1
        assert q(connection).get(no_ack=True).payload == "held"
    assert not orphans.held(channel.lease_scope) and not client.hexists("unacked", message.delivery_tag)


def test_what_a_channel_held_when_redis_went_away_goes_back_once_it_answers(tmp_path):
    """kombu restores a closing channel's unacknowledged messages; when Redis
    is why it closes, that fails and they would wait out the visibility
    timeout (an hour here). The next channel of the process settles them."""
    server = DurableRedis(tmp_path)  # killed and started again: its AOF keeps every write
    client = redis.Redis(host="127.0.0.1", port=server.port)
    url = f"offload-redis://127.0.0.1:{server.port}/0"
    q = queue("orphans")
    options = {"visibility_timeout": 3600}
    try:
        with kombu.Connection(url, transport_options=options) as connection:
            publish(connection, q, ["held", "acked", "ran on", "requeued", "queued"])
            channel = connection.channel()
            held, acked, ran_on, requeued = (channel.basic_get(q.name) for _ in range(4))
            server.kill()
            acked.ack()  # fails: its lease stays
            requeued.requeue()  # fails too (a result store that went down with Redis)
            channel.close()  # its restore fails too: nothing raised
            scope = channel.lease_scope
            assert {tag: restore for tag, (restore, _at) in orphans.held(scope).items()} == {
                held.delivery_tag: True, acked.delivery_tag: False, ran_on.delivery_tag: True,
                requeued.delivery_tag: True}
            ran_on.ack()  # a task that ran on through the outage ends
            assert orphans.held(scope)[ran_on.delivery_tag][0] is False
        server.start()
        assert client.hlen("unacked") == 4, "still leased: nothing reached Redis"
        # Another holder has taken "held" again since (a sweep, a worker elsewhere):
        # its lease is newer than the close, so not this process's to give back.
        client.zadd("unacked_index", {held.delivery_tag: time.time() + 60}, xx=True)
        got = []
        with kombu.Connection(url, transport_options=options) as connection:
            with connection.Consumer(q, callbacks=[lambda body, m: (got.append(body), m.ack())]):
                assert not orphans.held(scope), "the new consumer settled them before taking anything"
                assert wait_until(lambda: _drain(connection) or len(got) == 2, 20), got
            assert got == ["requeued", "queued"], "given back at the head of the queue"
            assert q(connection).get(no_ack=True) is None
        # "acked" and "ran on" were acknowledged: gone; "held" is its new holder's.
        assert client.hkeys("unacked") == [held.delivery_tag.encode()]
    finally:
        server.stop()
