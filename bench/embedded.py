"""The embedded sqlite broker against kombu's filesystem:// and Redis, in one run.

For each broker: one local worker with 2 pool processes, then

* throughput: 2,000 no-op tasks submitted with ``off.submit`` and waited for,
  end to end (first submit to last result);
* latency: 200 single tasks one after another, submit -> result, median.

Run: ``python bench/embedded.py [--tasks 2000] [--rounds 200] [--brokers sqlite,filesystem,redis]``.
This file is also the worker's app (``celery -A embedded``); the broker comes
from ``OFFLOAD_BENCH_BROKER`` so that the benchmark and its worker agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from _workers import stop_worker
from offload import Offload

HERE = os.path.dirname(os.path.abspath(__file__))
REDIS_URL = os.environ.get("OFFLOAD_BENCH_REDIS", "redis://127.0.0.1:6379/14")


def noop() -> None:
    return None


def settings(kind: str, data_dir: str, queue: str) -> dict[str, Any]:
    common: dict[str, Any] = {
        "OFFLOAD_DATA_DIR": data_dir,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "CELERY_CONTROL_EXCHANGE": queue,
        "OFFLOAD_ALLOW": ["embedded"],
        "CELERY_RESULT_EXPIRES": 600,  # a run leaves nothing that slows the next
    }
    if kind == "sqlite":
        return common  # nothing configured: the embedded default
    if kind == "filesystem":
        folder = os.path.join(data_dir, "fs")
        os.makedirs(folder, exist_ok=True)
        return {**common, "CELERY_BROKER_URL": "filesystem://",
                # kombu's default poll is 1 s (about 1 task/s/process with
                # late acks); 10 ms is filesystem:// at its best.
                "CELERY_BROKER_TRANSPORT_OPTIONS": {
                    "data_folder_in": folder, "data_folder_out": folder, "store_processed": False,
                    "polling_interval": float(os.environ.get("OFFLOAD_BENCH_FS_POLL", "0.01"))},
                # The results on the same (sqlite) backend, so only the broker differs.
                "CELERY_RESULT_BACKEND": "sqlite:///" + os.path.join(data_dir, "fs-results.db")}
    if kind == "redis":
        return {**common, "CELERY_BROKER_URL": REDIS_URL}
    raise ValueError(kind)


def make() -> Offload:
    kind = os.environ.get("OFFLOAD_BENCH_BROKER", "sqlite")
    return Offload(settings(kind, os.environ["OFFLOAD_BENCH_DIR"], os.environ["OFFLOAD_BENCH_QUEUE"]))


if "OFFLOAD_BENCH_BROKER" in os.environ:
    off = make()
    celery = off.celery


def start_worker(env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "embedded", "worker", "-c", "2", "-l", "warning",
         "--without-gossip", "--without-mingle", "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run(kind: str, tasks: int, rounds: int, root: str) -> dict[str, float]:
    data_dir = os.path.join(root, kind)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, OFFLOAD_BENCH_BROKER=kind, OFFLOAD_BENCH_DIR=data_dir,
               OFFLOAD_BENCH_QUEUE=queue,
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    os.environ.update({k: env[k] for k in ("OFFLOAD_BENCH_BROKER", "OFFLOAD_BENCH_DIR", "OFFLOAD_BENCH_QUEUE")})
    sys.modules.pop("embedded", None)
    import embedded  # this file, as the worker imports it

    bench_off: Offload = embedded.off
    worker = start_worker(env, os.path.join(root, f"worker-{kind}.log"))
    try:
        bench_off.submit(embedded.noop).result(timeout=60)  # the worker is up
        for _ in range(20):  # warm both pool processes
            bench_off.submit(embedded.noop).result(timeout=30)

        started = time.perf_counter()
        futures = [bench_off.submit(embedded.noop) for _ in range(tasks)]
        submitted = time.perf_counter() - started
        for future in futures:
            future.result(timeout=300)
        elapsed = time.perf_counter() - started

        latencies = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            bench_off.submit(embedded.noop).result(timeout=30)
            latencies.append(time.perf_counter() - t0)
    finally:
        stop_worker(worker)
    return {
        "throughput": tasks / elapsed,
        "submit_rate": tasks / submitted,
        "latency_median_ms": statistics.median(latencies) * 1000,
        "latency_p90_ms": statistics.quantiles(latencies, n=10)[-1] * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="no-op tasks for the throughput")
    parser.add_argument("--rounds", type=int, default=200,
                        help="single-task round trips timed for the latency median and p90 (at least 2)")
    parser.add_argument("--brokers", default="sqlite,filesystem,redis")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.rounds < 2:
        parser.error("--tasks must be at least 1 and --rounds at least 2")
    sys.path.insert(0, HERE)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as root:
        for kind in args.brokers.split(","):
            results[kind] = run(kind, args.tasks, args.rounds, root)
            r = results[kind]
            print(f"{kind:>10}: {r['throughput']:7.0f} tasks/s end to end "
                  f"(submit {r['submit_rate']:6.0f}/s), round trip median "
                  f"{r['latency_median_ms']:5.1f} ms, p90 {r['latency_p90_ms']:5.1f} ms", flush=True)
    if "sqlite" in results and "redis" in results:
        s, r = results["sqlite"], results["redis"]
        print(f"sqlite/redis: throughput {s['throughput'] / r['throughput']:.2f}x, "
              f"round-trip median {s['latency_median_ms'] / r['latency_median_ms']:.2f}x")
    if "sqlite" in results and "filesystem" in results:
        s, f = results["sqlite"], results["filesystem"]
        print(f"sqlite/filesystem: throughput {s['throughput'] / f['throughput']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
