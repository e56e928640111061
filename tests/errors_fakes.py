"""Loopback HTTP for the error-reporting tests: servers playing FogBugz and a webhook, a
real WSGI server, and a client helper.

A Receiver records what it gets and answers from a script or a rule (default: success).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

SUCCESS = (200, "<?xml version='1.0' ?><Success>Case 1 updated</Success>")


class Receiver:
    """A loopback HTTP server recording each POST (form fields or JSON)."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.answers: list[tuple[int, str]] = []
        #: rule(body) -> (status, text) or None: an answer chosen by content.
        self.rule = None
        self.posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.posts += 1
                ruled = receiver.rule(body) if receiver.rule is not None else None
                status, text = ruled or (receiver.answers.pop(0) if receiver.answers else SUCCESS)
                if status < 300:
                    if self.headers.get("Content-Type", "").startswith("application/json"):
                        record = json.loads(body)
                        record["_headers"] = dict(self.headers)
                    else:
                        record = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
                    receiver.received.append(record)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/scoutSubmit.asp"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class WebServer:
    """A real WSGI server (wsgiref, one thread per request) on loopback."""

    def __init__(self, app) -> None:
        self.server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer,
                                  handler_class=_QuietHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def request(url: str, method: str = "GET", headers: dict | None = None, timeout: float = 10,
            data: bytes | None = None):
    """(status, body) of one HTTP request, whatever the status."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
