"""``off.submit(noop)`` against raw Celery's ``noop.delay()``, side by side in one run.

On Redis (``redis://127.0.0.1:6379/13`` unless ``OFFLOAD_BENCH_SUBMIT_REDIS``
says otherwise), each contender gets one local worker (``celery worker -c 2``)
on a queue of its own, all started before the first round and kept running,
so every round compares the three under the same load:

* ``offload``: ``off.submit(noop)``, waited for with ``concurrent.futures.wait``;
* ``raw``: a plain ``celery.Celery`` app with the same broker, result backend,
  JSON and the settings offload applies (``RELIABILITY_DEFAULTS``: late acks,
  prefetch 1, track started, ...; and offload's Redis transport options),
  ``noop.delay()``, waited for with ``ResultSet(...).join()``;
* ``raw-defaults``: the same with Celery's defaults (early acks, prefetch 4).

For each, ``--tasks`` (2,000) no-ops per round: the enqueue rate (submissions
per second of the submit loop) and the end-to-end rate (first submit to last
result). Rounds alternate the order; the median of ``--rounds`` is reported,
with the ratios offload / raw (target: >= 0.95 for both). Before the workers
start, one pass per contender measures the submit path alone (nothing comes
back while submitting): the enqueue rate with a worker running also pays for
offload's watcher completing futures as results arrive, work raw Celery leaves
unread in its socket until ``join()``.

On RabbitMQ: ``OFFLOAD_BENCH_SUBMIT_BROKER=amqp://guest:guest@127.0.0.1:5672//``
(results by ``rpc://``; ``raw`` gets offload's RabbitMQ defaults: publisher
confirms, ``AMQP_TRANSPORT_DEFAULTS``). ``OFFLOAD_BENCH_SUBMIT_CONFIRM=0``
turns confirms off for ``offload`` and ``raw``, to measure what they cost.

Run from the repository root: ``python bench/submit.py [--tasks 2000] [--rounds 3]``.
This file is also the workers' app module (``celery -A submit:<app> worker``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.result import AsyncResult, ResultSet

from _workers import stop_worker
from offload import Offload
from offload.config import AMQP_PUBLISH_RETRY_POLICY, AMQP_TRANSPORT_DEFAULTS
from offload.core import REDIS_TRANSPORT_DEFAULTS, RELIABILITY_DEFAULTS

HERE = os.path.dirname(os.path.abspath(__file__))
REDIS_URL = os.environ.get("OFFLOAD_BENCH_SUBMIT_REDIS", "redis://127.0.0.1:6379/13")
BROKER_URL = os.environ.get("OFFLOAD_BENCH_SUBMIT_BROKER", REDIS_URL)
ON_AMQP = BROKER_URL.startswith(("amqp", "pyamqp"))
BACKEND_URL = "rpc://" if ON_AMQP else BROKER_URL
CONFIRM = os.environ.get("OFFLOAD_BENCH_SUBMIT_CONFIRM", "1") != "0"
TRANSPORT_OPTIONS = (dict(AMQP_TRANSPORT_DEFAULTS, confirm_publish=CONFIRM) if ON_AMQP
                     else dict(REDIS_TRANSPORT_DEFAULTS))
# One queue per contender and per run: leftovers of an interrupted run never
# meet this one. The workers get the same names through the environment.
RUN_ID = os.environ.setdefault("OFFLOAD_BENCH_SUBMIT_RUN", uuid.uuid4().hex[:8])
QUEUES = {kind: f"bench-submit-{kind}-{RUN_ID}" for kind in ("offload", "raw", "raw-defaults")}


def noop() -> None:
    """The task: nothing, so that only the machinery is measured."""
    return None


off = Offload({
    "CELERY_BROKER_URL": BROKER_URL,
    "CELERY_TASK_DEFAULT_QUEUE": QUEUES["offload"],
    "OFFLOAD_ALLOW": ["submit"],
    **({} if CONFIRM else {"CELERY_BROKER_TRANSPORT_OPTIONS": {"confirm_publish": False}}),
}, name="bench-offload")
offload_celery = off.celery


def _raw_app(name: str, queue: str, *, offload_settings: bool) -> Celery:
    app = Celery(name, broker=BROKER_URL, backend=BACKEND_URL, set_as_current=False)
    conf: dict[str, Any] = {
        "task_serializer": "json", "result_serializer": "json", "accept_content": ["json"],
        "task_default_queue": queue,
    }
    if offload_settings:
        conf = {**RELIABILITY_DEFAULTS, **conf, "broker_transport_options": TRANSPORT_OPTIONS}
        if ON_AMQP:
            conf["task_publish_retry_policy"] = dict(AMQP_PUBLISH_RETRY_POLICY)
    app.conf.update(conf)
    return app


raw = _raw_app("bench-raw", QUEUES["raw"], offload_settings=True)
raw_defaults = _raw_app("bench-raw-defaults", QUEUES["raw-defaults"], offload_settings=False)
raw_noop = raw.task(name="bench.noop", shared=False)(noop)
raw_defaults_noop = raw_defaults.task(name="bench.noop", shared=False)(noop)

#: The worker app (``-A submit:<attr>``) of each contender.
APP_ATTRS = {"offload": "offload_celery", "raw": "raw", "raw-defaults": "raw_defaults"}


# Workers -----------------------------------------------------------------------


def start_worker(kind: str, log_dir: str) -> subprocess.Popen[bytes]:
    """One ``celery worker -c 2`` for ``kind``, its output in a log file (never a pipe)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    log = open(os.path.join(log_dir, f"worker-{kind}.log"), "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", f"submit:{APP_ATTRS[kind]}", "worker",
         "-c", "2", "-Q", QUEUES[kind], "-n", f"bench-{kind}-{RUN_ID}@%h", "-l", "warning",
         "--without-gossip", "--without-mingle"],
        cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


