"""Apps for the crash tests: short Redis visibility timeout, executions tallied in Redis."""

from __future__ import annotations

import os
import time

import redis

from testapp import Offload, settings, test_id

TALLY_DB = 15


def tally(token: str, index: int, seconds: float = 0.0) -> int:
    """Count one execution of task ``index`` of run ``token``, after ``seconds``."""
    time.sleep(seconds)
    client = redis.Redis(host="127.0.0.1", port=6379, db=TALLY_DB)
    client.hincrby(f"tally:{token}", str(index), 1)
    client.expire(f"tally:{token}", 3600)
    return os.getpid()


def make(kind: str) -> Offload:
    config = {**settings(kind), "CELERY_TASK_DEFAULT_QUEUE": f"offload-reliable-{kind}-{test_id()}"}
    if kind == "redis":
        config["CELERY_BROKER_TRANSPORT_OPTIONS"] = {"visibility_timeout": 4}
    return Offload(config)
