"""Real HTTP servers on loopback for the web task API's tests.

``serve_asgi`` runs uvicorn, ``serve_wsgi`` the standard library's threaded
``wsgiref`` server (it writes each chunk as the app yields it, which an event
stream needs), each in a thread of the test process on a free port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 2048


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_wsgi(app: Any, port: int = 0) -> Iterator[str]:
    server = make_server("127.0.0.1", port, app, server_class=ThreadingWSGIServer,
                         handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def serve_asgi(app: Any, port: int = 0, http: str = "auto") -> Iterator[str]:
    """uvicorn serving ``app``; ``http`` is its HTTP implementation (a name or "module:Class")."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", interface="asgi3",
                            timeout_graceful_shutdown=2, http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    def check() -> bool:
        return server.started

    from conftest import wait_until

    if not wait_until(check, timeout=30):
        raise RuntimeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def serve(kind: str, api: Any, port: int = 0) -> Iterator[str]:
    """Serve ``api`` (a TaskAPI) as ``kind`` ("wsgi" or "asgi"); yields the base URL."""
    if kind == "wsgi":
        with serve_wsgi(api.wsgi, port) as url:
            yield url
    else:
        with serve_asgi(api.asgi, port) as url:
            yield url
