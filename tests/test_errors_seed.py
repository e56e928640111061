"""Seed 000 (BugzScout's "WSGI server using the celery extension") as its users
wrote it: its myapp.py copied with only the imports changed, a real worker
started as the docs now say (``offload --app myapp worker``), a loopback
server standing for FogBugz."""

from __future__ import annotations

import os
import sys
import traceback
import uuid
from pathlib import Path

import pytest

import offload.errors
import offload.errors.service
from conftest import Spawned, wait_until
from errors_fakes import Receiver

pytestmark = pytest.mark.xdist_group("errors")

# The seed's myapp.py (doc/example/src/celery_wsgi.py). Changed: the import
# (``bugzscout.ext.celery_app`` -> ``offload.errors``), FogBugz's address (a
# loopback server here), and its two Python 2 idioms that Python 3 refuses
# before offload is reached: ``exception.message`` -> ``str(exception)`` and
# ``traceback.extract_tb(*sys.exc_info())`` -> ``traceback.extract_tb(sys.exc_info()[2])``.
SEED_MYAPP = '''\
from __future__ import print_function, unicode_literals

import offload.errors
import sys
import traceback

# Set celery here, so this module can be designated as the app when running the
# celery work.
celery = offload.errors.celery


def _handle_exc(exception):
    """Record exception with stack trace to FogBugz via BugzScout,
    asynchronously. Returns an empty string.
    """
    offload.errors.submit_error.delay(
        'FOGBUGZ_URL',
        'error-user',
        'MyAppProject',
        'Errors',
        'An error occurred in MyApp: {0}'.format(str(exception)),
        extra=traceback.extract_tb(sys.exc_info()[2]))

    # Return an empty body.
    return ['']


def app(environ, start_response):
    try:
        if environ['REQUEST_METHOD'] == 'GET':
            start_response('200 OK', [('content-type', 'text/html')])
            return ['Hellow world!']
        else:
            start_response(
                '405 Method Not Allowed', [('content-type', 'text/html')])
            return ['']
    except Exception as ex:
        # Call start_response with exception info.
        start_response(
            '500 Internal Server Error',
            [('content-type', 'text/html')],
            sys.exc_info())

        # Record the error to FogBugz and this will return the body for the
        # error response.
        return _handle_exc(ex)
'''


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """(myapp module, FogBugz receiver, worker) for the seed's code on the embedded broker."""
    tmp_path = tmp_path_factory.mktemp("seed")
    fogbugz = Receiver()
    folder = tmp_path / "seed"
    folder.mkdir()
    (folder / "myapp.py").write_text(SEED_MYAPP.replace("FOGBUGZ_URL", fogbugz.url))
    data = tmp_path / "data"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("OFFLOAD_DATA_DIR", str(data))
        # This process is the seed's web process: no reporting of other tests' apps.
        monkeypatch.setattr(offload.errors.service, "_latest", None)
        monkeypatch.setattr(offload.errors.service, "_default", None)
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.delitem(sys.modules, "myapp", raising=False)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
        command = Path(sys.executable).parent / "offload"
        worker = Spawned([str(command), "--app", "myapp", "worker", "-c", "1", "--loglevel", "INFO"],
                         tmp_path / "worker.log", env, cwd=folder)
        import myapp

        try:
            assert wait_until(lambda: "ready." in worker.text() or worker.proc.poll() is not None, timeout=60)
            assert worker.proc.poll() is None, worker.text()
            yield myapp, fogbugz, worker
        finally:
            worker.stop()
            fogbugz.close()
            sys.modules.pop("myapp", None)


@pytest.fixture
def fresh(seed):
    """The seed's stack with the FogBugz record emptied for this test."""
    myapp, fogbugz, worker = seed
    fogbugz.received.clear()
    fogbugz.answers.clear()
    fogbugz.posts = 0
    return seed


def _failing_environ() -> dict:
    # The seed's app fails only when a server gives no REQUEST_METHOD.
    return {"PATH_INFO": "/", "wsgi.url_scheme": "http", "SERVER_NAME": "127.0.0.1"}


