"""examples/bugzscout_wsgi run as its README says: the seed's app and the
middleware form, each behind a real web server, a worker started with
``offload --app myapp worker``, a loopback server playing FogBugz."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Spawned, closed_port, wait_until
from errors_fakes import Receiver, request

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bugzscout_wsgi"
OFFLOAD = Path(sys.executable).parent / "offload"
pytestmark = pytest.mark.xdist_group("errors")


def test_the_bugzscout_example_end_to_end(tmp_path):
    fogbugz = Receiver()
    seed_port, middleware_port = closed_port(), closed_port()
    env = dict(os.environ, OFFLOAD_DATA_DIR=str(tmp_path / "data"), BUGZSCOUT_URL=fogbugz.url,
               PYTHONPATH=os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")]))
    seed = Spawned([sys.executable, "myapp.py", str(seed_port)], tmp_path / "seed.log", env, cwd=EXAMPLE)
    middleware = Spawned([sys.executable, "myapp.py", str(middleware_port), "--middleware"],
                         tmp_path / "middleware.log", env, cwd=EXAMPLE)
    worker = Spawned([str(OFFLOAD), "--app", "myapp", "worker", "--loglevel", "INFO", "-c", "1"],
                     tmp_path / "worker.log", env, cwd=EXAMPLE)
    try:
        for web in (seed, middleware):
            assert wait_until(lambda: "serving on" in web.text(), timeout=30), web.text()
        for port in (seed_port, middleware_port):
            url = f"http://127.0.0.1:{port}/"
            assert request(url) == (200, b"Hello from myapp\n")
            assert request(url + "put", "PUT") == (500, b"")
            assert request(url + "raised", "DELETE") == (500, b"")
        assert request(f"http://127.0.0.1:{seed_port}/", "POST", data=b"12345") == (200, b"Got 5 bytes\n")
        assert wait_until(lambda: len(fogbugz.received) >= 4, timeout=60), worker.text()[-3000:]
        descriptions = sorted(form["Description"].split(" at ")[0] for form in fogbugz.received)
        assert descriptions == [
            "An error occurred in myapp: PUT is not supported here",
            "An error occurred in myapp: cannot handle DELETE /raised",
            "RuntimeError: cannot handle DELETE /raised",
            "ValueError: PUT is not supported here",
        ]
        for form in fogbugz.received:
            assert (form["ScoutUserName"], form["ScoutProject"], form["ScoutArea"]) == (
                "Bug Reporter", "Inbox", "Undecided")
            assert "in _routes" in form["Extra"]
        [by_middleware] = [f for f in fogbugz.received if f["Description"].startswith("ValueError")]
        assert "Request: PUT http://127.0.0.1" in by_middleware["Extra"]
        assert fogbugz.posts == 4
    finally:
        for process in (seed, middleware, worker):
            process.stop(timeout=15)
        fogbugz.close()


def test_offload_worker_names_a_wsgi_function_for_what_it_is(tmp_path):
    env = dict(os.environ, OFFLOAD_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([str(OFFLOAD), "--app", "myapp:app", "worker"], cwd=EXAMPLE, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "myapp:app is a WSGI app (it takes environ, start_response)" in done.stderr + done.stdout
    assert "--app myapp" in done.stderr + done.stdout
