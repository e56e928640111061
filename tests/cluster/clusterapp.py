"""The app the cluster tests' workers run (``offload --app clusterapp:off worker``).

Its broker and result backend are the Redis server of the test network
(``OFFLOAD_CLUSTER_REDIS``); each worker's host name comes from
``OFFLOAD_CLUSTER_HOST``. Every execution is counted on that server, so a
test sees what ran where, and how many times.
"""

from __future__ import annotations

import os
import time

import redis

from offload import Offload

REDIS_URL = os.environ.get("OFFLOAD_CLUSTER_REDIS", "redis://127.0.0.1:6379/0")
#: The broker: the Redis server above, or RabbitMQ (then Redis keeps results).
BROKER_URL = os.environ.get("OFFLOAD_CLUSTER_BROKER", REDIS_URL)
#: Seconds before a silent worker's messages are handed to another one (Redis).
VISIBILITY_TIMEOUT = 5
#: RabbitMQ: seconds between heartbeats; a worker silent for two is dropped
#: and its unacknowledged messages go to another one. Workers send them;
#: a submitting process does not, so it keeps the broker's default.
HEARTBEAT = 2

config = {
    "CELERY_BROKER_URL": BROKER_URL,
    "CELERY_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": VISIBILITY_TIMEOUT},
    "CELERY_TASK_DEFAULT_QUEUE": "cluster",
    "OFFLOAD_DATA_DIR": os.environ.get("OFFLOAD_CLUSTER_DATA_DIR", "/tmp/offload-cluster"),
}
if BROKER_URL.startswith("amqp"):
    config["CELERY_RESULT_BACKEND"] = REDIS_URL
    config["CELERY_BROKER_TRANSPORT_OPTIONS"] = {}
    if os.environ.get("OFFLOAD_CLUSTER_HOST"):
        config["CELERY_BROKER_HEARTBEAT"] = HEARTBEAT
off = Offload(config)


def _counter() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=2)


def host() -> str:
    """The name of the host this runs on."""
    return os.environ.get("OFFLOAD_CLUSTER_HOST", "?")


def _note(command: str, *args: object) -> None:
    # A host cut off keeps trying (its link may come back): a task never
    # fails for want of its bookkeeping.
    deadline = time.monotonic() + 120
    while True:
        try:
            getattr(_counter(), command)(*args)
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def work(token: str, index: int, seconds: float = 0.0) -> str:
    """Task ``index`` of run ``token``: noted as started, ``seconds`` of work, counted."""
    name = host()
    _note("hset", f"started:{token}", str(index), name)
    time.sleep(seconds)
    _note("hincrby", f"runs:{token}", f"{index}@{name}", 1)
    return name
