"""BugzScout's "WSGI server using the celery extension", on offload.

The app reports its errors to FogBugz through a worker, never during the
request, and answers an empty 500. Run the web server and a worker from this
folder::

    python myapp.py 8000                       # the seed's app: http://127.0.0.1:8000
    python myapp.py 8001 --middleware          # the same routes behind ErrorReporter
    offload --app myapp worker --loglevel INFO

GET says hello, POST counts the bytes it was sent, PUT and DELETE fail.
FogBugz's address comes from ``BUGZSCOUT_URL``.
"""

from __future__ import annotations

import os
import sys
import traceback
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, make_server

import offload.errors
from offload import Offload
from offload.errors import ErrorReporter, FogBugz

BUGZSCOUT_URL = os.environ.get("BUGZSCOUT_URL", "https://example.fogbugz.com/scoutSubmit.asp")

off = Offload({"OFFLOAD_DATA_DIR": os.environ.get("OFFLOAD_DATA_DIR") or None})
errors = offload.errors.setup(off, sinks=[
    FogBugz(BUGZSCOUT_URL, user="Bug Reporter", project="Inbox", area="Undecided"),
])
# Set celery here, as the seed does: `celery --app=myapp:celery worker` runs it.
celery = offload.errors.celery


def _handle_exc(exception):
    """The seed's reporting: submit_error.delay() with its six arguments; never raises."""
    offload.errors.submit_error.delay(
        BUGZSCOUT_URL,
        "Bug Reporter",
        "Inbox",
        "Undecided",
        f"An error occurred in myapp: {exception}",
        extra=traceback.extract_tb(sys.exc_info()[2]))
    return [b""]


def _routes(environ, start_response):
    method = environ["REQUEST_METHOD"]
    if method == "GET":
        body = b"Hello from myapp\n"
    elif method == "POST":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = b"Got %d bytes\n" % len(environ["wsgi.input"].read(size))
    elif method == "PUT":
        raise ValueError("PUT is not supported here")
    else:
        raise RuntimeError(f"cannot handle {method} {environ.get('PATH_INFO')}")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    """The seed's app: it catches its own errors and reports them with _handle_exc."""
    try:
        return _routes(environ, start_response)
    except Exception as ex:
        # exc_info lets start_response replace headers the app may have set.
        start_response("500 Internal Server Error", [("Content-Type", "text/plain"),
                                                     ("Content-Length", "0")], sys.exc_info())
        return _handle_exc(ex)


# offload's own form: the middleware catches, reports (with the request,
# scrubbed) and answers the empty 500, so nothing is caught by hand.
application = ErrorReporter(_routes, errors)


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main(host: str = "127.0.0.1", port: int = 8000, middleware: bool = False) -> None:
    served = application if middleware else app
    with make_server(host, port, served, server_class=ThreadingServer) as server:
        print(f"serving on http://{host}:{server.server_port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--middleware"]
    main(port=int(args[0]) if args else 8000, middleware="--middleware" in sys.argv)
