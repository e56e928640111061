"""What ``ErrorReporter`` costs a WSGI app, side by side in one run.

Three measurements, each alternating the contenders round by round (median of
``--rounds``), on the embedded broker in a temporary folder (reports are
published to it by the reporting thread; no worker is needed to queue them):

* **no error, WSGI calls**: requests/s of a small app (a 2-chunk generator
  body) called directly, bare and wrapped in ``ErrorReporter``: the
  middleware's own cost, nothing else in the way;
* **no error, over HTTP**: the same through a real server (wsgiref, one
  thread per request) on loopback, ``--requests`` sequential requests to
  each, interleaved one by one (the machine's load drifts alike for all),
  with a second bare server whose difference from the first is the noise
  floor; the middleware's added time (from the direct calls) over the time
  of one HTTP request is the loss without that noise;
* **a failing request**: microseconds per request of an app that raises,
  answered by a bare ``try/except`` that returns an empty 500 (no report),
  against ``ErrorReporter`` queueing a report: the same error repeated
  (grouped: a counter), and each request a *new* error (its own exception
  class, so its own fingerprint: a report is built and queued; the bare
  baseline makes the same classes).

Targets: under 3 % throughput loss without errors; under 2 ms added to a
failing request. Run from the repository root: ``python bench/errors.py``.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from offload import Offload
from offload.errors import ErrorReporter, Log, setup

ENVIRON = {"REQUEST_METHOD": "GET", "PATH_INFO": "/items", "QUERY_STRING": "page=2&token=x",
           "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
           "HTTP_HOST": "localhost", "HTTP_USER_AGENT": "bench", "REMOTE_ADDR": "127.0.0.1",
           "HTTP_COOKIE": "session=abc", "HTTP_ACCEPT": "*/*"}


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    yield b"hello "
    yield b"world\n"


def start_response(status: str, headers: list[Any], exc_info: Any = None) -> Callable[[bytes], None]:
    return lambda data: None


def calls_per_second(app: Any, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        body = app(dict(ENVIRON), start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return n / (time.perf_counter() - started)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def http_paired(ports: dict[str, int], n: int) -> dict[str, float]:
    """Requests/s of each server, requests interleaved one by one so load drift hits both alike."""
    spent = dict.fromkeys(ports, 0.0)
    names = list(ports)
    for index in range(n):
        for name in (names if index % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", ports[name], timeout=10)
            conn.request("GET", "/items?page=2")
            conn.getresponse().read()
            conn.close()
            spent[name] += time.perf_counter() - started
    return {name: n / seconds for name, seconds in spent.items()}


def bare_500(app: Any) -> Any:
    """What an app does without reporting: catch, answer an empty 500."""

    def wrapped(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return app(environ, start)
        except Exception:
            start("500 Internal Server Error", [("Content-Length", "0")], sys.exc_info())
            return [b""]

    return wrapped


def failing_new_errors() -> Any:
    """Each call raises an exception of a new type: a new fingerprint, a new report."""
    counter = iter(range(10**9))

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        raise type(f"BenchError{next(counter)}", (Exception,), {})("failed")

    return app


def failing_same_error(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
    raise LookupError("the same failure")


def us_per_call(app: Any, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        for _chunk in app(dict(ENVIRON), start_response):
            pass
    return (time.perf_counter() - started) / n * 1e6


def median_of(rounds: int, contenders: dict[str, Callable[[], float]]) -> dict[str, float]:
    results: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            results[name].append(contenders[name]())
    return {name: statistics.median(values) for name, values in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000, help="WSGI calls per round")
    parser.add_argument("--requests", type=int, default=500, help="HTTP requests per round and server")
    parser.add_argument("--failures", type=int, default=1_000, help="failing requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    logging.getLogger("offload.errors").setLevel(logging.CRITICAL)

    with tempfile.TemporaryDirectory(prefix="offload-bench-errors-") as folder:
        off = Offload({"OFFLOAD_DATA_DIR": folder})
        errors = setup(off, [Log()])
        wrapped = ErrorReporter(hello, errors)

        calls = median_of(args.rounds, {
            "bare": lambda: calls_per_second(hello, args.calls),
            "ErrorReporter": lambda: calls_per_second(wrapped, args.calls),
        })
        servers = {}
        # A second bare server shows the noise floor of the comparison.
        for name, app in (("bare", hello), ("bare (again)", hello), ("ErrorReporter", wrapped)):
            server = make_server("127.0.0.1", 0, app, server_class=_Server, handler_class=_Quiet)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers[name] = server
        try:
            # Loopback HTTP on a shared machine is noisy: requests interleaved, median of rounds.
            ports = {name: server.server_port for name, server in servers.items()}
            rounds = [http_paired(ports, args.requests) for _ in range(args.rounds)]
            over_http = {name: statistics.median(r[name] for r in rounds) for name in ports}
        finally:
            for server in servers.values():
                server.shutdown()
                server.server_close()

        bare_new = bare_500(failing_new_errors())
        reporter_new = ErrorReporter(failing_new_errors(), errors)
        reporter_same = ErrorReporter(failing_same_error, errors)
        bare_same = bare_500(failing_same_error)
        failing = median_of(args.rounds, {
            "bare 500, same error": lambda: us_per_call(bare_same, args.failures),
            "reported, same error (grouped)": lambda: us_per_call(reporter_same, args.failures),
            "bare 500, new error each time": lambda: us_per_call(bare_new, args.failures),
            "reported, new error each time": lambda: us_per_call(reporter_new, args.failures),
        })

    print(f"no error, direct WSGI calls (median of {args.rounds} rounds of {args.calls}):")
    for name, rate in calls.items():
        print(f"  {name:<16} {rate:>12,.0f} calls/s")
    print(f"  ratio ErrorReporter/bare: {calls['ErrorReporter'] / calls['bare']:.3f}"
          "  (against an app that does nothing: the added time is what counts)")
    added_us = (1 / calls["ErrorReporter"] - 1 / calls["bare"]) * 1e6
    print(f"  added per request: {added_us:.2f} us")
    print(f"no error, over HTTP on loopback (median of {args.rounds} rounds of {args.requests}, interleaved):")
    for name, rate in over_http.items():
        print(f"  {name:<16} {rate:>12,.0f} requests/s")
    print(f"  ratio ErrorReporter/bare: {over_http['ErrorReporter'] / over_http['bare']:.3f}"
          f"  (loss {100 * (1 - over_http['ErrorReporter'] / over_http['bare']):.1f} %, target < 3 %)")
    noise = abs(1 - over_http["bare (again)"] / over_http["bare"])
    print(f"  noise floor (bare against bare): {100 * noise:.1f} %")
    print(f"  the middleware's added {added_us:.2f} us against a {1e6 / over_http['bare']:.0f} us "
          f"request: {100 * added_us * over_http['bare'] / 1e6:.2f} % (the loss without the noise)")
    print(f"a failing request (median of {args.rounds} rounds of {args.failures}):")
    for name, micros in failing.items():
        if name.startswith("bare"):
            base = micros
            added = ""
        else:
            added = f"  (+{(micros - base) / 1000:.3f} ms, target < 2 ms)"
        print(f"  {name:<32} {micros:>9.1f} us/request{added}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
