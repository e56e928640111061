"""A WSGI app whose errors go to FogBugz through offload's workers.

Run the web server and a worker from this folder::

    python myapp.py                            # http://127.0.0.1:8000
    celery --app=myapp worker --loglevel=INFO

GET says hello, POST counts the bytes it was sent, DELETE fails (reported by
the ErrorReporter middleware), PUT fails in a way the app catches itself and
reports with ``errors.capture``. Failing requests answer an empty 500.
FogBugz's address comes from ``BUGZSCOUT_URL``.
"""

from __future__ import annotations

import os
import sys
from wsgiref.simple_server import WSGIServer, make_server
from socketserver import ThreadingMixIn

import offload.errors
from offload import Offload
from offload.errors import ErrorReporter, FogBugz

off = Offload({"OFFLOAD_DATA_DIR": os.environ.get("OFFLOAD_DATA_DIR") or None})
errors = offload.errors.setup(off, sinks=[
    FogBugz(os.environ.get("BUGZSCOUT_URL", "https://example.fogbugz.com/scoutSubmit.asp"),
            user="Bug Reporter", project="Inbox", area="Undecided"),
])
# `celery --app=myapp worker` finds the Celery app here, as in BugzScout's example.
celery = off.celery
# The seed's task: submit_error.delay("description", "extra") from anywhere.
submit_error = errors.submit_error


def _handle_exc(environ, start_response):
    # exc_info lets start_response replace headers the app may have set.
    start_response("500 Internal Server Error", [("Content-Type", "text/plain"),
                                                 ("Content-Length", "0")], sys.exc_info())
    errors.capture(sys.exc_info(), environ)  # queued, never raises, never waits
    return [b""]


def wsgi_app(environ, start_response):
    method = environ["REQUEST_METHOD"]
    if method == "GET":
        body = b"Hello from myapp\n"
    elif method == "POST":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = b"Got %d bytes\n" % len(environ["wsgi.input"].read(size))
    elif method == "PUT":
        try:
            raise ValueError("PUT is not supported here")
        except ValueError:
            return _handle_exc(environ, start_response)
    else:
        raise RuntimeError(f"cannot handle {method} {environ.get('PATH_INFO')}")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# Named `application`, not `app`: `celery --app=myapp` takes `myapp.app` (if
# there is one) for the Celery app, before it looks at `myapp.celery`.
application = ErrorReporter(wsgi_app, errors)


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main(host: str = "127.0.0.1", port: int = 8000) -> None:
    with make_server(host, port, application, server_class=ThreadingServer) as server:
        print(f"serving on http://{host}:{server.server_port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
