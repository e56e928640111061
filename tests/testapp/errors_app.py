"""The app of the error-reporting tests: an Offload, its reporting, a WSGI app.

The test process builds it with :func:`make`; a worker process started with
``celery -A testapp.errors_app worker`` builds the same from the environment
(``ERRORS_TEST_BROKER``: embedded, redis or a redis:// URL;
``ERRORS_TEST_FOGBUGZ`` and ``ERRORS_TEST_WEBHOOK``: the fake servers;
``ERRORS_TEST_WINDOW``: the grouping window).
"""

from __future__ import annotations

import json
import os

import offload.errors
from offload import Offload
from offload.errors import ErrorReporter, FogBugz, Webhook

from testapp import settings


def config(broker: str) -> dict:
    if broker.startswith("redis://"):
        conf = settings("redis")
        conf["CELERY_BROKER_URL"] = broker
        conf.pop("CELERY_RESULT_BACKEND", None)
    else:
        conf = settings(broker)
    conf["CELERY_TASK_DEFAULT_QUEUE"] += "-errors"
    conf["OFFLOAD_DATA_DIR"] = os.environ.get("ERRORS_TEST_DATA_DIR") or conf["OFFLOAD_DATA_DIR"] + "-errors"
    return conf


def make(broker: str, fogbugz: str, webhook: str | None = None, window: float = 0.5) -> tuple:
    off = Offload(config(broker))
    sinks: list = [FogBugz(fogbugz, user="Bug Reporter", project="Inbox", area="Undecided")]
    if webhook:
        sinks.append(Webhook(webhook, headers={"X-Hook": "yes"}, timeout=5))
    errors = offload.errors.setup(off, sinks, window=window, retry_delay=0.2, max_retry_delay=1,
                                  give_up_after=3, sweep_interval=0.5, scrub_also=["pin"],
                                  app_version="1.2.3")

    @off.task(name="errors_app.registered_fails")
    def registered_fails(x, password=None):
        raise KeyError(f"no such item {x}")

    return off, errors


def boom(environ, start_response):
    """The test WSGI app: /ok answers, /zero, /key, /value and /stream fail."""
    path = environ.get("PATH_INFO", "")
    if path == "/ok":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"fine"]
    if path == "/zero" or path.startswith("/zero/"):
        return [str(1 / 0).encode()]
    if path == "/parse":
        # Two different errors of one type in one function: two reports.
        if "currency" in environ.get("QUERY_STRING", ""):
            raise ValueError("unknown currency")
        raise ValueError("missing field 'amount'")
    if path == "/key":
        return [{}["missing"]]
    if path == "/json":
        # An app that parses its body: nested 100,000 deep, json raises RecursionError.
        size = int(environ.get("CONTENT_LENGTH") or 0)
        return [json.dumps(json.loads(environ["wsgi.input"].read(size))).encode()]
    if path == "/bigint":
        raise ValueError(10 ** 5000)  # str() of it raises: Python refuses 5,000 digits
    if path == "/value":
        raise ValueError("bad value")
    if path == "/stream":
        return _stream(start_response, b"")
    if path == "/late":
        return _stream(start_response, b"partial")
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"no"]


def _stream(start_response, first: bytes):
    """A generator body: fails before its first chunk, or after it when ``first`` is not empty."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    if first:
        yield first
    raise RuntimeError("broke while streaming")


def divide(x, y):
    """Sent with off.submit by the task-failure tests."""
    return x / y


def login(username, password, options):
    """Sent with off.submit: fails with a secret in a positional argument and a nested dict."""
    raise PermissionError(f"login refused for {username}")


if os.environ.get("ERRORS_TEST_BROKER"):
    off, errors = make(os.environ["ERRORS_TEST_BROKER"], os.environ["ERRORS_TEST_FOGBUGZ"],
                       os.environ.get("ERRORS_TEST_WEBHOOK") or None,
                       float(os.environ.get("ERRORS_TEST_WINDOW", "0.5")))
    celery = off.celery
    # Not `app`: `celery -A module` takes a module-level `app` for the Celery app.
    application = ErrorReporter(boom, errors)
