"""The private parts of kombu, Celery and redis-py that offload relies on, pinned.

Each is used for a reason given where it is used (offload.transport.redis,
offload.core, offload.dispatch, offload._resp); none is part of its
library's public interface, so a release may rename or reshape it. These
tests fail then, naming what changed, rather than a worker misbehaving.
(The virtual-transport names offload.transport.sqlite extends are pinned in
tests/test_transport.py.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from conftest import SERVICES, require_service
from kombu.transport import redis as kombu_redis


def _parameters(function: Callable[..., Any]) -> list[str]:
    """Parameter names after ``self``, ``*args``/``**kwargs`` marked as such."""
    shown = []
    for param in list(inspect.signature(function).parameters.values())[1:]:
        prefix = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "")
        shown.append(prefix + param.name)
    return shown


# offload.transport.redis: the Channel overrides these kombu methods (the take
# and its BRPOP hooks, run by kombu's MultiChannelPoller), calling them back
# through super(); a changed signature means a changed calling convention.
KOMBU_REDIS_CHANNEL_METHODS = {
    "_get": ["queue"],
    "_brpop_start": ["timeout"],
    "_brpop_read": ["**options"],
    "_poll_error": ["type", "**options"],
    "_do_restore_message": ["payload", "exchange", "routing_key", "pipe", "leftmost"],
    "_flush_brpop_reauth": [],
    "_maybe_update_queues_expire": ["client", "queue"],
    "_q_for_pri": ["queue", "pri"],
    "_put": ["queue", "message", "**kwargs"],
    "_lookup": ["exchange", "routing_key", "default"],
    "_get_message_priority": ["message", "reverse"],
    "conn_or_acquire": ["client"],
}


@pytest.mark.parametrize("name", sorted(KOMBU_REDIS_CHANNEL_METHODS))
def test_kombu_redis_channel_methods_offload_overrides_or_calls(name: str) -> None:
    method = getattr(kombu_redis.Channel, name, None)
    assert callable(method), f"kombu.transport.redis.Channel.{name} is gone"
    assert _parameters(method) == KOMBU_REDIS_CHANNEL_METHODS[name], name


def test_kombu_redis_poller_drives_the_take_through_in_poll_and_handlers() -> None:
    """offload's BRPOP hooks set ``_in_poll`` to the connection they sent on,
    as kombu's do, and the poller reads a reply through ``handlers["BRPOP"]``."""
    assert kombu_redis.Channel._in_poll is False
    assert kombu_redis.Channel._closing is False
    assert kombu_redis.Channel.global_keyprefix == ""
    poller_source = inspect.getsource(kombu_redis.MultiChannelPoller)
    assert "channel._in_poll" in poller_source
    assert "_brpop_start" in inspect.getsource(kombu_redis.MultiChannelPoller._register_BRPOP)
    init_source = inspect.getsource(kombu_redis.Channel.__init__)
    assert "'BRPOP': self._brpop_read" in init_source
    assert "self._queue_cycle = cycle_by_name" in init_source
    from kombu.utils.scheduling import round_robin_cycle

    assert callable(round_robin_cycle.consume) and callable(round_robin_cycle.rotate)


def test_kombu_redis_qos_and_transport_internals() -> None:
    """The Redis QoS keeps ``_delivered`` and ``_dirty`` (offload's leases
    extend it), and a channel hands a message to its consumer through the
    transport's ``_deliver(message, queue)``."""
    from kombu.transport import virtual

    assert _parameters(virtual.Transport._deliver) == ["message", "queue"]
    assert "self._delivered" in inspect.getsource(virtual.QoS.__init__)
    assert "self._dirty" in inspect.getsource(virtual.QoS.__init__)
    assert issubclass(kombu_redis.QoS, virtual.QoS)


def test_celery_builds_the_backend_in_get_backend_and_subscribes_in_on_task_call() -> None:
    """offload.core's Celery subclass overrides ``_get_backend`` to switch off
    the Redis backend's ``on_task_call`` (a subscription per sent task)."""
    from celery import Celery
    from celery.backends.redis import RedisBackend

    assert _parameters(Celery._get_backend) == []
    assert "self._get_backend()" in inspect.getsource(Celery.backend.fget)  # type: ignore[attr-defined]
    assert _parameters(RedisBackend.on_task_call) == ["producer", "task_id"]
    assert "self.backend.on_task_call(P, task_id)" in inspect.getsource(Celery.send_task)


def test_celery_builds_a_stored_meta_in_get_result_meta() -> None:
    """offload.dispatch.store_results builds the metas of a batch with it."""
    from celery.backends.base import Backend

    assert _parameters(Backend._get_result_meta)[:4] == ["result", "state", "traceback", "request"]


def test_redis_py_connection_internals_the_subscriber_reads() -> None:
    """offload._resp.Subscriber polls a pooled connection's ``_sock`` itself
    and sends with ``send_command(..., check_health=False)``."""
    import redis

    require_service("redis")
    host, port = SERVICES["redis"]
    client = redis.Redis(host=host, port=port)
    try:
        connection = client.connection_pool.get_connection()
        try:
            connection.connect()
            assert connection._sock is not None and connection._sock.fileno() >= 0
            connection.send_command("PING", check_health=False)
            assert connection.read_response() in (b"PONG", "PONG")
        finally:
            client.connection_pool.release(connection)
    finally:
        client.close()
    source = inspect.getsource(redis.connection.AbstractConnection.send_command)
    assert 'check_health=kwargs.get("check_health", True)' in source
