"""offload's Redis transport (``offload-redis://``) against kombu's (``redis://``), side by side in one run.

Two plain Celery apps that differ only in their broker URL's transport, with
offload's settings (``RELIABILITY_DEFAULTS``: late acks, prefetch 1, ...; and
offload's Redis transport options), on ``redis://127.0.0.1:6379/13`` unless
``OFFLOAD_BENCH_REDIS`` says otherwise, each with one local worker
(``celery worker -c 2``) on a queue of its own, both started before the first
round and kept running.

For each, ``--tasks`` (2,000) no-ops per round: the enqueue rate (``delay()``
calls per second) and the end-to-end rate (first ``delay()`` to last result).
Rounds alternate the order; the median of ``--rounds`` is reported, with the
ratios offload-redis / redis (target: >= 0.95 for both). Before the workers
start, one pass per transport measures the enqueue path alone.

Run from the repository root: ``python bench/redis_transport.py [--tasks 2000] [--rounds 5]``.
This file is also the workers' app module (``celery -A redis_transport:<app> worker``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from celery import Celery
from celery.result import ResultSet

from _workers import stop_worker
import offload  # noqa: F401  (registers the offload-redis:// transport alias)
from offload.core import REDIS_TRANSPORT_DEFAULTS, RELIABILITY_DEFAULTS

HERE = os.path.dirname(os.path.abspath(__file__))
REDIS = os.environ.get("OFFLOAD_BENCH_REDIS", "redis://127.0.0.1:6379/13")
RUN_ID = os.environ.setdefault("OFFLOAD_BENCH_REDIS_RUN", uuid.uuid4().hex[:8])
SCHEMES = ("redis", "offload-redis")
QUEUES = {scheme: f"bench-transport-{scheme}-{RUN_ID}" for scheme in SCHEMES}


def noop() -> None:
    """The task: nothing, so that only the machinery is measured."""
    return None


def _app(scheme: str) -> Celery:
    broker = scheme + REDIS[REDIS.index("://"):]
    app = Celery(f"bench-{scheme}", broker=broker, backend=REDIS, set_as_current=False)
    app.conf.update({**RELIABILITY_DEFAULTS, "task_default_queue": QUEUES[scheme],
                     "broker_transport_options": dict(REDIS_TRANSPORT_DEFAULTS)})
    return app


stock = _app("redis")
atomic = _app("offload-redis")
TASKS = {app.main: app.task(name="bench.noop", shared=False)(noop) for app in (stock, atomic)}
APP_ATTRS = {"redis": "stock", "offload-redis": "atomic"}
APPS = {"redis": stock, "offload-redis": atomic}


def start_worker(scheme: str, log_dir: str) -> subprocess.Popen[bytes]:
    """One ``celery worker -c 2`` for ``scheme``, its output in a log file (never a pipe)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    log = open(os.path.join(log_dir, f"worker-{scheme}.log"), "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", f"redis_transport:{APP_ATTRS[scheme]}", "worker",
         "-c", "2", "-Q", QUEUES[scheme], "-n", f"bench-{scheme}-{RUN_ID}@%h", "-l", "warning",
         "--without-gossip", "--without-mingle"],
        cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_pass(scheme: str, n: int) -> tuple[float, float]:
    task = TASKS[APPS[scheme].main]
    started = time.perf_counter()
    results = [task.delay() for _ in range(n)]
    submitted = time.perf_counter()
    ResultSet(results, app=task.app).join(timeout=300)  # raises if one failed
    return submitted - started, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per pass (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="passes per transport (default: %(default)s)")
    args = parser.parse_args(argv)

    enqueue: dict[str, list[float]] = {scheme: [] for scheme in SCHEMES}
    e2e: dict[str, list[float]] = {scheme: [] for scheme in SCHEMES}
    alone: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="offload-bench-transport-") as logs:
        queued: dict[str, list[Any]] = {}
        for scheme in SCHEMES:
            task = TASKS[APPS[scheme].main]
            handles = [task.delay() for _ in range(50)]  # connections up
            started = time.perf_counter()
            handles += [task.delay() for _ in range(args.tasks)]
            alone[scheme] = args.tasks / (time.perf_counter() - started)
            queued[scheme] = handles
        workers = {scheme: start_worker(scheme, logs) for scheme in SCHEMES}
        try:
            for scheme in SCHEMES:
                ResultSet(queued[scheme], app=APPS[scheme]).join(timeout=300)
            order = list(SCHEMES)
            for round_no in range(args.rounds):
                for scheme in order:
                    gc.collect()
                    submit_s, total_s = run_pass(scheme, args.tasks)
                    enqueue[scheme].append(args.tasks / submit_s)
                    e2e[scheme].append(args.tasks / total_s)
                    print(f"round {round_no + 1} {scheme:>13}: enqueue {enqueue[scheme][-1]:7.0f}/s"
                          f"  end-to-end {e2e[scheme][-1]:6.0f}/s", flush=True)
                order.reverse()
        finally:
            for proc in workers.values():
                stop_worker(proc)

    med = {s: (statistics.median(enqueue[s]), statistics.median(e2e[s])) for s in SCHEMES}
    print(f"\n{args.tasks} no-op tasks, one worker (-c 2) per transport, median of {args.rounds} rounds")
    print(f"{'':>14} {'enqueue/s':>10} {'end-to-end/s':>13} {'enqueue alone/s':>16}")
    for scheme, (enq, end) in med.items():
        print(f"{scheme:>14} {enq:10.0f} {end:13.0f} {alone[scheme]:16.0f}")
    print(f"offload-redis / redis: enqueue {med['offload-redis'][0] / med['redis'][0]:.2f}"
          f"  end-to-end {med['offload-redis'][1] / med['redis'][1]:.2f}"
          f"  (enqueue alone, no worker running: {alone['offload-redis'] / alone['redis']:.2f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    import redis_transport  # the module the workers import, not __main__

    raise SystemExit(redis_transport.main())
