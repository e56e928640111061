"""offload.errors end to end: a real WSGI server on loopback, a real worker on
a real broker (the embedded one and Redis), and loopback servers playing
FogBugz and a webhook that record what they receive."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

from conftest import WorkerProcess, closed_port, purge, require_service, wait_ready, wait_until
from errors_fakes import Receiver, WebServer, request
from offload.errors import ErrorReporter
from testapp import errors_app, test_id

pytestmark = pytest.mark.xdist_group("errors")

SECRET = "hunter2-s3cr3t"


@pytest.fixture(scope="module")
def fogbugz():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def webhook():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module", params=["embedded", "redis"])
def errors_worker(request, data_root, fogbugz, webhook):
    """A worker process for testapp.errors_app on each broker, for this module."""
    kind = request.param
    if kind == "redis":
        require_service("redis")
    env = {"ERRORS_TEST_BROKER": kind, "ERRORS_TEST_FOGBUGZ": fogbugz.url,
           "ERRORS_TEST_WEBHOOK": webhook.url}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        off, _errors = errors_app.make(kind, fogbugz.url, webhook.url)
        purge(off)
        worker = WorkerProcess("testapp.errors_app", f"errors-{kind}-{test_id()}@%h",
                               data_root / f"worker-errors-{kind}.log")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    wait_ready(off, worker)
    yield kind, worker
    worker.stop()


@pytest.fixture
def stack(errors_worker, fogbugz, webhook):
    """(reporting, web server URL, worker) with a fresh Offload in this process."""
    kind, worker = errors_worker

    def build(window: float = 0.5):
        off, errors = errors_app.make(kind, fogbugz.url, webhook.url, window=window)
        server = WebServer(ErrorReporter(errors_app.boom, errors))
        servers.append(server)
        return off, errors, server.url

    servers: list[WebServer] = []
    yield build, worker
    for server in servers:
        server.close()


def reports_with(receiver: Receiver, marker: str, field: str = "Extra") -> list[dict]:
    return [r for r in receiver.received if marker in str(r.get(field, r))]


def test_failing_request_answers_an_empty_500_and_fogbugz_gets_the_report(stack, fogbugz, webhook):
    build, worker = stack
    _off, _errors, url = build()
    marker = uuid.uuid4().hex
    status, body = request(f"{url}/zero?case={marker}&api_key={SECRET}&page=2", headers={
        "Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}",
        "X-Auth-Token": SECRET, "X-Pin": SECRET, "User-Agent": "errors-test/1.0"})
    assert status == 500
    assert body == b""
    assert wait_until(lambda: reports_with(fogbugz, marker), timeout=10), worker.log_tail()
    [form] = reports_with(fogbugz, marker)
    assert form["ScoutUserName"] == "Bug Reporter"
    assert form["ScoutProject"] == "Inbox"
    assert form["ScoutArea"] == "Undecided"
    assert form["Description"].startswith("ZeroDivisionError: division by zero at errors_app.py:")
    extra = form["Extra"]
    assert "Traceback (most recent call last)" in extra
    assert 'line' in extra and "in boom" in extra and "1 / 0" in extra
    assert "Request: GET http://127.0.0.1:" in extra and f"/zero?case={marker}" in extra
    assert "User agent: errors-test/1.0" in extra
    assert "Remote address: 127.0.0.1" in extra
    assert "App: testapp.errors_app 1.2.3" in extra
    assert f"Host: {socket.gethostname()}" in extra and "Fingerprint: " in extra
    # The webhook gets the same report as JSON, with the same scrubbing.
    assert wait_until(lambda: reports_with(webhook, marker, "request"), timeout=10)
    [hook] = reports_with(webhook, marker, "request")
    assert hook["_headers"]["X-Hook"] == "yes"
    assert hook["request"]["method"] == "GET" and hook["request"]["path"] == "/zero"
    assert hook["request"]["headers"]["Authorization"] == "[Filtered]"
    assert hook["exception"] == {"type": "ZeroDivisionError", "module": "builtins",
                                 "message": "division by zero"}
    assert hook["frames"][-1]["function"] == "boom" and hook["count"] == 1
    for record in (form, hook):
        assert SECRET not in str(record), "a secret reached a sink"


def test_secrets_in_url_headers_query_and_path_never_reach_the_sinks(stack, fogbugz, webhook):
    """Every place of a request an attacker's review found a secret in (issue 25, item 9)."""
    build, worker = stack
    _off, _errors, url = build()
    marker = uuid.uuid4().hex
    token = "a8Fq3kZ0pL2mN7xW9vB4" + SECRET.replace("-", "")
    query = f"case={marker};api_key={SECRET};page=2&pass={SECRET}&code={SECRET}&state=ok"
    status, body = request(f"{url}/zero/reset/{token}?{query}", headers={
        "Referer": f"https://shop.example/checkout?token={SECRET}&step=2",
        "X-Original-URL": f"/zero/reset/{token}?{query}",
        "X-Forwarded-Uri": f"/callback?code={SECRET}",
        "X-Forwarded-Host": "shop.example",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Url": f"https://user:{SECRET}@shop.example/cb;jsessionid={SECRET}",
        "X-Pin": SECRET})
    assert (status, body) == (500, b"")
    assert wait_until(lambda: reports_with(fogbugz, marker) and reports_with(webhook, marker, "request"),
                      timeout=15), worker.log_tail()
    [form] = reports_with(fogbugz, marker)
    [hook] = reports_with(webhook, marker, "request")
    for record in (form, hook):
        assert SECRET not in str(record) and token not in str(record), "a secret reached a sink"
    request_info = hook["request"]
    assert request_info["path"] == "/zero/reset/%5BFiltered%5D"
    assert request_info["query"] == (f"case={marker};api_key=%5BFiltered%5D;page=2&pass=%5BFiltered%5D"
                                     "&code=%5BFiltered%5D&state=ok")
    headers = request_info["headers"]
    assert headers["Referer"] == "https://shop.example/checkout?token=%5BFiltered%5D&step=2"
    assert headers["X-Forwarded-Uri"] == "/callback?code=%5BFiltered%5D"
    assert headers["X-Forwarded-Host"] == "shop.example" and headers["X-Pin"] == "[Filtered]"
    assert "X-Original-Url" in headers and "X-Forwarded-Url" in headers


