"""Run seed 003: the page on one port, the JSON-RPC API on another, a worker.

    python serve.py --page-port 8000 --api-port 5000

then open http://127.0.0.1:8000/ and press the button: the page calls
``echo`` over JSON-RPC on http://127.0.0.1:5000/offload/rpc (the browser sends
an OPTIONS preflight first), then asks ``task.status`` on a timer and shows
how many times it asked before the job finished.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from echo_app import make_api, off

PAGE = Path(__file__).with_name("static") / "index.html"


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Handler(WSGIRequestHandler):
    def log_message(self, format, *args):  # the seed shows OPTIONS and POST in the server's output
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)


def page_app(api_url: str):
    body = PAGE.read_text().replace("{{API}}", api_url).encode()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page-port", type=int, default=8000)
    parser.add_argument("--api-port", type=int, default=5000)
    options = parser.parse_args()
    page_origin = f"http://127.0.0.1:{options.page_port}"
    api_url = f"http://127.0.0.1:{options.api_port}"
    api_server = make_server("127.0.0.1", options.api_port, make_api(page_origin).wsgi,
                             server_class=ThreadingServer, handler_class=Handler)
    page_server = make_server("127.0.0.1", options.page_port, page_app(api_url),
                              server_class=ThreadingServer, handler_class=Handler)
    off.start()
    threading.Thread(target=api_server.serve_forever, daemon=True).start()
    print(f"page on {page_origin}/, API on {api_url}/offload", flush=True)
    try:
        page_server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        off.stop()


if __name__ == "__main__":
    main()
