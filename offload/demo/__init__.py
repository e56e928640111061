"""``offload demo``: seed 001's ledger app on the embedded broker.

>>> import offload.demo
>>> offload.demo.run(host="127.0.0.1", port=8000)   # doctest: +SKIP

serves ``/append``, ``/total`` and ``/result`` with a plain threaded WSGI
server (the standard library's ``wsgiref``) and a local worker started and
stopped with it. The app itself is :mod:`offload.demo.app`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["run"]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server, one thread per request (a slow client blocks no one)."""

    daemon_threads = True
    # The demo restarts often; don't wait out TIME_WAIT on the port.
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    """Access log lines on stderr, without the reverse DNS look-up per request."""

    def address_string(self) -> str:
        return str(self.client_address[0])


def run(host: str = "127.0.0.1", port: int = 8000, *, data_dir: str | None = None,
        keep_ledger: bool = False) -> None:
    """Serve the ledger demo on ``host:port`` with a local worker until Ctrl-C or SIGTERM.

    Parameters:
        host: the interface to listen on (loopback by default: the demo has
            no authentication).
        port: the TCP port.
        data_dir: where the embedded broker, the results and the ledger live
            (default: ``$OFFLOAD_DEMO_DATA_DIR``, else a per-user folder under
            the system temp folder).
        keep_ledger: keep the values an earlier run appended; by default
            each run starts on an empty ledger, so that the README's session
            answers 42 however often it is played.

    The worker is stopped when the server stops, whatever stopped it.
    """
    if data_dir is not None:
        os.environ["OFFLOAD_DEMO_DATA_DIR"] = os.path.abspath(data_dir)
    # Imported here, after the environment is set: the module-level Offload
    # reads its data folder from it.
    from . import app as demo

    wanted = demo.default_data_dir()
    if demo.off.settings.data_dir != wanted:  # imported earlier with another folder
        demo.off.configure(demo.demo_config(wanted))
    # The worker processes read the same variable: one ledger for both.
    os.environ["OFFLOAD_DEMO_DATA_DIR"] = wanted

    # Bind before starting a worker: a busy port fails fast, leaving nothing behind.
    try:
        server = make_server(host, port, demo.application,
                             server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise OSError(exc.errno, f"the demo cannot listen on {host}:{port} ({exc.strerror}); "
                      "is something else using the port? Choose another with --port") from None
    if not keep_ledger:
        demo.reset_ledger()
    try:
        stop_workers = _start_workers(demo.off)
    except BaseException:
        server.server_close()
        raise
    try:
        _print_banner(server, wanted, keep_ledger)
        with _stop_on_signals():
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        with _ignore_signals():  # a second Ctrl-C must not orphan the worker
            print("offload demo: stopping the worker...", file=sys.stderr, flush=True)
            server.server_close()
            stop_workers()


def _base_url(server: WSGIServer) -> str:
    host, port = server.server_address[:2]
    if isinstance(host, bytes):  # typeshed allows bytes; an AF_INET server's host is str
        host = host.decode()
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}"


def _print_banner(server: WSGIServer, data_dir: str, keep_ledger: bool) -> None:
    base = _base_url(server)
    ledger = "the ledger kept from the last run" if keep_ledger else "an empty ledger (--keep-ledger keeps it)"
    print(
        f"offload demo: the ledger app on {base}/ (data in {data_dir}, {ledger})\n"
        "Try:\n"
        f"  curl '{base}/append?value=10'\n"
        f"  curl '{base}/append?value=32'\n"
        f"  curl '{base}/total?delay=2'          # answers a task id\n"
        f"  curl '{base}/result?id=<task id>'    # Pending..., then 42\n"
        "Press Ctrl-C to stop.",
        flush=True,
    )


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so both end ``serve_forever`` the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _ignore_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_workers(off: Any) -> Callable[[], None]:
    """Start the demo's local worker (its CELERY_WORKERS); return what stops it."""
    # The worker builds the demo's app, whatever OFFLOAD_APP or FLASK_APP
    # the shell exports for the user's own (the guides tell them to).
    off.workers.app_spec = "offload.demo.app:off"
    off.start()
    return off.stop
