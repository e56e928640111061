"""Seed 003's server side: a slow echo job behind a JSON-RPC API that a page on
another origin calls (through the CORS preflight) and polls on a timer.

The Offload runs on the embedded broker (files under ``$OFFLOAD_DATA_DIR`` or
./instance); ``serve.py`` starts a local worker, the API and the page.
"""

from __future__ import annotations

import os
import time

from offload import Offload, progress
from offload.web import TaskAPI

off = Offload({"OFFLOAD_DATA_DIR": os.environ.get("OFFLOAD_DATA_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "instance")})
celery = off.celery


@off.task(expose=True)
def echo(text: str, delay: float = 5.0) -> str:
    """Answer ``text`` after ``delay`` seconds (the seed's slow echo), reporting progress."""
    delay = max(0.0, min(float(delay), 60.0))
    steps = 10
    for step in range(steps):
        progress(step, steps, message="echoing")
        time.sleep(delay / steps)
    progress(steps, steps, message="echoed")
    return text


def make_api(page_origin: str) -> TaskAPI:
    """The task API, callable from the page's origin only."""
    return TaskAPI(off, prefix="/offload", cors_origins=[page_origin])
