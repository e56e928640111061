"""Writes of one process while another sweeps many expired results (the embedded results file).

A sweeper process deletes ``--results`` (200,000) expired results the way
a worker's sweep does (``SQLiteBackend.cleanup``: 2000 a transaction, back
to back), while this process writes one result every 5 ms, as submits
marking their tasks would. Printed per round: how long the sweep took,
how many writes got in meanwhile and the longest of them. Side by side in
each round: offload's writers' turns as they are, and with a writer that
takes the turn again at once never stepping aside for a waiter
(``WriterTurns.STARVED`` out of reach), which is how they were before.

Run from the repository root: ``python bench/sweep.py [--results 200000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

from celery import Celery

from offload.transport._sqlite import WriterTurns

WRITE_EVERY = 0.005
#: How long a waiter waits before a writer coming back steps aside for it (offload's own value).
STARVED = WriterTurns.STARVED


def _backend(path: str):
    app = Celery("sweep-bench", set_as_current=False)
    app.conf.result_backend = f"sqlite:///{path}"
    return app.backend


def _sweep(path: str, fair: bool, started, took) -> None:
    if not fair:
        WriterTurns.STARVED = float("inf")
    backend = _backend(path)
    started.set()
    begun = time.monotonic()
    backend.cleanup()
    took.value = time.monotonic() - begun


def _fill(path: str, count: int):
    """The backend this process writes with, its file holding ``count`` expired results.

    Filled through it, so that its own sweep is not due on its first write:
    the other process is the one sweeping.
    """
    backend = _backend(path)
    for start in range(0, count, 5000):
        backend.set_many([(f"expired-{i}", "x" * 200) for i in range(start, min(start + 5000, count))])
    backend._conn.execute("UPDATE results SET expires = 1")
    return backend


def one(count: int, fair: bool) -> tuple[float, int, float]:
    """(sweep seconds, writes during it, longest write in ms)."""
    WriterTurns.STARVED = STARVED if fair else float("inf")
    folder = tempfile.mkdtemp(prefix="offload-sweep-")
    path = os.path.join(folder, "results.sqlite3")
    backend = _fill(path, count)
    started, took = multiprocessing.Event(), multiprocessing.Value("d", 0.0)
    sweeper = multiprocessing.Process(target=_sweep, args=(path, fair, started, took))
    sweeper.start()
    started.wait(60)
    writes, longest = 0, 0.0
    while sweeper.is_alive():
        begun = time.monotonic()
        backend.set(f"live-{writes}", "v")
        longest = max(longest, time.monotonic() - begun)
        writes += 1
        time.sleep(WRITE_EVERY)
    sweeper.join()
    return took.value, writes, longest * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=200_000, help="expired results to sweep")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    multiprocessing.set_start_method("spawn")
    print(f"{'round':>5} {'writers':<14} {'sweep s':>8} {'writes':>7} {'longest ms':>11}")
    for round_no in range(1, args.rounds + 1):
        order = (True, False) if round_no % 2 else (False, True)
        for fair in order:
            took, writes, longest = one(args.results, fair)
            name = "step aside" if fair else "never step"
            print(f"{round_no:>5} {name:<14} {took:>8.2f} {writes:>7} {longest:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
