"""A web-app stand-in that starts the named workers, then ends as told.

``python -m testapp.starter exit|crash|hang|fork``: starts ``testapp.named``'s
workers, prints ``off.status()`` as one JSON line with its worker pids, then
returns normally, raises, or waits to be killed.

``fork`` is a pre-forking server: after starting the workers it forks a child
that exits at once (running its ``atexit`` hooks), then a second child that
prints its pid and waits, touching nothing. On SIGUSR1 (its parent is gone by
then) that child prints what it believes it owns, calls
``off.workers.ensure_started()`` and prints the same again; it exits when its
stdin closes.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from testapp.named import off


def _ownership() -> dict:
    return {"pid": os.getpid(), "owner": off.workers.owner, "pids": off.workers.running()}


def _lingering_child() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print(json.dumps({"child": True, "pid": os.getpid()}), flush=True)
    signal.sigwait({signal.SIGUSR1})
    before = _ownership()
    started = off.workers.ensure_started()
    print(json.dumps({"child": True, "before": before, "started": started, **_ownership()}), flush=True)
    sys.stdin.read()  # until the test closes it; then atexit stops the workers


def main(mode: str) -> None:
    off.start(timeout=60)
    if mode == "fork":
        if os.fork() == 0:
            sys.exit(0)  # a normal exit: atexit hooks run in the child
        os.wait()
        if os.fork() == 0:
            _lingering_child()
            return
    status = off.status(timeout=2)
    status.update(_ownership())
    print(json.dumps(status), flush=True)
    if mode == "crash":
        raise RuntimeError("the web app crashed")
    if mode in ("hang", "fork"):
        sys.stdin.read()  # until the test kills us


if __name__ == "__main__":
    main(sys.argv[1])