def test_the_seeds_own_code_reports_to_fogbugz_once_through_a_worker(fresh):
    myapp, fogbugz, worker = fresh
    statuses = []
    body = myapp.app(_failing_environ(), lambda status, headers, exc_info=None: statuses.append(status))
    assert (statuses, body) == (["500 Internal Server Error"], [""])
    assert myapp.app({"REQUEST_METHOD": "GET"}, lambda *a: None) == ["Hellow world!"]
    assert wait_until(lambda: fogbugz.received, timeout=30), worker.text()[-3000:]
    [form] = fogbugz.received
    assert (form["ScoutUserName"], form["ScoutProject"], form["ScoutArea"]) == (
        "error-user", "MyAppProject", "Errors")
    assert form["Description"] == "An error occurred in MyApp: 'REQUEST_METHOD'"
    # extra was a list of FrameSummary: it arrives as the formatted frames.
    assert "in app" in form["Extra"] and "environ['REQUEST_METHOD']" in form["Extra"]
    assert fogbugz.posts == 1


def test_six_positional_arguments_and_any_extra_never_raise(fresh):
    myapp, fogbugz, worker = fresh
    marker = uuid.uuid4().hex
    try:
        {}["missing"]
    except KeyError:
        frames = traceback.extract_tb(sys.exc_info()[2])
    # The six-argument call of the issue, and values JSON cannot carry.
    offload.errors.submit_error.delay(fogbugz.url, "error-user", "MyAppProject", "Errors",
                                      f"six {marker}", frames)
    offload.errors.submit_error.delay(fogbugz.url, "error-user", "MyAppProject", "Errors",
                                      f"odd {marker}", extra={"frames": object(), "n": 10 ** 5000},
                                      default_message=10 ** 5000)
    # The task a worker registers takes the same six arguments from any Celery client.
    myapp.celery.send_task("offload.errors.submit_error",
                           args=[fogbugz.url, "error-user", "MyAppProject", "Errors", f"sent {marker}", "text"])
    # Wrong arguments are logged, never raised into the caller.
    assert offload.errors.submit_error.delay() is None
    assert offload.errors.submit_error.delay(1, 2, 3) is None
    assert wait_until(lambda: len([f for f in fogbugz.received if marker in f["Description"]]) == 3,
                      timeout=30), worker.text()[-3000:]
    six = next(f for f in fogbugz.received if f["Description"] == f"six {marker}")
    assert 'line' in six["Extra"] and "{}[\"missing\"]" in six["Extra"]
    sent = next(f for f in fogbugz.received if f["Description"] == f"sent {marker}")
    assert sent["Extra"].startswith("text") and sent["ScoutProject"] == "MyAppProject"
    odd = next(f for f in fogbugz.received if f["Description"] == f"odd {marker}")
    assert "<int of" in odd["Extra"] and "<object object at" in odd["Extra"]
    assert odd["ScoutDefaultMessage"].startswith("<int of ")


def test_an_unexpected_fogbugz_answer_is_not_posted_again(fresh):
    myapp, fogbugz, worker = fresh
    marker = uuid.uuid4().hex
    fogbugz.answers.append((200, "<?xml version='1.0'?><Response><CaseId>7</CaseId></Response>"))
    offload.errors.submit_error.delay(fogbugz.url, "error-user", "MyAppProject", "Errors", f"once {marker}")
    assert wait_until(lambda: "not posted again" in worker.text(), timeout=30), worker.text()[-3000:]
    # A retry would come within retry_delay (1 s) doubled: none in three seconds.
    assert not wait_until(lambda: fogbugz.posts > 1, timeout=3)
    assert fogbugz.posts == 1
    # A 503 is retried: the same report arrives on the second post.
    fogbugz.answers.append((503, "busy"))
    offload.errors.submit_error.delay(fogbugz.url, "error-user", "MyAppProject", "Errors", f"busy {marker}")
    assert wait_until(lambda: any(f["Description"] == f"busy {marker}" for f in fogbugz.received),
                      timeout=30), worker.text()[-3000:]
    assert fogbugz.posts == 3
