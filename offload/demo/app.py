"""The ledger demo: a plain WSGI app whose totals are computed on a worker.

It is seed 001's Pyramid sample app without Pyramid or Redis: ``/append``
adds an integer to a ledger, ``/total`` queues a task that totals it and
answers the task id, ``/result`` answers the total once the task is done.
The ledger is a sqlite file next to the embedded broker's, so the web process
and the worker process share it with nothing installed.

A worker for it is ``python -m celery -A offload.demo.app worker``; the
settings come from the environment (``OFFLOAD_DEMO_DATA_DIR``) so that the web
process and its workers agree on where the data lives.
"""

from __future__ import annotations

import html
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from offload import Offload, OffloadError, progress
from offload.web import TaskAPI

__all__ = ["DATA_DIR_ENV", "api", "application", "default_data_dir", "off", "reset_ledger", "total"]

#: The environment variable naming the demo's data folder.
DATA_DIR_ENV = "OFFLOAD_DEMO_DATA_DIR"

#: A total never sleeps longer than this: a worker is not to be parked for days.
MAX_DELAY = 300.0

# sqlite stores 64-bit integers; anything larger is refused with a 400.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def default_data_dir() -> str:
    """Where the demo keeps its broker, results and ledger.

    ``$OFFLOAD_DEMO_DATA_DIR`` when set; otherwise one folder per user under
    the system temp folder. Not the current directory: ``offload demo`` run
    from inside a project must not leave an ``instance/`` folder behind, and
    a fixed path (rather than a fresh temp dir) lets a worker process find the
    same files and lets the ledger survive a restart of the demo.
    """
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return os.path.abspath(configured)
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return os.path.join(tempfile.gettempdir(), f"offload-demo-{user}")


def demo_config(data_dir: str) -> dict[str, Any]:
    """The demo's settings: the embedded broker under ``data_dir``, one small worker."""
    return {
        "OFFLOAD_DATA_DIR": data_dir,
        # Only the demo's own functions may run (not the whole offload package).
        "OFFLOAD_ALLOW": ["offload.demo.app"],
        "CELERY_WORKERS": {"demo": {"concurrency": 2, "loglevel": "warning"}},
    }


off = Offload(demo_config(default_data_dir()), name=__name__)
#: The Celery app, for ``celery -A offload.demo.app worker``.
celery = off.celery


# The ledger ----------------------------------------------------------------


def _ledger() -> sqlite3.Connection:
    """A connection to the ledger file (one per call: views run in many threads)."""
    data_dir = off.settings.data_dir or default_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    db = sqlite3.connect(os.path.join(data_dir, "ledger.sqlite3"), timeout=10)
    # WAL: the worker's reads never block the web process's appends.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY, value INTEGER NOT NULL)")
    return db


def reset_ledger() -> None:
    """Empty the ledger: each ``offload demo`` starts on a fresh one unless told to keep it."""
    db = _ledger()
    try:
        with db:
            db.execute("DELETE FROM ledger")
    finally:
        db.close()


def append_value(value: int) -> None:
    """Append one integer to the ledger."""
    db = _ledger()
    try:
        with db:
            db.execute("INSERT INTO ledger (value) VALUES (?)", (value,))
    finally:
        db.close()


@off.task(expose=True)
def total(delay: float = 0.0) -> int:
    """Sleep ``delay`` seconds (a stand-in for slow work), then total the ledger.

    Progress is reported while it waits, so the page can show it live.
    """
    delay = min(max(float(delay), 0.0), MAX_DELAY)
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < delay:
        progress(round(elapsed, 1), delay, message="working")
        time.sleep(min(0.1, delay - elapsed))
    progress(delay, delay, message="totalling")
    db = _ledger()
    try:
        # Summed in Python: sqlite's SUM() fails on 64-bit overflow.
        return sum(value for (value,) in db.execute("SELECT value FROM ledger"))
    finally:
        db.close()


# The web app ---------------------------------------------------------------


class _BadRequest(Exception):
    """The request is malformed; the message is the 400 body."""


StartResponse = Callable[..., Any]

