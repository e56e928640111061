"""offload.errors piece by piece: the middleware's WSGI/ASGI contract, the
report and its scrubbing, the sinks' parsing, the spool and the grouping.
(End to end with real workers: tests/test_errors.py.)"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
import threading
import time

import pytest

from conftest import wait_until
from errors_fakes import Receiver
from offload import Offload
from offload.errors import (ASGIErrorReporter, ErrorReporter, FogBugz, Log, Scrubber, SinkRefused,
                            SinkUnavailable, Spool, Webhook, setup)
from offload.errors.pipeline import Pipeline
from offload.errors.capture import build_report, fingerprint, render_extra
from offload.errors.sinks import parse_answer
from offload.exceptions import ConfigurationError


class Recorder:
    """Stands in for ErrorReporting: records what the middleware captures."""

    def __init__(self) -> None:
        self.captured: list[tuple] = []

    def capture(self, exc_info, environ=None) -> None:
        self.captured.append((exc_info, environ))


class StartResponse:
    def __init__(self, headers_sent: bool = False) -> None:
        self.calls: list[tuple] = []
        self.headers_sent = headers_sent

    def __call__(self, status, headers, exc_info=None):
        if exc_info is not None and self.headers_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self.calls.append((status, headers, exc_info))
        return lambda data: None


ENVIRON = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "QUERY_STRING": "", "wsgi.url_scheme": "http",
           "HTTP_HOST": "localhost"}


class Body:
    """A body iterable that records close() and may fail after ``fail_after`` chunks."""

    def __init__(self, chunks, fail_after=None) -> None:
        self.chunks = chunks
        self.fail_after = fail_after
        self.closed = 0

    def __iter__(self):
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_after:
                raise OSError("disk went away")
            yield chunk

    def close(self) -> None:
        self.closed += 1


# The WSGI middleware ----------------------------------------------------------

def test_an_exception_from_the_app_is_an_empty_500_with_exc_info():
    def app(environ, start_response):
        start_response("200 OK", [("X-App", "1")])
        raise ValueError("no")

    recorder = Recorder()
    start = StartResponse()
    body = ErrorReporter(app, recorder)(dict(ENVIRON), start)
    assert list(body) == [b""]
    status, headers, exc_info = start.calls[-1]
    assert status == "500 Internal Server Error" and exc_info[0] is ValueError
    assert ("Content-Length", "0") in headers
    assert recorder.captured[0][0][0] is ValueError and recorder.captured[0][1]["PATH_INFO"] == "/x"


def test_the_generic_body_is_configurable():
    def app(environ, start_response):
        raise KeyError("k")

    start = StartResponse()
    body = ErrorReporter(app, Recorder(), body="Sorry, something broke.")(dict(ENVIRON), start)
    assert list(body) == [b"Sorry, something broke."]
    assert ("Content-Length", "23") in start.calls[-1][1]


def test_a_body_failing_while_iterated_is_a_500_and_the_iterator_is_closed():
    source = Body([b"", b"never"], fail_after=1)

    def app(environ, start_response):
        start_response("200 OK", [])
        return source

    recorder, start = Recorder(), StartResponse()
    result = ErrorReporter(app, recorder)(dict(ENVIRON), start)
    assert list(result) == [b"", b""]
    result.close()
    assert source.closed == 1
    assert start.calls[-1][0].startswith("500") and recorder.captured[0][0][0] is OSError


def test_after_the_headers_went_out_the_error_goes_to_the_server():
    source = Body([b"partial", b"never"], fail_after=1)

    def app(environ, start_response):
        return source

    recorder = Recorder()
    result = ErrorReporter(app, recorder)(dict(ENVIRON), StartResponse(headers_sent=True))
    iterator = iter(result)
    assert next(iterator) == b"partial"
    with pytest.raises(OSError, match="disk went away"):
        next(iterator)
    assert len(recorder.captured) == 1 and source.closed == 1


def test_a_request_that_does_not_fail_passes_through_untouched():
    class FileWrapper:
        def __init__(self, fh, size=8192):
            self.fh = fh

    listed = [b"a", b"b"]
    wrapped = FileWrapper(io.BytesIO(b"file"))
    source = Body([b"1", b"2", b"3"])
    answers = iter([listed, wrapped, source])

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return next(answers)

    reporter = ErrorReporter(app, Recorder())
    environ = dict(ENVIRON, **{"wsgi.file_wrapper": FileWrapper})
    start = StartResponse()
    assert reporter(environ, start) is listed
    assert reporter(environ, start) is wrapped  # sendfile stays possible
    streamed = reporter(environ, start)
    assert list(streamed) == [b"1", b"2", b"3"]  # chunk by chunk, nothing joined
    streamed.close()
    streamed.close()
    assert source.closed == 1
    assert [call[0] for call in start.calls] == ["200 OK"] * 3


def test_an_error_in_close_is_reported_not_raised():
    class Closing(Body):
        def close(self):
            raise RuntimeError("close failed")

    def app(environ, start_response):
        start_response("200 OK", [])
        return Closing([b"x"])

    recorder = Recorder()
    result = ErrorReporter(app, recorder)(dict(ENVIRON), StartResponse())
    assert list(result) == [b"x"]
    result.close()
    assert recorder.captured[0][0][0] is RuntimeError


def test_reporting_that_breaks_never_reaches_the_request(tmp_path, caplog):
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path)})
    errors = setup(off, [Log()], window=60)

    def broken_build(*args, **kwargs):
        raise MemoryError("cannot build")

    errors.pipeline.offer = broken_build  # the worst case: the pipeline itself fails

    def app(environ, start_response):
        raise ValueError("no")

    start = StartResponse()
    with caplog.at_level(logging.ERROR, "offload.errors"):
        assert list(ErrorReporter(app, errors)(dict(ENVIRON), start)) == [b""]
    assert start.calls[-1][0].startswith("500")
    assert "failed to queue a report" in caplog.text


def test_wrong_arguments_get_clear_errors(tmp_path):
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path)})
    with pytest.raises(TypeError, match="wraps a WSGI app"):
        ErrorReporter(None, off, sinks=[Log()])
    with pytest.raises(TypeError, match="takes an Offload"):
        ErrorReporter(lambda e, s: [], object(), sinks=[Log()])
    with pytest.raises(ConfigurationError, match="needs sinks"):
        ErrorReporter(lambda e, s: [], off)
    with pytest.raises(ConfigurationError, match="at least one sink"):
        setup(off, [])
    with pytest.raises(TypeError, match="a sink has a name and a send"):
        setup(off, ["https://example.com"])
    with pytest.raises(TypeError, match="bytes or str"):
        ErrorReporter(lambda e, s: [], off, sinks=[Log()], body=500)
    with pytest.raises(ValueError, match="give_up_after"):
        setup(off, [Log()], give_up_after=0)
    errors = setup(off, [Log()])
    assert setup(off) is errors and ErrorReporter(lambda e, s: [], off).reporting is errors
    with pytest.raises(ConfigurationError, match="already set up"):
        setup(off, [Log("other")])
    with pytest.raises(TypeError, match="not with its result"):
        ErrorReporter(lambda e, s: [], errors, sinks=[Log()])
    with pytest.raises(ValueError, match="http:// or https://"):
        FogBugz("ftp://bugs", user="u", project="p", area="a")
    with pytest.raises(ValueError, match="non-empty project"):
        FogBugz("https://bugs/scoutSubmit.asp", user="u", project="", area="a")
    with pytest.raises(ValueError, match="http:// or https://"):
        Webhook("example.com/hook")


# ASGI -----------------------------------------------------------------------

async def _call_asgi(app, scope):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


SCOPE = {"type": "http", "method": "POST", "path": "/api", "root_path": "", "scheme": "http",
         "query_string": b"token=abc&q=1", "client": ("10.0.0.7", 5555), "server": ("example.org", 80),
         "headers": [(b"authorization", b"Bearer abc"), (b"user-agent", b"ua/1")]}


def test_asgi_errors_before_the_response_are_an_empty_500():
    async def app(scope, receive, send):
        raise ZeroDivisionError("nope")

    recorder = Recorder()
    sent = asyncio.run(_call_asgi(ASGIErrorReporter(app, recorder), dict(SCOPE)))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert sent[1] == {"type": "http.response.body", "body": b""}
    exc_info, environ = recorder.captured[0]
    assert exc_info[0] is ZeroDivisionError
    assert environ["REQUEST_METHOD"] == "POST" and environ["REMOTE_ADDR"] == "10.0.0.7"
    assert environ["HTTP_AUTHORIZATION"] == "Bearer abc"  # scrubbed when the report is built


def test_asgi_errors_after_the_response_started_are_reraised_to_the_server():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError("late")

    recorder = Recorder()
    with pytest.raises(ValueError):
        asyncio.run(_call_asgi(ASGIErrorReporter(app, recorder), dict(SCOPE)))
    assert len(recorder.captured) == 1


def test_asgi_passes_other_scopes_and_good_responses_through():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    recorder = Recorder()
    sent = asyncio.run(_call_asgi(ASGIErrorReporter(app, recorder), dict(SCOPE)))
    assert [m.get("status") for m in sent] == [204, None] and not recorder.captured


# The report -----------------------------------------------------------------

def _exc_info(fn):
    try:
        fn()
    except Exception:
        return sys.exc_info()
    raise AssertionError("did not raise")


def _fail_here(message="boom"):
    raise RuntimeError(message)


def test_the_report_holds_the_error_and_the_request_with_secrets_scrubbed():
    environ = {
        "REQUEST_METHOD": "PUT", "SCRIPT_NAME": "/app", "PATH_INFO": "/items/3",
        "QUERY_STRING": "q=shoes&api_key=K1&sessionid=S1&access_token=TK1&page=2",
        "wsgi.url_scheme": "https", "HTTP_HOST": "shop.example", "REMOTE_ADDR": "192.0.2.1",
        "HTTP_USER_AGENT": "curl/8", "HTTP_AUTHORIZATION": "Basic QQ==", "HTTP_COOKIE": "sid=C1",
        "HTTP_X_CSRF_TOKEN": "X1", "HTTP_X_MY_PASSWORD": "P1", "HTTP_ACCEPT": "*/*",
        "CONTENT_TYPE": "application/json",
    }
    report = build_report(_exc_info(_fail_here), app={"name": "shop", "version": "2.0"}, environ=environ)
    request = report["request"]
    assert request["method"] == "PUT" and request["path"] == "/app/items/3"
    assert request["url"].startswith("https://shop.example/app/items/3?q=shoes&api_key=%5BFiltered%5D")
    assert request["user_agent"] == "curl/8" and request["remote_addr"] == "192.0.2.1"
    assert request["headers"]["Accept"] == "*/*"
    assert request["headers"]["Content-Type"] == "application/json"
    for name in ("Authorization", "Cookie", "X-Csrf-Token", "X-My-Password"):
        assert request["headers"][name] == "[Filtered]"
    text = str(report) + render_extra(report)
    for secret in ("QQ==", "C1", "X1", "P1", "K1", "S1", "TK1"):
        assert secret not in text
    assert report["description"].startswith("RuntimeError: boom at test_errors_units.py:")
    assert report["description"].endswith("in _fail_here")
    assert report["frames"][-1]["function"] == "_fail_here"
    assert report["frames"][-1]["context"] == "raise RuntimeError(message)"
    assert "Traceback (most recent call last)" in report["traceback"]
    assert report["app"] == {"name": "shop", "version": "2.0"}
    assert report["timestamp"].endswith("+00:00") and report["hostname"]


def test_scrubbing_is_configurable():
    scrubber = Scrubber(names=["pin"], headers=["x-tenant"])
    assert scrubber.headers({"X-Pin-Code": "1", "X-Tenant": "2", "Authorization": "3"}) == {
        "X-Pin-Code": "[Filtered]", "X-Tenant": "[Filtered]", "Authorization": "3"}
    assert scrubber.query("pin=1&a=2") == "pin=%5BFiltered%5D&a=2"
    assert Scrubber().query("just-a-blob&a=1&&pass%77ord=x") == "%5BFiltered%5D&a=1&&pass%77ord=%5BFiltered%5D"
    with pytest.raises(TypeError):
        Scrubber(names="password")


def test_the_fingerprint_groups_one_bug_whatever_its_message():
    first = _exc_info(lambda: _fail_here("user 1"))
    second = _exc_info(lambda: _fail_here("user 2"))
    other = _exc_info(lambda: {}["x"])
    assert fingerprint(first[0], first[2]) == fingerprint(second[0], second[2])
    assert fingerprint(first[0], first[2]) != fingerprint(other[0], other[2])


# Sinks ----------------------------------------------------------------------

def test_fogbugz_posts_the_bugzscout_form_and_reads_its_answer():
    receiver = Receiver()
    try:
        sink = FogBugz(receiver.url, user="Bug Reporter", project="Inbox", area="Undecided",
                       default_message="Known", friendly_response=False, force_new_bug=True, timeout=5)
        report = {"description": "KeyError: 'x'", "traceback": "Traceback ...", "count": 3,
                  "first_seen": "t1", "last_seen": "t2"}
        sink.send(report)
        form = receiver.received[-1]
        assert form == {"ScoutUserName": "Bug Reporter", "ScoutProject": "Inbox",
                        "ScoutArea": "Undecided", "Description": "KeyError: 'x'",
                        "Extra": form["Extra"], "ScoutDefaultMessage": "Known",
                        "FriendlyResponse": "0", "ForceNewBug": "1"}
        assert form["Extra"].startswith("Occurrences: 3 (first t1, last t2)\nTraceback ...")
        receiver.answers.append((200, "<Error>No such project</Error>"))
        with pytest.raises(SinkRefused, match="No such project"):
            sink.send(report)
        receiver.answers.append((502, "bad gateway"))
        with pytest.raises(SinkUnavailable, match="502"):
            sink.send(report)
        receiver.answers.append((403, "forbidden"))
        with pytest.raises(SinkRefused, match="403"):
            sink.send(report)
    finally:
        receiver.close()
    with pytest.raises(SinkUnavailable, match="failed"):
        sink.send(report)  # nothing listens any more


def test_fogbugz_answers_of_another_shape_are_delivered_with_a_warning_never_retried(caplog):
    assert parse_answer("<Success>ok</Success>") == "ok"
    with caplog.at_level(logging.WARNING, "offload.errors"):
        assert parse_answer("<html><body>proxy error") == ""
        assert parse_answer("<html>hi</html>") == "hi"
        assert parse_answer("<Response><Case>7</Case></Response>") == ""
    assert "not BugzScout XML (not posted again)" in caplog.text
    assert "unexpected <html> document (not posted again)" in caplog.text
    with pytest.raises(SinkRefused, match="no such area"):
        parse_answer("<Response><Error>no such area</Error></Response>")


def test_log_sink_writes_the_report(caplog):
    with caplog.at_level(logging.ERROR, "myapp.errors"):
        Log("myapp.errors").send({"description": "ValueError: v", "traceback": "Traceback: here"})
    assert "ValueError: v" in caplog.text and "Traceback: here" in caplog.text


# Spool and grouping -----------------------------------------------------------

def test_the_spool_is_bounded_and_drops_the_oldest_with_a_log_line(tmp_path, caplog):
    spool = Spool(str(tmp_path / "spool"), max_reports=3)
    with caplog.at_level(logging.WARNING, "offload.errors"):
        for i in range(5):
            spool.put({"description": f"error {i}"})
    assert len(spool) == 3
    assert caplog.text.count("dropped the oldest") == 2 and "'error 0'" in caplog.text
    sent: list[dict] = []
    assert spool.drain(sent.append) == 3
    assert [r["description"] for r in sent] == ["error 2", "error 3", "error 4"]
    assert len(spool) == 0
    with pytest.raises(ValueError):
        Spool(str(tmp_path), max_reports=0)


def test_a_failed_drain_puts_the_report_back(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.put({"description": "kept"})

    def down(report):
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        spool.drain(down)
    assert len(spool) == 1


def test_two_processes_draining_at_once_send_each_report_once(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    for i in range(200):
        spool.put({"description": str(i)})
    sent: list[str] = []
    lock = threading.Lock()

    def send(report):
        with lock:
            sent.append(report["description"])

    threads = [threading.Thread(target=Spool(spool.folder).drain, args=(send,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(sent, key=int) == [str(i) for i in range(200)]


def test_copies_within_the_window_make_one_report_with_the_count(tmp_path):
    published: list[dict] = []
    pipeline = Pipeline(published.append, Spool(str(tmp_path)), window=0.3)
    built = []

    def build(name):
        built.append(name)
        return {"description": name, "timestamp": "t0"}

    for _ in range(100):
        pipeline.offer("fp-a", lambda: build("a"))
    pipeline.offer("fp-b", lambda: build("b"))
    assert wait_until(lambda: len(published) == 2, timeout=10)
    assert built == ["a", "b"]  # a copy costs a counter, not a report
    counts = {r["description"]: r["count"] for r in published}
    assert counts == {"a": 100, "b": 1}
    pipeline.offer("fp-a", lambda: build("a"))  # a new window: a new report
    assert wait_until(lambda: len(published) == 3, timeout=10)


def test_a_publish_failure_spools_and_the_next_success_drains(tmp_path):
    up = threading.Event()
    published: list[dict] = []

    def publish(report):
        if not up.is_set():
            raise ConnectionError("broker down")
        published.append(report)

    spool = Spool(str(tmp_path))
    pipeline = Pipeline(publish, spool, window=0, broker_backoff=0)
    pipeline.offer("1", lambda: {"description": "first"})
    pipeline.offer("2", lambda: {"description": "second"})
    assert wait_until(lambda: len(spool) == 2, timeout=10)
    up.set()
    pipeline.offer("3", lambda: {"description": "third"})
    assert wait_until(lambda: len(published) == 3, timeout=10)
    assert [r["description"] for r in published] == ["third", "first", "second"]
    assert len(spool) == 0


def test_too_many_distinct_errors_at_once_are_dropped_with_a_log_line(tmp_path, caplog):
    release = threading.Event()
    pipeline = Pipeline(lambda report: release.wait(10), Spool(str(tmp_path)), window=60, max_groups=2)
    with caplog.at_level(logging.ERROR, "offload.errors"):
        for fp in ("a", "b", "c"):
            pipeline.offer(fp, lambda: {"description": fp})
    assert pipeline.dropped == 1 and "dropped 1 report" in caplog.text
    release.set()


# Task failures --------------------------------------------------------------

def test_task_failures_of_this_app_only_are_captured_and_args_can_be_masked(tmp_path):
    from celery.signals import task_failure

    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path / "a")})
    other = Offload({"OFFLOAD_DATA_DIR": str(tmp_path / "b")})
    errors = setup(off, [Log()], mask_task_args=True, window=60)
    captured: list[tuple] = []
    errors.capture = lambda exc_info, environ=None, task=None: captured.append((exc_info, task))

    @off.task(name="units.fails")
    def fails(card_number):
        raise ValueError("declined")

    @other.task(name="units.other_fails")
    def other_fails():
        raise ValueError("not ours")

    for task in (fails, other_fails, errors.send_task):
        exc_info = _exc_info(lambda: _fail_here("declined"))
        task_failure.send(sender=task, task_id="id-1", exception=exc_info[1], args=("4111",),
                          kwargs={"cvv": "123"}, traceback=exc_info[2], einfo=None)
    # Only this app's task, not another Offload's, nor the reporting task itself.
    assert len(captured) == 1
    (_type, exc, _tb), task = captured[0]
    assert task == {"name": "units.fails", "id": "id-1", "args": ["[Filtered]"],
                    "kwargs": {"cvv": "[Filtered]"}}
    assert str(exc) == "declined"
    # off.submit(fn) goes through one dispatcher task: the report names fn.
    exc_info = _exc_info(lambda: _fail_here("x"))
    task_failure.send(sender=off.celery.tasks["offload.dispatch"], task_id="id-2", exception=exc_info[1],
                      args=("shop.jobs:charge", [1], {}), kwargs={}, traceback=exc_info[2], einfo=None)
    assert captured[1][1]["name"] == "shop.jobs:charge" and captured[1][1]["args"] == ["[Filtered]"]


def test_while_the_broker_is_down_reports_go_straight_to_the_spool(tmp_path):
    attempts: list[dict] = []

    def publish(report):
        attempts.append(report)
        raise ConnectionError("broker down")

    spool = Spool(str(tmp_path))
    pipeline = Pipeline(publish, spool, window=0)
    for fp in "abc":
        pipeline.offer(fp, lambda fp=fp: {"description": fp})
    assert wait_until(lambda: len(spool) == 3, timeout=10)
    assert len(attempts) == 1  # one connection timeout, not one per report


def test_pending_groups_are_spooled_at_exit_and_a_forked_child_starts_clean(tmp_path):
    spool = Spool(str(tmp_path))
    pipeline = Pipeline(lambda report: None, spool, window=3600)
    pipeline.offer("a", lambda: {"description": "waiting"})
    pipeline.offer("a", lambda: {"description": "waiting"})
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of the parent's pending groups, a lock of its own
        os.write(write, str(pipeline.spool_pending()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 10) == b"0"
    assert pipeline.spool_pending() == 1
    [report] = [json.loads(open(os.path.join(spool.folder, n)).read()) for n in os.listdir(spool.folder)]
    assert report["description"] == "waiting" and report["count"] == 2


def test_huge_requests_make_reports_of_bounded_size():
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/" + "p" * 100_000,
               "QUERY_STRING": "token=" + "t" * 50_000 + "&q=" + "x" * 100_000,
               "HTTP_X_BIG": "h" * 100_000, "wsgi.url_scheme": "http", "HTTP_HOST": "h"}
    report = build_report(_exc_info(lambda: _fail_here("m" * 100_000)), app={"name": "a"}, environ=environ)
    assert len(json.dumps(report)) < 60_000
    assert "t" * 100 not in report["request"]["query"]


def test_the_grouping_window_stays_fixed_while_the_broker_is_down(tmp_path):
    """A publish to a broker that is not there takes seconds: windows must not stretch with it."""
    from conftest import closed_port

    off = Offload({"CELERY_BROKER_URL": f"redis://127.0.0.1:{closed_port()}/0",
                   "OFFLOAD_DATA_DIR": str(tmp_path)})
    errors = setup(off, [Log()], window=0.2)
    deadline = time.monotonic() + 2.5
    sent = 0
    while time.monotonic() < deadline:
        errors.capture(_exc_info(lambda: _fail_here("same")))
        sent += 1
        time.sleep(0.05)  # the pace of the errors under test, not a wait for a result
    errors.pipeline.spool_pending()
    assert wait_until(lambda: sum(r["count"] for r in _spooled(errors.spool)) == sent, timeout=15)
    reports = _spooled(errors.spool)
    spans = [_seconds(r["last_seen"]) - _seconds(r["first_seen"]) for r in reports]
    assert len(reports) >= 6, f"{sent} errors in 2.5 s made {len(reports)} reports"
    assert max(spans) < 0.2 + 0.1, f"a window stretched to {max(spans):.2f}s"


def _spooled(spool):
    reports = []
    for name in os.listdir(spool.folder):
        if name.endswith(".json"):
            with open(os.path.join(spool.folder, name)) as fh:
                reports.append(json.load(fh))
    return reports


def _seconds(iso):
    import datetime

    return datetime.datetime.fromisoformat(iso).timestamp()


def test_one_scrubbing_policy_covers_urls_paths_and_values():
    scrubber = Scrubber(also=["iban"])
    # Query parameters, both separators, and names that are secret whole.
    assert scrubber.query("a=1;pass=p&code=c&state=s&IBAN=x") == (
        "a=1;pass=%5BFiltered%5D&code=%5BFiltered%5D&state=s&IBAN=%5BFiltered%5D")
    # URLs: user:password@, query, fragment, token-like path segments, a segment after a secret name.
    assert scrubber.url("https://u:pw@h.example/reset/eyJhbGciOi.eyJzdWIi.sig?next=/a#access_token=t") == (
        "https://%5BFiltered%5D@h.example/reset/%5BFiltered%5D?next=/a#access_token=%5BFiltered%5D")
    assert scrubber.path("/api/token/abc/orders/12345/a8Fq3kZ0pL2mN7xW9vB4") == (
        "/api/token/%5BFiltered%5D/orders/12345/%5BFiltered%5D")
    assert scrubber.path("/shop;jsessionid=S1/cart") == "/shop;jsessionid=%5BFiltered%5D/cart"
    # Headers holding URLs or paths; credentials by their shape.
    headers = scrubber.headers({"Referer": "https://x/?token=T", "X-Original-URL": "/cb?code=C",
                                "X-Forwarded-Prefix": "/reset/a8Fq3kZ0pL2mN7xW9vB4", "X-Note": "Bearer abc",
                                "Accept": "text/html"})
    assert headers == {"Referer": "https://x/?token=%5BFiltered%5D", "X-Original-URL": "/cb?code=%5BFiltered%5D",
                       "X-Forwarded-Prefix": "/reset/%5BFiltered%5D", "X-Note": "[Filtered]",
                       "Accept": "text/html"}
    # Values: nested dicts, lists, URLs inside strings, positional names.
    args, kwargs = scrubber.arguments(
        ["bob", "hunter2", [{"api_key": "K", "n": 1}]],
        {"profile": {"card": {"number": "4111"}, "name": "Bob"}, "next": "https://x/?sig=S&a=1"},
        names=["user", "password", "items"])
    assert args == ["bob", "[Filtered]", [{"api_key": "[Filtered]", "n": 1}]]
    assert kwargs == {"profile": {"card": "[Filtered]", "name": "Bob"}, "next": "https://x/?sig=%5BFiltered%5D&a=1"}


def test_walking_a_value_is_bounded_and_never_raises():
    class Unprintable:
        def __repr__(self):
            raise RuntimeError("no")

    deep: list = []
    node = deep
    for _ in range(100_000):
        node.append([])
        node = node[0]
    scrubber = Scrubber()
    assert scrubber.value(10 ** 5000).startswith("<int of ")
    assert scrubber.value(Unprintable()) == "<unprintable Unprintable>"
    assert "nested deeper than" in json.dumps(scrubber.value(deep))
    assert len(scrubber.value(list(range(10_000)))) == 51
    assert scrubber.value(b"\xff\xfe ok") == "\ufffd\ufffd ok"
    assert len(scrubber.value("x" * 100_000)) < 2100


def test_grouping_tells_two_errors_of_one_function_apart_but_not_two_values():
    def parse(which, value):
        if which == "a":
            raise ValueError(f"missing field {value!r}")
        raise ValueError(f"unknown currency {value}")

    first = _exc_info(lambda: parse("a", "amount"))
    same = _exc_info(lambda: parse("a", "total"))
    other = _exc_info(lambda: parse("b", 42))
    prints = [fingerprint(e[0], e[2], e[1]) for e in (first, same, other)]
    assert prints[0] == prints[1] != prints[2]


def test_a_hostile_asgi_scope_makes_a_bounded_report():
    async def app(scope, receive, send):
        raise ValueError("bad")

    scope = dict(SCOPE, path="/zero/\udcff\ufffd", query_string=b"q=%ff\xfe&n=" + b"9" * 5000,
                 headers=[(b"x-dup", b"d" * 5000)] * 5000 + [(b"x-bin", b"\xff\xfe\x80")])
    recorder = Recorder()
    sent = asyncio.run(_call_asgi(ASGIErrorReporter(app, recorder), scope))
    assert sent[0]["status"] == 500
    (exc_info, environ), = recorder.captured
    assert len(environ["HTTP_X_DUP"]) <= 8192
    report = build_report(exc_info, app={"name": "a"}, environ=environ)
    assert len(json.dumps(report)) < 60_000
    assert "\udcff" not in report["request"]["path"]
    report["request"]["path"].encode("utf-8")  # a sink can send it
    # A scope of the wrong shape still answers 500 and is reported, without the request.
    recorder = Recorder()
    sent = asyncio.run(_call_asgi(ASGIErrorReporter(app, recorder), dict(SCOPE, headers=[("x", 1)])))
    assert sent[0]["status"] == 500 and recorder.captured[0][1] is None


def test_a_report_naming_its_own_fogbugz_posts_only_to_a_bugzscout_address(tmp_path, caplog):
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path)})
    errors = setup(off, [Log()], window=60)
    receiver = Receiver()
    try:
        report = errors.report_of_call((receiver.url, "u", "p", "a", "it broke"), {"extra": ["x"]})
        assert errors.deliver(report) == [] and receiver.posts == 1
        assert receiver.received[0]["Description"] == "it broke"
        # A forged message aiming the worker at another address of the network.
        forged = dict(report, fogbugz=dict(report["fogbugz"], url=receiver.url.replace("scoutSubmit.asp", "admin")))
        with caplog.at_level(logging.ERROR, "offload.errors"):
            assert errors.deliver(forged) == []
        assert receiver.posts == 1 and "neither a BugzScout address" in caplog.text
    finally:
        receiver.close()


def test_a_damaged_spool_file_is_dropped_and_the_rest_sent(tmp_path, caplog):
    spool = Spool(str(tmp_path))
    spool.put({"description": "first"})
    with open(os.path.join(str(tmp_path), "00000000000000000000-1-deep.json"), "w") as fh:
        fh.write("[" * 100_000 + "]" * 100_000)
    sent: list[dict] = []
    with caplog.at_level(logging.WARNING, "offload.errors"):
        assert spool.drain(sent.append) == 1
    assert sent == [{"description": "first"}] and os.listdir(str(tmp_path)) == []
    assert "dropped unreadable 00000000000000000000-1-deep.json" in caplog.text


def test_reporting_never_raises_whatever_it_is_given(tmp_path, caplog):
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path)})
    errors = setup(off, [Log()], window=3600)

    class Hostile:
        def __str__(self):
            raise RuntimeError("no str")

        __repr__ = __str__

    with caplog.at_level(logging.ERROR, "offload.errors"):
        errors.capture("not an exc_info")
        errors.capture((ValueError, ValueError(Hostile()), None), environ={"HTTP_X": "1", 3: object()})
        assert errors.submit_error.delay(Hostile(), Hostile()) is None
        assert errors.submit_error.delay("only", "two", "three") is None
        assert errors.submit_error.apply_async("not a tuple", 42) is None
        assert errors.submit_error(b"bytes description", extra=ValueError("as extra")) is None
    assert "fit neither submit_error(url, user, project, area, description" in caplog.text
    reports = {group.build()["description"] for group in errors.pipeline._groups.values()}
    assert {"bytes description", "<unprintable Hostile>", "ValueError: <unprintable ValueError>"} <= reports
