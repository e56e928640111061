"""A web-app stand-in that starts the named workers, then ends as told.

``python -m testapp.starter exit|crash|hang``: starts ``testapp.named``'s
workers, prints ``off.status()`` as one JSON line with its worker pids, then
returns normally, raises, or waits to be killed.
"""

from __future__ import annotations

import json
import sys

from testapp.named import off


def main(mode: str) -> None:
    off.start(timeout=60)
    status = off.status(timeout=2)
    status["pids"] = off.workers.running()
    print(json.dumps(status), flush=True)
    if mode == "crash":
        raise RuntimeError("the web app crashed")
    if mode == "hang":
        sys.stdin.read()  # until the test kills us


if __name__ == "__main__":
    main(sys.argv[1])