_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>offload demo: the ledger</title>
<link rel="stylesheet" href="/offload/static/offload.css"></head>
<body class="offload-ui">
<header class="topbar"><a class="brand" href="/"><span class="logo" aria-hidden="true">◆</span> offload demo</a>
<a href="/offload/dashboard" id="dashboard-link">Dashboard</a></header>
<main class="page">
<h1>The ledger</h1>
<p>A ledger of integers, totalled by a background task on a local Celery
worker (embedded broker, data in <code>{data_dir}</code>).</p>
<ul>
<li><a href="/append?value=10">/append?value=10</a>: append an integer to the ledger.</li>
<li><a href="/total?delay=5">/total?delay=5</a>: queue a task that waits
<code>delay</code> seconds, then totals the ledger; answers the task id.</li>
<li><code>/result?id=&lt;task id&gt;</code>: the total once the task is done,
else <code>Pending...</code>.</li>
</ul>
<p>From a shell:</p>
<pre>curl '{base}/append?value=10'
curl '{base}/append?value=32'
id=$(curl -s '{base}/total?delay=2')
curl "{base}/result?id=$id"    # Pending..., then 42</pre>
<h2>Live</h2>
<p>The same total, started from this page with <code>offload.js</code> over the
task API at <code>/offload</code>, its progress followed as it runs.</p>
<p><label>delay <input id="delay" type="number" value="3" min="0" max="300" step="0.5"></label>
<button id="start">Start a total</button></p>
<div id="bar"></div>
<p id="total"></p>
<h2>Watch it</h2>
<p>The <a href="/offload/dashboard">dashboard</a> shows the worker, the queue and every
task as it runs, live; <a href="/offload/metrics">/offload/metrics</a> the same numbers for Prometheus.</p>
</main>
<script src="/offload/static/offload.js"></script>
<script>
  const api = new Offload("/offload");
  document.getElementById("start").addEventListener("click", async function () {{
    const out = document.getElementById("total");
    const holder = document.getElementById("bar");
    holder.textContent = "";
    out.textContent = "";
    const bar = Offload.progressBar(holder);
    try {{
      const id = await api.submit("total", [Number(document.getElementById("delay").value)]);
      const last = await api.follow(id, bar.update);
      out.textContent = last.error ? "failed: " + last.error.message : "total: " + last.result;
    }} catch (err) {{
      out.textContent = "error: " + err.message;
    }}
  }});
</script>
</body></html>
"""


def _param(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _append(query: dict[str, list[str]]) -> str:
    raw = _param(query, "value")
    if raw is None:
        raise _BadRequest("Must include `value`.")
    try:
        value = int(raw.strip())
    except ValueError:
        raise _BadRequest("`value` must be an integer.") from None
    if not _INT_MIN <= value <= _INT_MAX:
        raise _BadRequest("`value` must be a 64-bit integer (between -2**63 and 2**63-1).")
    append_value(value)
    return "Done.\n"


def _total(query: dict[str, list[str]]) -> str:
    raw = _param(query, "delay")
    try:
        delay = float(raw) if raw is not None and raw.strip() else 0.0
    except ValueError:
        raise _BadRequest("`delay` must be a float.") from None
    if not math.isfinite(delay) or not 0 <= delay <= MAX_DELAY:
        raise _BadRequest(f"`delay` must be a number of seconds between 0 and {MAX_DELAY:g}.")
    future = total.submit(delay)
    return f"{future.id}\n"


def _result(query: dict[str, list[str]]) -> str:
    task_id = (_param(query, "id") or "").strip()
    if not task_id:
        raise _BadRequest("Must include `id` (the task id /total answered).")
    # A one-shot look-up, as the seed does: a Future would keep watching an
    # id nobody waits on (and a mistyped id stays PENDING for ever).
    result = off.celery.AsyncResult(task_id)
    if not result.ready():
        return "Pending...\n"
    if result.successful():
        return f"{result.result}\n"
    return f"Failed: {result.result!r}\n"


_ROUTES: dict[str, Callable[[dict[str, list[str]]], str]] = {
    "/append": _append,
    "/total": _total,
    "/result": _result,
}


def _respond(start_response: StartResponse, status: str, body: str,
             content_type: str = "text/plain; charset=utf-8",
             extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    data = body.encode("utf-8")
    headers = [("Content-Type", content_type), ("Content-Length", str(len(data)))]
    start_response(status, headers + list(extra))
    return [data]


#: The task API (offload.web) under /offload: the live total of the index page,
#: and the dashboard (loopback clients only, as the demo itself listens).
api = TaskAPI(off, prefix="/offload", dashboard=True)


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The demo's WSGI app: ``/``, ``/append``, ``/total``, ``/result``, and the task API at ``/offload``."""
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO") or "/"
    if path == api.prefix or path.startswith(api.prefix + "/"):
        return api.wsgi(environ, start_response)
    if method not in ("GET", "HEAD"):
        return _respond(start_response, "405 Method Not Allowed", "Use GET.\n",
                        extra=[("Allow", "GET, HEAD")])
    if path == "/":
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME')}:{environ.get('SERVER_PORT')}"
        page = _INDEX.format(base=html.escape(f"http://{host}"),
                             data_dir=html.escape(off.settings.data_dir or ""))
        return _respond(start_response, "200 OK", page, "text/html; charset=utf-8")
    view = _ROUTES.get(path)
    if view is None:
        return _respond(start_response, "404 Not Found",
                        f"No page at {path}; try /, /append, /total or /result.\n")
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    try:
        return _respond(start_response, "200 OK", view(query))
    except _BadRequest as exc:
        return _respond(start_response, "400 Bad Request", f"{exc}\n")
    except OffloadError as exc:  # e.g. BrokerUnavailable: say so, not a bare 500
        return _respond(start_response, "503 Service Unavailable", f"{exc}\n")
