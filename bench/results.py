"""How many results per second one process's result hub takes in.

A writer process stores ``--results`` (20,000) results the way a worker's
chunk flushes them (``offload.dispatch.store_results``, 128 a batch) while
this process follows each with an ``offload.Future`` (ids from
``off.hub.new_task_ids``, as ``map`` gets them) and waits for all. Printed
per round: the wall-clock rate (bounded by the writer when the hub keeps
up) and this process's CPU time, as results per CPU-second: what one core
of the client can take in. On Redis (db 11) and on the embedded broker.

Run from the repository root: ``python bench/results.py [--results 20000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

from celery import states

from offload import Offload
from offload.dispatch import store_results
from offload.futures import Future

REDIS_URL = os.environ.get("OFFLOAD_BENCH_RESULTS_REDIS", "redis://127.0.0.1:6379/11")
BATCH = 128


def _config(kind: str, data_dir: str) -> dict[str, object]:
    config: dict[str, object] = {"OFFLOAD_ALLOW": ["results"]}
    if kind == "redis":
        config["CELERY_BROKER_URL"] = REDIS_URL
    else:
        config["OFFLOAD_DATA_DIR"] = data_dir
    return config


def writer(config: dict[str, object]) -> None:
    """The worker's part: for each line of ids on stdin, store their results."""
    backend = Offload(config).celery.backend
    for line in sys.stdin:
        ids = json.loads(line)
        for start in range(0, len(ids), BATCH):
            store_results(backend, [(i, states.SUCCESS, True, None) for i in ids[start:start + BATCH]])
        print("written", flush=True)


def run(kind: str, count: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="offload-bench-results-") as data_dir:
        config = _config(kind, data_dir)
        off = Offload(config)
        proc = subprocess.Popen([sys.executable, __file__, "--writer", json.dumps(config)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            for round_no in range(rounds):
                ids = off.hub.new_task_ids(count)
                futures = [Future(task_id, app=off.celery) for task_id in ids]
                Future.follow_all(futures, off.hub)
                time.sleep(0.3)  # the hub has taken the new ids
                started, cpu = time.perf_counter(), time.process_time()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(ids) + "\n")
                proc.stdin.flush()
                done, not_done = concurrent.futures.wait(futures, timeout=300)
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                proc.stdout.readline()
                assert not not_done, f"{len(not_done)} results never arrived"
                print(f"{kind:>8} round {round_no + 1}: {count:,} results in {wall:.2f} s = "
                      f"{count / wall:,.0f}/s; client CPU {cpu:.2f} s = {count / cpu:,.0f} results "
                      f"per CPU-second", flush=True)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=20_000, help="results per round (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per broker (%(default)s)")
    parser.add_argument("--writer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writer:
        writer(json.loads(args.writer))
        return 0
    for kind in ("redis", "embedded"):
        run(kind, args.results, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