def _raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are (invalid UTF-8 included); the answer's status line."""
    host, port = url.rpartition("/")[2].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                     + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.partition(b"\r\n")[0]


def test_hostile_requests_are_an_empty_500_and_a_bounded_report(stack, webhook):
    """Deep JSON, huge headers, a 5,000-digit number, invalid UTF-8: reporting never breaks."""
    build, worker = stack
    _off, _errors, url = build(window=0.2)
    marker = uuid.uuid4().hex
    deep = b"[" * 100_000 + b"]" * 100_000
    big_headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(90))
    sent = [
        _raw_request(url, b"POST /json?case=%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     % marker.encode(), deep),
        _raw_request(url, b"GET /key?case=%s HTTP/1.1\r\nHost: x\r\n%sX-Big: %s\r\n"
                     % (marker.encode(), big_headers, b"b" * 32_000)),
        _raw_request(url, b"POST /json?case=%s&n=%s HTTP/1.1\r\nHost: x\r\n" % (marker.encode(), b"9" * 5000),
                     b"9" * 5000),
        _raw_request(url, b"GET /bigint?case=%s HTTP/1.1\r\nHost: x\r\n" % marker.encode()),
        _raw_request(url, b"GET /zero/%%ff%%fe\xff?case=%s&q=%%ff\xfe HTTP/1.1\r\nHost: x\r\nX-Bin: \xff\xfe\x80\r\n"
                     % marker.encode()),
    ]
    assert all(status.startswith(b"HTTP/1.") and b" 500 " in status for status in sent), sent
    assert wait_until(lambda: len(reports_with(webhook, marker, "request")) >= 5, timeout=30), worker.log_tail()
    reports = reports_with(webhook, marker, "request")
    types = sorted(r["exception"]["type"] for r in reports)
    assert types == ["KeyError", "RecursionError", "ValueError", "ValueError", "ZeroDivisionError"], types
    for report in reports:
        assert len(json.dumps(report)) < 100_000
        assert len(report["request"]["headers"]) <= 64 + 3
    [bigint] = [r for r in reports if r["request"]["path"] == "/bigint"]
    assert bigint["exception"]["message"] == "<unprintable ValueError>"


def test_two_different_errors_of_one_function_are_two_reports(stack, fogbugz):
    build, worker = stack
    _off, _errors, url = build(window=2.0)
    marker = uuid.uuid4().hex
    assert request(f"{url}/parse?case={marker}")[0] == 500
    assert request(f"{url}/parse?case={marker}&currency=XYZ")[0] == 500
    assert request(f"{url}/parse?case={marker}")[0] == 500
    assert wait_until(lambda: len(reports_with(fogbugz, marker)) >= 2, timeout=20), worker.log_tail()
    descriptions = sorted(form["Description"].split(" at ")[0] for form in reports_with(fogbugz, marker))
    assert descriptions == ["ValueError: missing field 'amount'", "ValueError: unknown currency"]
    [missing] = [f for f in reports_with(fogbugz, marker) if "missing" in f["Description"]]
    assert "Occurrences: 2" in missing["Extra"]


def test_a_body_that_fails_while_streaming_is_a_500_and_reported(stack, fogbugz):
    build, worker = stack
    _off, _errors, url = build()
    marker = uuid.uuid4().hex
    status, body = request(f"{url}/stream?case={marker}")
    assert (status, body) == (500, b"")
    assert wait_until(lambda: reports_with(fogbugz, marker), timeout=10), worker.log_tail()
    [form] = reports_with(fogbugz, marker)
    assert form["Description"].startswith("RuntimeError: broke while streaming")


def test_a_body_failing_after_its_first_bytes_is_cut_short_and_reported(stack, fogbugz):
    """The status went out with the first bytes: the server closes the connection."""
    build, worker = stack
    _off, _errors, url = build()
    marker = uuid.uuid4().hex
    try:
        _status, body = request(f"{url}/late?case={marker}")
    except OSError:  # the connection was cut: also right
        body = b""
    assert b"Traceback" not in body and b"broke" not in body
    assert wait_until(lambda: reports_with(fogbugz, marker), timeout=10), worker.log_tail()


def test_a_flood_of_one_error_is_one_report_with_its_count(stack, fogbugz):
    build, worker = stack
    _off, _errors, url = build(window=5.0)
    marker = uuid.uuid4().hex
    started = time.monotonic()
    for _ in range(100):
        assert request(f"{url}/key?case={marker}")[0] == 500
    elapsed = time.monotonic() - started
    assert wait_until(lambda: reports_with(fogbugz, marker), timeout=20), worker.log_tail()
    # Anything else would arrive within the same window: wait for it to pass.
    quiet = time.monotonic() + 2.0
    wait_until(lambda: len(reports_with(fogbugz, marker)) > 1 or time.monotonic() > quiet, timeout=5)
    forms = reports_with(fogbugz, marker)
    assert len(forms) == 1, f"{len(forms)} posts for 100 identical errors in {elapsed:.2f}s"
    assert "Occurrences: 100 (first " in forms[0]["Extra"]


def test_failed_tasks_are_reported_with_name_id_and_scrubbed_args(stack, webhook):
    build, worker = stack
    off, _errors, _url = build()
    marker = uuid.uuid4().hex
    future = off.submit(errors_app.divide, 1, 0)
    with pytest.raises(ZeroDivisionError):
        future.result(timeout=30)
    registered = off.celery.tasks["errors_app.registered_fails"]
    failed = registered.submit(marker, password=SECRET)
    with pytest.raises(KeyError):
        failed.result(timeout=30)
    assert wait_until(lambda: [r for r in webhook.received
                               if (r.get("task") or {}).get("id") == future.id], timeout=15), worker.log_tail()
    assert wait_until(lambda: [r for r in webhook.received
                               if (r.get("task") or {}).get("id") == failed.id], timeout=15), worker.log_tail()
    [submitted] = [r for r in webhook.received if (r.get("task") or {}).get("id") == future.id]
    assert submitted["task"]["name"] == "testapp.errors_app:divide"
    assert submitted["task"]["args"] == ["1", "0"]
    assert submitted["exception"]["type"] == "ZeroDivisionError"
    [reg] = [r for r in webhook.received if (r.get("task") or {}).get("id") == failed.id]
    assert reg["task"]["name"] == "errors_app.registered_fails"
    assert reg["task"]["kwargs"] == {"password": "[Filtered]"}
    assert SECRET not in str(reg)


def test_secrets_in_positional_and_nested_task_arguments_are_scrubbed(stack, webhook):
    build, worker = stack
    off, _errors, _url = build()
    options = {"remember": True, "grant": {"refresh_token": SECRET, "scope": "read"},
               "callback": f"https://app.example/cb?code={SECRET}&next=/home"}
    future = off.submit(errors_app.login, "bob", SECRET, options)
    registered = off.celery.tasks["errors_app.registered_fails"]
    failed = registered.submit("item-9", SECRET)  # password given by position
    for fut, exc in ((future, PermissionError), (failed, KeyError)):
        with pytest.raises(exc):
            fut.result(timeout=30)
    ids = {future.id, failed.id}
    assert wait_until(lambda: len([r for r in webhook.received if (r.get("task") or {}).get("id") in ids]) == 2,
                      timeout=15), worker.log_tail()
    reports = {r["task"]["id"]: r for r in webhook.received if (r.get("task") or {}).get("id") in ids}
    submitted, reg = reports[future.id], reports[failed.id]
    assert submitted["task"]["args"][:2] == ["'bob'", "[Filtered]"]
    assert "'scope': 'read'" in submitted["task"]["args"][2]
    assert "'refresh_token': '[Filtered]'" in submitted["task"]["args"][2]
    assert "next=/home" in submitted["task"]["args"][2]
    assert reg["task"]["args"] == ["'item-9'", "[Filtered]"]
    for report in (submitted, reg):
        assert SECRET not in str(report)


def test_a_failed_call_of_a_chunked_map_is_reported_by_its_own_id(stack, webhook):
    build, worker = stack
    off, _errors, _url = build()
    futures = off.map(errors_app.divide, [[4, 2], [1, 0]], chunksize=2)
    assert futures[0].result(timeout=30) == 2
    with pytest.raises(ZeroDivisionError):
        futures[1].result(timeout=30)
    assert wait_until(lambda: [r for r in webhook.received
                               if (r.get("task") or {}).get("id") == futures[1].id], timeout=15), worker.log_tail()
    [report] = [r for r in webhook.received if (r.get("task") or {}).get("id") == futures[1].id]
    assert report["task"]["name"] == "testapp.errors_app:divide"
    assert report["task"]["args"] == ["1", "0"]
    assert report["exception"]["type"] == "ZeroDivisionError"
    assert not [r for r in webhook.received if (r.get("task") or {}).get("id") == futures[0].id]


def test_submit_error_delay_as_in_the_seed(stack, fogbugz):
    build, worker = stack
    _off, errors, _url = build()
    marker = uuid.uuid4().hex
    errors.submit_error.delay(f"Caught it {marker}", "the extra text",
                              default_message="We know", friendly_response=True, force_new_bug=True)
    assert wait_until(lambda: reports_with(fogbugz, marker, "Description"), timeout=15), worker.log_tail()
    [form] = reports_with(fogbugz, marker, "Description")
    assert form["Description"] == f"Caught it {marker}"
    assert form["Extra"].startswith("the extra text")
    assert form["ScoutDefaultMessage"] == "We know"
    assert form["FriendlyResponse"] == "1" and form["ForceNewBug"] == "1"


def test_a_busy_sink_is_retried_and_a_refusal_is_logged_not_counted(stack, fogbugz):
    build, worker = stack
    _off, errors, _url = build()
    marker = uuid.uuid4().hex
    fogbugz.answers += [(503, "busy"), (200, "<Error>Project Nope does not exist</Error>")]
    errors.submit_error.delay(f"retry me {marker}")
    # 503 -> retried after a backoff; the <Error> answer is a refusal, dropped and logged.
    assert wait_until(lambda: "refused it (FogBugz refused the report: Project Nope" in worker.log_tail(200),
                      timeout=20), worker.log_tail()
    assert "not delivered to fogbugz yet" in worker.log_tail(200)


def test_a_sink_that_stays_down_is_given_up_after_the_configured_time(stack, fogbugz):
    build, worker = stack
    _off, errors, _url = build()
    marker = uuid.uuid4().hex
    posts: list[bytes] = []

    def always_busy(body: bytes):
        if marker.encode() in body:
            posts.append(body)
            return 503, "busy"
        return None

    fogbugz.rule = always_busy
    try:
        errors.submit_error.delay(f"never delivered {marker}")
        # give_up_after=3 s, retry_delay 0.2 s doubled up to 1 s: a few tries, then dropped.
        assert wait_until(lambda: f"never delivered {marker}" in worker.log_tail(300)
                          and "dropped after" in worker.log_tail(300), timeout=30), worker.log_tail()
        assert 2 <= len(posts) <= 10
    finally:
        fogbugz.rule = None


def _failing_requests_answer_fast(url: str, paths: tuple[str, ...]) -> list[str]:
    markers = []
    for path in paths:
        marker = uuid.uuid4().hex
        markers.append(marker)
        started = time.monotonic()
        status, body = request(f"{url}{path}?case={marker}", timeout=5)
        took = time.monotonic() - started
        assert (status, body) == (500, b"")
        # The acceptance bound; the request path never touches the broker.
        assert took < 1.0, f"a failing request took {took:.2f}s with the broker down"
    return markers


def _start_redis(redis_server: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_until(lambda: _listening(port), timeout=10)
    return proc


def _stop_redis(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


def test_broker_down_requests_stay_fast_and_reports_arrive_once_it_is_back(
        data_root, fogbugz, webhook, tmp_path, monkeypatch):
    """A Redis of this test's own (never the shared one) is down, comes up, vanishes, returns."""
    require_service("redis")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI must install it: see .ci/run)")
        pytest.skip("redis-server is not installed")
    port = closed_port()
    broker = f"redis://127.0.0.1:{port}/0"
    monkeypatch.setenv("ERRORS_TEST_DATA_DIR", str(tmp_path / "data"))
    _off, errors = errors_app.make(broker, fogbugz.url, webhook.url, window=0.2)
    server = WebServer(ErrorReporter(errors_app.boom, errors))
    redis = None
    try:
        markers = _failing_requests_answer_fast(server.url, ("/zero", "/key", "/value"))
        assert wait_until(lambda: len(errors.spool) == 3, timeout=30)
        # The broker comes back, then a worker starts: its sweep sends the spool.
        redis = _start_redis(redis_server, port)
        monkeypatch.setenv("ERRORS_TEST_BROKER", broker)
        monkeypatch.setenv("ERRORS_TEST_FOGBUGZ", fogbugz.url)
        worker = WorkerProcess("testapp.errors_app", f"errors-down-{test_id()}@%h",
                               data_root / "worker-errors-down.log")
        try:
            assert wait_until(lambda: all(reports_with(fogbugz, m) for m in markers), timeout=30), \
                worker.log_tail()
            assert len(errors.spool) == 0
            for marker in markers:
                assert len(reports_with(fogbugz, marker)) == 1
            # The broker vanishes under a running worker and a web process, and returns.
            _stop_redis(redis)
            redis = None
            [marker] = _failing_requests_answer_fast(server.url, ("/value",))
            assert wait_until(lambda: len(errors.spool) == 1, timeout=30)
            redis = _start_redis(redis_server, port)
            assert wait_until(lambda: reports_with(fogbugz, marker), timeout=60), worker.log_tail()
            assert len(errors.spool) == 0
        finally:
            worker.stop()
    finally:
        if redis is not None:
            _stop_redis(redis)
        server.close()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_flask_reports_through_its_own_error_path(stack, fogbugz):
    flask = pytest.importorskip("flask")
    from offload.errors.flask import report_errors

    build, worker = stack
    _off, errors, _url = build()
    app = flask.Flask("errors_flask")

    @app.route("/orders/<int:n>")
    def order(n):
        return str(n // 0)

    @app.route("/missing")
    def missing():
        flask.abort(404)

    assert report_errors(app, errors) is errors
    server = WebServer(app)
    try:
        marker = uuid.uuid4().hex
        status, body = request(f"{server.url}/orders/7?case={marker}&token={SECRET}")
        assert status == 500 and b"Traceback" not in body and b"ZeroDivision" not in body
        assert request(f"{server.url}/missing?case={marker}")[0] == 404
        assert wait_until(lambda: reports_with(fogbugz, marker), timeout=10), worker.log_tail()
        [form] = reports_with(fogbugz, marker)
        assert form["Description"].startswith("ZeroDivisionError") and "in order" in form["Description"]
        assert "/orders/7" in form["Extra"] and SECRET not in str(form)
    finally:
        server.close()


def test_pyramid_tween_reports_and_leaves_the_exception_views_in_charge(stack, fogbugz):
    pytest.importorskip("pyramid")
    from pyramid.config import Configurator
    from pyramid.httpexceptions import HTTPNotFound
    from pyramid.response import Response

    build, worker = stack
    _off, errors, _url = build()

    def broken(request):
        raise LookupError("no ledger " + request.matchdict["name"])

    def missing(request):
        raise HTTPNotFound()

    def oops(exc, request):
        return Response("Something went wrong", status=500)

    with Configurator() as config:
        config.include("offload.errors.pyramid")
        config.add_error_reporting(errors)
        config.add_route("ledger", "/ledgers/{name}")
        config.add_view(broken, route_name="ledger")
        config.add_route("missing", "/missing")
        config.add_view(missing, route_name="missing")
        config.add_exception_view(oops, context=LookupError)
        app = config.make_wsgi_app()
    server = WebServer(app)
    try:
        marker = uuid.uuid4().hex
        assert request(f"{server.url}/ledgers/main?case={marker}") == (500, b"Something went wrong")
        assert request(f"{server.url}/missing?case={marker}")[0] == 404
        assert wait_until(lambda: reports_with(fogbugz, marker), timeout=10), worker.log_tail()
        [form] = reports_with(fogbugz, marker)
        assert form["Description"].startswith("LookupError: no ledger main")
    finally:
        server.close()


def test_asgi_app_behind_a_real_server_reports(stack, fogbugz):
    uvicorn = pytest.importorskip("uvicorn")
    from offload.errors import ASGIErrorReporter

    build, worker = stack
    _off, errors, _url = build()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        raise ArithmeticError("async " + scope["path"])

    port = closed_port()
    config = uvicorn.Config(ASGIErrorReporter(app, errors), host="127.0.0.1", port=port,
                            log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=15)
        marker = uuid.uuid4().hex
        status, body = request(f"http://127.0.0.1:{port}/stats?case={marker}",
                               headers={"Authorization": f"Bearer {SECRET}"})
        assert (status, body) == (500, b"")
        assert wait_until(lambda: reports_with(fogbugz, marker), timeout=10), worker.log_tail()
        [form] = reports_with(fogbugz, marker)
        assert form["Description"].startswith("ArithmeticError: async /stats")
        assert SECRET not in str(form)
    finally:
        server.should_exit = True
        thread.join(10)
