"""Seed 002 ("Submitting Task to Workers", "Working with Futures", "Status
Updates") run as written, with ``off`` for ``celery``, on every broker."""

from __future__ import annotations

import concurrent.futures

import pytest

from conftest import wait_until
from testapp import add, crunch, sleep_then


def test_submitting_tasks_to_workers(off):
    assert off.submit(add, 1, 2).result(timeout=30) == 3
    assert off.submit(add, 1, y=2).result(timeout=30) == 3
    assert off.submit(add, x=1, y=2).result(timeout=30) == 3


def test_map_over_an_iterator(off):
    futures = off.map(add, iter([[1, 2], [3, 4], [5, 6]]))
    assert [future.result(timeout=30) for future in futures] == [3, 7, 11]


def test_future_api(off):
    # >>> future = celery.submit(add, 1, 2); future.running(); future.done()
    future = off.submit(sleep_then, 1.0, "slept")
    assert not future.done()
    assert wait_until(future.running, 30, interval=0.01)
    assert future.running() and not future.done()
    assert future.result(timeout=30) == "slept"
    assert future.done() and not future.running() and not future.cancelled()
    assert future.exception() is None


def test_cancel_and_cancelled(off):
    # "future.cancel(); future.cancelled()  # True", for a task not yet started.
    busy = [off.submit(sleep_then, 1.5) for _ in range(2)]
    future = off.submit(add, 1, 2)
    assert future.cancel() is True
    assert future.cancelled()
    for other in busy:
        other.result(timeout=30)


def test_done_callback_without_result_call(off):
    import threading

    called = threading.Event()
    seen = []

    def callback():
        called.set()

    def callback_with_future(fut):
        seen.append(fut.result())

    future = off.submit(add, 2, 2)
    future.add_done_callback(callback)
    future.add_done_callback(callback_with_future)
    assert called.wait(30)
    assert concurrent.futures.wait([future], timeout=30).done == {future}
    assert seen == [4]


def test_status_updates(off):
    future = off.submit(crunch, 20, 0.02)
    assert future.result(timeout=30) is True
    assert future.state == "SUCCESS"


@pytest.mark.parametrize("n", [3])
def test_as_completed(off, n):
    futures = [off.submit(add, i, i) for i in range(n)]
    results = sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=30))
    assert results == [0, 2, 4]
