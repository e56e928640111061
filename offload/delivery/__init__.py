"""How the result hub hears of task states: one strategy per kind of result backend.

* :class:`~offload.delivery.redis_push.RedisPush`: Redis publishes each state
  it stores; one pub/sub connection per process;
* :class:`~offload.delivery.rpc.RpcPush`: rpc:// sends each result back; one
  reply queue per process;
* :class:`~offload.delivery.feed.ChangeFeed`: the embedded sqlite backend,
  which numbers its writes and pokes a wake-up socket; what changed since
  the last read, read as soon as it is stored;
* :class:`~offload.delivery.polling.BatchPoll`: any other backend; one
  batched read of every followed id.

Each uses the hub only through :class:`~offload.delivery.interface.Hub`.
"""

from __future__ import annotations

from typing import Any

from ..result_store import is_redis, is_rpc
from .feed import ChangeFeed, has_change_feed
from .interface import Hub, Strategy
from .polling import BatchPoll
from .redis_push import RedisPush
from .rpc import RpcPush

__all__ = ["BatchPoll", "ChangeFeed", "Hub", "RedisPush", "RpcPush", "Strategy", "strategy_for"]


def strategy_for(backend: Any) -> Strategy:
    """The strategy that follows ``backend``'s states."""
    if is_redis(backend):
        return RedisPush(backend)
    if is_rpc(backend):
        return RpcPush(backend)
    if has_change_feed(backend):
        return ChangeFeed(backend)
    return BatchPoll(backend)
