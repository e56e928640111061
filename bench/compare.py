"""offload against Celery, Huey and Dramatiq: one command, one run, same Redis.

Every system gets one worker with 2 worker processes on the same local Redis
(``redis://127.0.0.1:6379/13`` unless ``OFFLOAD_BENCH_COMPARE_REDIS`` says
otherwise; queues named after this run), all started before the first pass
and kept running. Then, alternating the systems' order each round:

* throughput, for ``--noop`` (10,000) no-op tasks and ``--spin`` (2,000)
  tasks of 1 ms CPU work: the enqueue rate (calls sent per second) and the
  end-to-end rate (first call sent to last result read), for offload
  ``map`` (default chunking, ``--chunksize`` (100), and one message per
  call), offload's ``submit`` loop, ``executor.map``, a raw Celery
  ``.delay()`` loop, a raw Celery ``group`` (Celery's own code, with the
  settings offload gives its workers), Huey and Dramatiq; offload's
  ``map`` (default chunking) and ``submit`` also on the embedded broker;
* latency: the round trip of a single task (send, wait for its result),
  median and p99 over ``--latency`` (500), for offload on Redis and on the
  embedded broker, and raw Celery on Redis.

The medians of ``--rounds`` rounds are printed as Markdown tables, with
offload ``map``'s (default chunking) ratio to each peer, then the ratios
offload aims for (``GOALS``: map against Celery and Huey, submit against
``.delay()`` both ways, the embedded broker against Celery on Redis). Peers come from the ``bench`` extra
(``pip install -e '.[bench]'``).

Run from the repository root: ``python bench/compare.py [--rounds 1]``.
This file is also the workers' app module (``celery -A compare:<app>``,
``huey_consumer compare.huey``, ``dramatiq compare``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
from celery import Celery, group
from celery.result import ResultSet
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend as DramatiqResults
from huey import RedisHuey

from _workers import stop_worker
from offload import Offload
from offload.core import REDIS_TRANSPORT_DEFAULTS, RELIABILITY_DEFAULTS

HERE = os.path.dirname(os.path.abspath(__file__))
REDIS_URL = os.environ.get("OFFLOAD_BENCH_COMPARE_REDIS", "redis://127.0.0.1:6379/13")
# One set of queues per run; the workers read the same id from the environment.
RUN_ID = os.environ.setdefault("OFFLOAD_BENCH_COMPARE_RUN", uuid.uuid4().hex[:8])
DATA_DIR = os.environ.setdefault("OFFLOAD_BENCH_COMPARE_DATA", tempfile.mkdtemp(prefix="offload-compare-"))


def noop(i: int) -> bool:
    """Nothing: only the machinery is measured (True: Huey stores no None)."""
    return True


def spin(i: int) -> bool:
    """1 ms of CPU work."""
    end = time.perf_counter() + 0.001
    while time.perf_counter() < end:
        pass
    return True


# The systems, each an app the workers import from this module ------------------

# Results kept 10 minutes (all the apps): a run leaves nothing that slows the next.
off = Offload({
    "CELERY_BROKER_URL": REDIS_URL, "CELERY_RESULT_EXPIRES": 600,
    "CELERY_TASK_DEFAULT_QUEUE": f"compare-offload-{RUN_ID}",
    "OFFLOAD_ALLOW": ["compare"],
}, name="compare-offload")
offload_celery = off.celery

embedded = Offload({
    "OFFLOAD_DATA_DIR": os.path.join(DATA_DIR, "embedded"), "CELERY_RESULT_EXPIRES": 600,
    "OFFLOAD_ALLOW": ["compare"],
}, name="compare-embedded")
embedded_celery = embedded.celery

raw = Celery("compare-raw", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
# Celery's own code with the settings offload gives its workers (late acks,
# task events, STARTED states...), but not offload's classes: Celery's own
# consumer, not offload.intake's.
raw.conf.update({
    **{key: value for key, value in RELIABILITY_DEFAULTS.items() if key != "worker_consumer"},
    "broker_transport_options": dict(REDIS_TRANSPORT_DEFAULTS),
    "task_serializer": "json", "result_serializer": "json", "accept_content": ["json"],
    "task_default_queue": f"compare-raw-{RUN_ID}", "result_expires": 600,
})
raw_noop = raw.task(name="compare.noop", shared=False)(noop)
raw_spin = raw.task(name="compare.spin", shared=False)(spin)

huey = RedisHuey(f"compare-huey-{RUN_ID}", url=REDIS_URL)
huey_noop = huey.task(name="noop")(noop)
huey_spin = huey.task(name="spin")(spin)

dramatiq_broker = RedisBroker(url=REDIS_URL, namespace=f"compare-dramatiq-{RUN_ID}")
dramatiq_broker.add_middleware(Results(backend=DramatiqResults(
    url=REDIS_URL, namespace=f"compare-dramatiq-results-{RUN_ID}")))
dramatiq.set_broker(dramatiq_broker)
dramatiq_noop = dramatiq.actor(noop, actor_name="noop", store_results=True, max_retries=0)
dramatiq_spin = dramatiq.actor(spin, actor_name="spin", store_results=True, max_retries=0)

TASKS = {"noop": noop, "spin": spin}


# Workers ---------------------------------------------------------------------------

WORKERS = {
    "offload": ["-m", "celery", "-A", "compare:offload_celery", "worker", "-c", "2",
                "-l", "warning", "--without-gossip", "--without-mingle"],
    "embedded": ["-m", "celery", "-A", "compare:embedded_celery", "worker", "-c", "2",
                 "-l", "warning", "--without-gossip", "--without-mingle"],
    "raw": ["-m", "celery", "-A", "compare:raw", "worker", "-c", "2",
            "-l", "warning", "--without-gossip", "--without-mingle"],
    "huey": ["-m", "huey.bin.huey_consumer", "compare.huey", "-w", "2", "-k", "process", "-q"],
    "dramatiq": ["-m", "dramatiq", "compare", "--processes", "2", "--threads", "1"],
}


def start_worker(kind: str, log_dir: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    log = open(os.path.join(log_dir, f"worker-{kind}.log"), "ab")
    return subprocess.Popen([sys.executable, *WORKERS[kind]], cwd=HERE, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


# The contenders: each runs n calls of a task, returns (enqueue s, end-to-end s) ------

Pass = Callable[[str, int], tuple[float, float]]


def _futures(send: Callable[[], list[Any]]) -> tuple[float, float]:
    started = time.perf_counter()
    futures = send()
    sent = time.perf_counter()
    for future in futures:
        future.result(timeout=600)  # a failed call must not count as a fast one
    return sent - started, time.perf_counter() - started


def offload_map(app: Offload, chunksize: int | None) -> Pass:
    return lambda task, n: _futures(lambda: app.map(TASKS[task], range(n), chunksize=chunksize))


def offload_submit(app: Offload) -> Pass:
    return lambda task, n: _futures(lambda: [app.submit(TASKS[task], i) for i in range(n)])


def executor_map(task: str, n: int) -> tuple[float, float]:
    with off.executor() as ex:
        started = time.perf_counter()
        results = ex.map(TASKS[task], range(n))
        sent = time.perf_counter()
        for _ in results:
            pass
    return sent - started, time.perf_counter() - started


def celery_delay(task: str, n: int) -> tuple[float, float]:
    fn = raw_noop if task == "noop" else raw_spin
    started = time.perf_counter()
    results = [fn.delay(i) for i in range(n)]
    sent = time.perf_counter()
    ResultSet(results, app=raw).join(timeout=600)
    return sent - started, time.perf_counter() - started


def celery_group(task: str, n: int) -> tuple[float, float]:
    fn = raw_noop if task == "noop" else raw_spin
    started = time.perf_counter()
    result = group(fn.s(i) for i in range(n)).apply_async()
    sent = time.perf_counter()
    result.join(timeout=600)
    return sent - started, time.perf_counter() - started


def huey_loop(task: str, n: int) -> tuple[float, float]:
    fn = huey_noop if task == "noop" else huey_spin
    started = time.perf_counter()
    results = [fn(i) for i in range(n)]
    sent = time.perf_counter()
    for result in results:
        result.get(blocking=True, timeout=600)
    return sent - started, time.perf_counter() - started


def dramatiq_loop(task: str, n: int) -> tuple[float, float]:
    actor = dramatiq_noop if task == "noop" else dramatiq_spin
    started = time.perf_counter()
    messages = [actor.send(i) for i in range(n)]
    sent = time.perf_counter()
    for message in messages:
        message.get_result(block=True, timeout=600_000)
    return sent - started, time.perf_counter() - started


def contenders(chunksize: int) -> dict[str, tuple[str, Pass]]:
    """Name -> (the worker it needs, its pass)."""
    return {
        "offload map (default chunking)": ("offload", offload_map(off, None)),
        f"offload map (chunksize={chunksize})": ("offload", offload_map(off, chunksize)),
        "offload map (chunksize=1: a message per call)": ("offload", offload_map(off, 1)),
        "offload submit loop": ("offload", offload_submit(off)),
        "offload executor.map": ("offload", executor_map),
        "offload map, embedded (default chunking)": ("embedded", offload_map(embedded, None)),
        "offload submit loop, embedded": ("embedded", offload_submit(embedded)),
        "Celery .delay() loop": ("raw", celery_delay),
        "Celery group": ("raw", celery_group),
        "Huey": ("huey", huey_loop),
        "Dramatiq": ("dramatiq", dramatiq_loop),
    }


# Latency -------------------------------------------------------------------------------


def round_trips(systems: dict[str, Callable[[int], Any]], count: int) -> dict[str, list[float]]:
    """``count`` round trips of each system, taken in turn (a passing load hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for i in range(count):
        for name in (names if i % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            systems[name](i)
            times[name].append(time.perf_counter() - started)
    return times


LATENCY: dict[str, Callable[[int], Any]] = {
    "offload submit, Redis": lambda i: off.submit(noop, i).result(timeout=60),
    "offload map of 1 call, Redis": lambda i: off.map(noop, [i])[0].result(timeout=60),
    "offload submit, embedded": lambda i: embedded.submit(noop, i).result(timeout=60),
    "Celery .delay().get(), Redis": lambda i: raw_noop.delay(i).get(timeout=60),
}


# The run ---------------------------------------------------------------------------------


def _warm_up(passes: dict[str, tuple[str, Pass]], workers: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 120
    for name, (kind, run) in passes.items():
        while True:
            try:
                run("noop", 20)
                break
            except Exception as exc:
                if time.monotonic() > deadline or workers[kind].poll() is not None:
                    raise RuntimeError(f"{name}: the {kind} worker did not start ({exc!r}); "
                                       "see its log") from exc


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop", type=int, default=10_000, help="no-op tasks per pass (%(default)s)")
    parser.add_argument("--spin", type=int, default=2_000, help="1 ms tasks per pass (%(default)s)")
    parser.add_argument("--latency", type=int, default=500, help="single round trips (%(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, median reported (%(default)s)")
    parser.add_argument("--chunksize", type=int, default=100, help="offload map's chunksize (%(default)s)")
    args = parser.parse_args(argv)
    passes = contenders(args.chunksize)
    log_dir = tempfile.mkdtemp(prefix="offload-compare-logs-")
    workers = {kind: start_worker(kind, log_dir) for kind in WORKERS}
    try:
        _warm_up(passes, workers)
        figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
        names = list(passes)
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for task, n in (("noop", args.noop), ("spin", args.spin)):
                for name in order:
                    enqueue, total = passes[name][1](task, n)
                    figures.setdefault((task, name), []).append((_rate(n, enqueue), _rate(n, total)))
                    print(f"# {task} {name}: {n / enqueue:,.0f}/s enqueue, {n / total:,.0f}/s end to end",
                          file=sys.stderr, flush=True)
        latencies = round_trips(LATENCY, args.latency)
    finally:
        for proc in workers.values():
            stop_worker(proc)
    _report(args, names, figures, latencies)
    print(f"\n(worker logs: {log_dir})", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace, names: list[str],
            figures: dict[tuple[str, str], list[tuple[float, float]]],
            latencies: dict[str, list[float]]) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}: "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}; "
          f"{args.rounds} round(s), median shown.\n")
    chunked = names[0]
    for task, n in (("noop", args.noop), ("spin", args.spin)):
        label = "no-op" if task == "noop" else "1 ms CPU"
        print(f"{n:,} {label} tasks, 2 worker processes:\n")
        print("| system | enqueue /s | end to end /s | offload map's ratio (enqueue, end to end) |")
        print("|---|---:|---:|---:|")
        ours = figures[(task, chunked)]
        our_enqueue = statistics.median(e for e, _ in ours)
        our_total = statistics.median(t for _, t in ours)
        for name in names:
            rates = figures[(task, name)]
            enqueue = statistics.median(e for e, _ in rates)
            total = statistics.median(t for _, t in rates)
            ratio = "" if name == chunked else f"{our_enqueue / enqueue:.1f}x, {our_total / total:.1f}x"
            print(f"| {name} | {enqueue:,.0f} | {total:,.0f} | {ratio} |")
        print()
    _report_goals(names, figures)
    print(f"Single task round trip, {args.latency} in a row:\n")
    print("| system | median ms | p99 ms |")
    print("|---|---:|---:|")
    for name, times in latencies.items():
        ordered = sorted(times)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(f"| {name} | {statistics.median(ordered) * 1000:.2f} | {p99 * 1000:.2f} |")


#: The ratios offload aims for, end to end unless named: (label, ours, theirs,
#: which rate (0 enqueue, 1 end to end), goal). Printed after every run, so
#: that one run is compared with the next like with like.
GOALS = (
    ("map / Celery .delay() loop", "offload map (default chunking)", "Celery .delay() loop", 1, 20.0),
    ("map / Huey", "offload map (default chunking)", "Huey", 1, 5.0),
    ("submit / Celery .delay(), enqueue", "offload submit loop", "Celery .delay() loop", 0, 1.0),
    ("submit / Celery .delay()", "offload submit loop", "Celery .delay() loop", 1, 1.0),
    ("embedded submit / Celery .delay() on Redis", "offload submit loop, embedded", "Celery .delay() loop", 1, 1.5),
)


def _report_goals(names: list[str], figures: dict[tuple[str, str], list[tuple[float, float]]]) -> None:
    print("Goals, no-op tasks (median rates):\n")
    print("| ratio | measured | goal |")
    print("|---|---:|---:|")
    for label, ours, theirs, which, goal in GOALS:
        if ("noop", ours) not in figures or ("noop", theirs) not in figures:
            continue
        mine = statistics.median(rates[which] for rates in figures[("noop", ours)])
        other = statistics.median(rates[which] for rates in figures[("noop", theirs)])
        print(f"| {label} | {mine / other:.2f}x | {goal:.1f}x |")
    print()


if __name__ == "__main__":
    # Run the module the workers import, not __main__: offload sends
    # references to functions, and a worker cannot import __main__.
    sys.path.insert(0, HERE)
    import compare

    sys.exit(compare.main())