# The contenders ----------------------------------------------------------------


def _offload_pass(n: int) -> tuple[float, float]:
    started = time.perf_counter()
    futures = [off.submit(noop) for _ in range(n)]
    submitted = time.perf_counter()
    done, not_done = concurrent.futures.wait(futures, timeout=300)
    finished = time.perf_counter()
    assert not not_done, f"{len(not_done)} offload tasks did not finish"
    for future in futures:
        future.result()  # a failed task must not count as a fast one
    return submitted - started, finished - started


def _raw_pass(task: Any) -> Callable[[int], tuple[float, float]]:
    def run(n: int) -> tuple[float, float]:
        started = time.perf_counter()
        results: list[AsyncResult] = [task.delay() for _ in range(n)]
        submitted = time.perf_counter()
        ResultSet(results, app=task.app).join(timeout=300)  # raises if one failed
        finished = time.perf_counter()
        return submitted - started, finished - started
    return run


CONTENDERS: dict[str, Callable[[int], tuple[float, float]]] = {
    "offload": _offload_pass,
    "raw": _raw_pass(raw_noop),
    "raw-defaults": _raw_pass(raw_defaults_noop),
}


def _purge() -> None:
    """Drop what an interrupted run left in this run's queues."""
    if ON_AMQP:
        return  # RabbitMQ: this run's queues do not exist yet (purging one would fail)
    for app, queue in ((offload_celery, QUEUES["offload"]), (raw, QUEUES["raw"]),
                       (raw_defaults, QUEUES["raw-defaults"])):
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)


def _warm_up(workers: dict[str, subprocess.Popen[bytes]]) -> None:
    """Wait until every worker has run tasks (connections, pools, imports warm)."""
    deadline = time.monotonic() + 60
    for kind, run in CONTENDERS.items():
        while True:
            try:
                run(20)
                break
            except Exception:
                if time.monotonic() > deadline or workers[kind].poll() is not None:
                    raise RuntimeError(f"the {kind} worker did not start; see its log") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per pass (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="passes per contender (default: %(default)s)")
    args = parser.parse_args(argv)

    enqueue: dict[str, list[float]] = {kind: [] for kind in CONTENDERS}
    e2e: dict[str, list[float]] = {kind: [] for kind in CONTENDERS}
    alone: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="offload-bench-submit-") as logs:
        _purge()
        # The submit path alone: no worker yet, so no results flow back while
        # submitting (offload's watcher only subscribes). The tasks wait in
        # their queues for the workers started next.
        queued: dict[str, list[Any]] = {}
        for kind in CONTENDERS:
            handles, started = [], time.perf_counter()
            submit_one = (lambda: off.submit(noop)) if kind == "offload" else (
                raw_noop.delay if kind == "raw" else raw_defaults_noop.delay)
            handles += [submit_one() for _ in range(50)]  # connections and threads up
            started = time.perf_counter()
            for _ in range(args.tasks):
                handles.append(submit_one())
            alone[kind] = args.tasks / (time.perf_counter() - started)
            queued[kind] = handles
        workers = {kind: start_worker(kind, logs) for kind in CONTENDERS}
        try:
            concurrent.futures.wait(queued["offload"], timeout=300)
            for kind in ("raw", "raw-defaults"):
                ResultSet(queued[kind]).join(timeout=300)
            _warm_up(workers)
            order = list(CONTENDERS)
            for round_no in range(args.rounds):
                for kind in order:
                    gc.collect()
                    submit_s, total_s = CONTENDERS[kind](args.tasks)
                    enqueue[kind].append(args.tasks / submit_s)
                    e2e[kind].append(args.tasks / total_s)
                    print(f"round {round_no + 1} {kind:>12}: enqueue {enqueue[kind][-1]:7.0f}/s"
                          f"  end-to-end {e2e[kind][-1]:6.0f}/s", flush=True)
                order.reverse()  # who goes first changes: neither side always gets a cold start
        finally:
            for proc in workers.values():
                stop_worker(proc)
            if ON_AMQP:  # RabbitMQ keeps durable queues: remove this run's
                with offload_celery.connection_for_write() as conn:
                    for queue in QUEUES.values():
                        conn.default_channel.queue_delete(queue)

    med = {kind: (statistics.median(enqueue[kind]), statistics.median(e2e[kind])) for kind in CONTENDERS}
    broker = "RabbitMQ" + (" (confirms)" if CONFIRM else " (no confirms)") if ON_AMQP else "Redis"
    print(f"\n{args.tasks} no-op tasks on {broker}, one worker (-c 2) each, median of {args.rounds} rounds")
    print(f"{'':>14} {'enqueue/s':>10} {'end-to-end/s':>13}")
    for kind, (enq, end) in med.items():
        print(f"{kind:>14} {enq:10.0f} {end:13.0f}")
    for base in ("raw", "raw-defaults"):
        print(f"offload / {base:<12}: enqueue {med['offload'][0] / med[base][0]:.2f}"
              f"  end-to-end {med['offload'][1] / med[base][1]:.2f}"
              f"  (submit path alone, no worker running: {alone['offload'] / alone[base]:.2f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    # Run the module the workers import, not __main__: off.submit sends
    # ``submit:noop``, which a worker can import, ``__main__:noop`` it cannot.
    import submit

    raise SystemExit(submit.main())
