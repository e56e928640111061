"""examples/bugzscout_wsgi run as its README says: the web server and a worker
started as the seed shows (``celery --app=myapp worker``), a loopback server
playing FogBugz."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import Spawned, closed_port, wait_until
from errors_fakes import Receiver, request

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bugzscout_wsgi"
pytestmark = pytest.mark.xdist_group("errors")


def test_the_bugzscout_example_end_to_end(tmp_path):
    fogbugz = Receiver()
    port = closed_port()
    env = dict(os.environ, OFFLOAD_DATA_DIR=str(tmp_path / "data"), BUGZSCOUT_URL=fogbugz.url,
               PYTHONPATH=str(EXAMPLE))
    celery = Path(sys.executable).parent / "celery"
    web = Spawned([sys.executable, "myapp.py", str(port)], tmp_path / "web.log", env, cwd=EXAMPLE)
    worker = Spawned([str(celery), "--app=myapp", "worker", "--loglevel=INFO", "-c", "1"],
                     tmp_path / "worker.log", env, cwd=EXAMPLE)
    url = f"http://127.0.0.1:{port}/"
    try:
        assert wait_until(lambda: b"serving on" in (tmp_path / "web.log").read_bytes(), timeout=30), \
            (tmp_path / "web.log").read_text()
        assert request(url) == (200, b"Hello from myapp\n")
        assert request(url, "POST", data=b"12345") == (200, b"Got 5 bytes\n")
        assert request(url + "caught", "PUT") == (500, b"")
        assert request(url + "raised", "DELETE") == (500, b"")
        assert wait_until(lambda: len(fogbugz.received) >= 2, timeout=60), \
            (tmp_path / "worker.log").read_text()[-3000:]
        by_error = {form["Description"].split(":")[0]: form for form in fogbugz.received}
        assert set(by_error) == {"ValueError", "RuntimeError"}
        assert by_error["ValueError"]["Description"].startswith("ValueError: PUT is not supported here")
        assert "Request: PUT http://127.0.0.1" in by_error["ValueError"]["Extra"]
        assert by_error["RuntimeError"]["Description"].startswith("RuntimeError: cannot handle DELETE /raised")
        for form in fogbugz.received:
            assert (form["ScoutUserName"], form["ScoutProject"], form["ScoutArea"]) == (
                "Bug Reporter", "Inbox", "Undecided")
    finally:
        web.stop(timeout=15)
        worker.stop(timeout=15)
        fogbugz.close()
