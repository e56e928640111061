"""A WSGI app whose module starts the named workers, for gunicorn.

With ``--preload`` the master imports it (and so starts the workers) before
forking; without, each gunicorn worker does, and one of them wins. A request
answers with what the serving process believes about the workers.
"""

from __future__ import annotations

import json
import os

from testapp.named import off

off.start(timeout=60)


def application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "owner": off.workers.owner,
                       "workers": off.workers.running()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
