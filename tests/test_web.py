"""The web task API (offload.web) over real servers on loopback: uvicorn for
ASGI, a threaded wsgiref server for WSGI, each against a real worker on the
embedded broker (and the main flows on Redis)."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from offload import Offload
from offload.exceptions import ConfigurationError, InvalidTaskId
from offload.ids import RULE
from offload.web import TaskAPI
from testapp import webtasks
from testapp.webservers import serve
from web_fixtures import ALLOWED, make_api, start

OTHER = "http://evil.example"

pytestmark = pytest.mark.timeout(120)


def final(client, task_id) -> dict:
    for _ in range(10):
        data = client.get(f"/offload/tasks/{task_id}", params={"wait": 20}).json()
        if data["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return data
    raise AssertionError(f"{task_id} did not end: {data}")


def sse_events(client, task_id, headers=None, limit=None, until=None):
    """The data objects of a task's event stream (and the raw text).

    Stops reading (hangs up) after ``limit`` events or once ``until(event)`` holds.
    """
    events, raw = [], []
    with client.stream("GET", f"/offload/tasks/{task_id}/events", headers=headers) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            raw.append(line)
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if (limit and len(events) >= limit) or (until and until(events[-1])):
                    break
    return events, raw


# REST ------------------------------------------------------------------------


def test_submit_answers_202_with_location_then_long_poll_has_the_result(client):
    answer = client.post("/offload/tasks/add", json={"args": [2], "kwargs": {"y": 3}})
    assert answer.status_code == 202
    task_id = answer.json()["id"]
    assert answer.headers["location"] == f"/offload/tasks/{task_id}"
    data = client.get(answer.headers["location"], params={"wait": 20}).json()
    assert data == {"id": task_id, "state": "SUCCESS", "progress": None, "result": 5}


def test_short_name_full_name_and_chosen_name(client):
    assert final(client, start(client, "add", 1, 1))["result"] == 2
    assert final(client, start(client, "testapp.webtasks.add", 2, 2))["result"] == 4
    assert final(client, start(client, "echo", "ab", times=2))["result"] == "abab"


def test_only_exposed_tasks_are_reachable(client):
    for name in ("testapp.webtasks.private_mul", "private_mul", "offload.dispatch", "testapp.noop", "nope"):
        answer = client.post(f"/offload/tasks/{name}", json={"args": [1, 2]})
        assert answer.status_code == 404, name
        assert answer.json()["error"]["type"] == "UnknownTask"


def test_malformed_json_is_400_with_a_json_error(client):
    answer = client.post("/offload/tasks/add", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "MalformedJSON"
    for body in (b"[1, 2]", b'{"args": [1], "extra": 1}', b'{"args": {"x": 1}}', b"\xff\xfe"):
        answer = client.post("/offload/tasks/add", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, body
        assert set(answer.json()["error"]) == {"type", "message"}


def test_wrong_arguments_are_422_with_the_signature(client):
    for body in ({"args": [1, 2, 3]}, {"kwargs": {"z": 1}}, {}, {"args": [1], "kwargs": {"x": 2}}):
        answer = client.post("/offload/tasks/add", json=body)
        assert answer.status_code == 422, body
        assert "add(x: int, y: int = 0) -> int" in answer.json()["error"]["message"]


def test_failure_is_type_and_message_never_a_traceback(client):
    task_id = start(client, "fail", "no luck")
    answer = client.get(f"/offload/tasks/{task_id}", params={"wait": 20})
    assert answer.json() == {"id": task_id, "state": "FAILURE",
                             "error": {"type": "ValueError", "message": "no luck"}}
    assert "Traceback" not in answer.text and "File " not in answer.text


def test_long_poll_answers_after_the_wait_when_the_task_runs_on(client, tmp_path):
    release = tmp_path / "release"
    task_id = start(client, "wait_for_file", str(release))
    data = client.get(f"/offload/tasks/{task_id}", params={"wait": 0.5}).json()
    assert data["state"] in ("PENDING", "STARTED", "PROGRESS")
    release.touch()
    assert final(client, task_id)["result"] == "released"


def test_status_without_wait_and_bad_queries(client, web_off, tmp_path):
    task_id = web_off.options(expose=True, countdown=300).submit(webtasks.add, 1, 2).id
    assert client.get(f"/offload/tasks/{task_id}").json() == {
        "id": task_id, "state": "PENDING", "progress": None, "result": None}
    for wait in ("abc", "-1", "nan", "inf"):
        answer = client.get(f"/offload/tasks/{task_id}", params={"wait": wait})
        assert answer.status_code == 400
        assert answer.json()["error"]["type"] == "BadWait"
    assert client.get("/offload/tasks/%20bad%20id").status_code == 400
    assert client.get("/offload/nowhere").status_code == 404
    answer = client.put(f"/offload/tasks/{task_id}")
    assert answer.status_code == 405 and "GET" in answer.headers["allow"]


def test_a_task_id_is_read_by_the_rule_of_offload_ids(client, web_off):
    """An id the app chose is served like a UUID; what breaks the rule is 400 BadTaskId."""
    chosen = f"report:{uuid.uuid4().hex[:8]}~(1)"
    web_off.options(expose=True, task_id=chosen).submit(webtasks.add, 1, 2)
    assert final(client, chosen) == {"id": chosen, "state": "SUCCESS", "progress": None, "result": 3}
    for raw in ("%20bad%20id", "a%3Cb%3E", "%C3%A9t%C3%A9", "%2E%2E", "x" * 256, "a%00b", "a%5Cb"):
        answer = client.get(f"/offload/tasks/{raw}")
        assert answer.status_code == 400, raw
        assert answer.json()["error"] == {"type": "BadTaskId", "message": RULE}, raw
    status = rpc(client, {"jsonrpc": "2.0", "method": "task.status", "params": ["a b"], "id": 1})
    assert status["error"]["code"] == -32602 and RULE in status["error"]["message"]
    with pytest.raises(InvalidTaskId, match="is not a task id"):
        web_off.options(task_id="a/b")


def test_body_over_max_body_is_413(web_off, kind):
    with serve(kind, make_api(web_off, max_body=100)) as url, httpx.Client(base_url=url) as c:
        answer = c.post("/offload/tasks/echo", json={"args": ["x" * 500]})
        assert answer.status_code == 413
        assert answer.json()["error"]["type"] == "TooLarge"

        def chunks():  # no Content-Length: chunked transfer
            yield b'{"args": ["'
            for _ in range(20):
                yield b"x" * 50
            yield b'"]}'

        if kind == "asgi":  # wsgiref does not take chunked request bodies
            assert c.post("/offload/tasks/echo", content=chunks()).status_code == 413
        assert c.post("/offload/rpc", content=b"[" + b"1," * 100 + b"1]").status_code == 413


def test_authorize_refuses_with_403(web_off, kind):
    def authorize(info, task_name):
        return info.headers.get("x-user") == "alice" and task_name != "testapp.webtasks.fail"

    with serve(kind, make_api(web_off, authorize=authorize)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/offload/tasks/add", json={"args": [1]}).status_code == 403
        alice = {"x-user": "alice"}
        assert c.post("/offload/tasks/add", json={"args": [1]}, headers=alice).status_code == 202
        refused = c.post("/offload/tasks/fail", json={"args": ["x"]}, headers=alice)
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "Forbidden"
        rpc = c.post("/offload/rpc", json={"jsonrpc": "2.0", "method": "add", "params": [1], "id": 1}).json()
        assert rpc["error"]["code"] == -32001


def test_unreachable_broker_is_503_and_wrong_arguments_are_checked_first(kind, tmp_path):
    # The result store answers (the calls' marks are written): the broker is what fails.
    broken = Offload({"CELERY_BROKER_URL": "redis://127.0.0.1:1/0", "OFFLOAD_DATA_DIR": str(tmp_path),
                      "CELERY_RESULT_BACKEND": "sqlite://"})
    from testapp.webtasks import add

    broken.task(expose=True)(add)
    with serve(kind, make_api(broken)) as url, httpx.Client(base_url=url, timeout=60) as c:
        # 422 without touching the broker: nothing is queued for a bad call.
        assert c.post("/offload/tasks/add", json={"args": []}).status_code == 422
        answer = c.post("/offload/tasks/add", json={"args": [1, 2]})
        assert answer.status_code == 503
        assert answer.json()["error"]["type"] == "BrokerUnavailable"
        assert "unreachable" in answer.json()["error"]["message"]
        assert answer.headers["retry-after"]
        rpc = c.post("/offload/rpc", json={"jsonrpc": "2.0", "method": "add", "params": [1], "id": 7}).json()
        assert rpc["error"]["code"] == -32002 and rpc["id"] == 7


def test_an_unreachable_result_store_is_named_and_the_call_not_sent(kind, tmp_path):
    """The embedded broker answers, the result store (a Redis on a closed
    port) does not: a call's mark for the web API cannot be written, so the
    call is not sent. The API answers 503 BackendUnavailable; submit raises
    BrokerUnavailable (what it documents) naming the store, not the broker;
    nothing is queued."""
    from offload.exceptions import BrokerUnavailable

    broken = Offload({"OFFLOAD_DATA_DIR": str(tmp_path), "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/0"})
    from testapp.webtasks import add

    task = broken.task(expose=True)(add)
    with serve(kind, make_api(broken)) as url, httpx.Client(base_url=url, timeout=60) as c:
        answer = c.post("/offload/tasks/add", json={"args": [1, 2]})
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert answer.json()["error"]["type"] == "BackendUnavailable"
        assert "result store" in answer.json()["error"]["message"]
        rpc = c.post("/offload/rpc", json={"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 3}).json()
        assert rpc["error"]["code"] == -32002 and "result store" in rpc["error"]["message"]
        status = c.get(f"/offload/tasks/{uuid.uuid4()}")  # reading a state needs the store too
        assert status.status_code == 503 and status.json()["error"]["type"] == "BackendUnavailable"
    for send in (lambda: broken.submit(task, 1, 2), lambda: task.delay(1, 2)):
        with pytest.raises(BrokerUnavailable, match=r"the result store at 'redis://127.0.0.1:1/0' did not answer"):
            send()
    with broken.celery.connection_for_write() as conn:
        queue = broken.celery.conf.task_default_queue
        assert conn.default_channel.queue_declare(queue, passive=False).message_count == 0


# Server-sent events ------------------------------------------------------------


def test_events_stream_each_state_then_close(client):
    task_id = start(client, "steps", 5, pause=0.3)
    events, raw = sse_events(client, task_id)
    assert raw[0] == "retry: 2000"
    states = [e["state"] for e in events]
    assert states[-1] == "SUCCESS" and events[-1]["result"] == 5
    assert "PROGRESS" in states
    progress = [e["progress"] for e in events if e["state"] == "PROGRESS"]
    assert all(p["total"] == 5 and "percent" in p for p in progress)
    assert len(events) == len({json.dumps(e, sort_keys=True) for e in events})  # only changes


def test_event_stream_keeps_alive_and_is_bounded_by_max_stream(web_off, kind, tmp_path):
    release = tmp_path / "release"
    api = make_api(web_off, keepalive=0.2, max_stream=1.5)
    with serve(kind, api) as url, httpx.Client(base_url=url, timeout=60) as c:
        task_id = start(c, "wait_for_file", str(release))
        events, raw = sse_events(c, task_id)  # returns when the server closes the stream
        assert ": keep-alive" in raw
        assert events and not any(e["state"] == "SUCCESS" for e in events)
        release.touch()
        assert final(c, task_id)["result"] == "released"


def test_a_waiter_that_leaves_never_cancels_the_task(client, tmp_path):
    release = tmp_path / "release"
    task_id = start(client, "wait_for_file", str(release))
    events, _ = sse_events(client, task_id, limit=1)  # then the client hangs up
    assert events[0]["id"] == task_id
    assert client.get(f"/offload/tasks/{task_id}", params={"wait": 0.2}).json()["state"] != "REVOKED"
    release.touch()
    assert final(client, task_id)["result"] == "released"


def test_delete_does_not_kill_running_work_and_revokes_what_has_not_started(client, web_off, tmp_path):
    release = tmp_path / "release"
    task_id = start(client, "wait_for_file", str(release))
    sse_events(client, task_id, until=lambda e: e["state"] == "PROGRESS")
    answer = client.delete(f"/offload/tasks/{task_id}")
    assert answer.status_code == 200 and answer.json()["cancelled"] is False
    release.touch()
    assert final(client, task_id)["result"] == "released"
    not_started = web_off.options(expose=True, countdown=300).submit(webtasks.add, 1, 2).id
    answer = client.delete(f"/offload/tasks/{not_started}").json()
    assert answer["cancelled"] is True and answer["state"] == "REVOKED"


# JSON-RPC 2.0 ------------------------------------------------------------------


def rpc(client, payload, status=200):
    answer = client.post("/offload/rpc", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    return answer.json() if answer.content else None


def test_rpc_starts_a_task_and_reads_its_status_and_result(client):
    call = rpc(client, {"jsonrpc": "2.0", "method": "add", "params": [20, 22], "id": "a"})
    task_id = call["result"]
    assert call == {"jsonrpc": "2.0", "result": task_id, "id": "a"}
    result = rpc(client, {"jsonrpc": "2.0", "method": "task.result", "params": {"id": task_id, "timeout": 20}, "id": 2})
    assert result == {"jsonrpc": "2.0", "result": 42, "id": 2}
    status = rpc(client, {"jsonrpc": "2.0", "method": "task.status", "params": [task_id], "id": 3})
    assert status["result"] == client.get(f"/offload/tasks/{task_id}").json()
    named = rpc(client, {"jsonrpc": "2.0", "method": "echo", "params": {"text": "hi"}, "id": 4})
    assert rpc(client, {"jsonrpc": "2.0", "method": "task.result", "params": [named["result"], 20], "id": 5})["result"] == "hi"


def test_rpc_task_failure_and_not_finished_are_server_errors(client, tmp_path):
    failing = rpc(client, {"jsonrpc": "2.0", "method": "fail", "params": ["bad"], "id": 1})["result"]
    error = rpc(client, {"jsonrpc": "2.0", "method": "task.result", "params": [failing, 20], "id": 1})["error"]
    assert error["code"] == -32000 and error["message"] == "ValueError: bad"
    assert error["data"]["error"] == {"type": "ValueError", "message": "bad"}
    release = tmp_path / "release"
    waiting = rpc(client, {"jsonrpc": "2.0", "method": "wait_for_file", "params": [str(release)], "id": 1})["result"]
    error = rpc(client, {"jsonrpc": "2.0", "method": "task.result", "params": [waiting, 0.3], "id": 1})["error"]
    assert error["code"] == -32003 and error["data"]["id"] == waiting
    release.touch()
    assert rpc(client, {"jsonrpc": "2.0", "method": "task.result", "params": [waiting], "id": 1})["result"] == "released"


def test_rpc_spec_errors(client):
    parse = client.post("/offload/rpc", content=b'{"jsonrpc": "2.0", "method"',
                        headers={"content-type": "application/json"}).json()
    assert parse == {"jsonrpc": "2.0", "error": {"code": -32700, "message": parse["error"]["message"]}, "id": None}
    assert rpc(client, [])["error"]["code"] == -32600
    assert rpc(client, {"jsonrpc": "1.0", "method": "add", "id": 1})["error"]["code"] == -32600
    assert rpc(client, {"jsonrpc": "2.0", "method": 5, "id": 1})["error"]["code"] == -32600
    assert rpc(client, {"jsonrpc": "2.0", "method": "add", "params": 3, "id": 1})["error"]["code"] == -32600
    assert rpc(client, {"jsonrpc": "2.0", "method": "nope", "id": 1})["error"]["code"] == -32601
    assert rpc(client, {"jsonrpc": "2.0", "method": "private_mul", "params": [1, 2], "id": 1})["error"]["code"] == -32601
    bad = rpc(client, {"jsonrpc": "2.0", "method": "add", "params": [1, 2, 3], "id": 1})["error"]
    assert bad["code"] == -32602 and "add(x: int, y: int = 0)" in bad["message"]
    assert rpc(client, {"jsonrpc": "2.0", "method": "task.status", "params": [], "id": 1})["error"]["code"] == -32602
    assert rpc(client, {"jsonrpc": "2.0", "method": "task.result", "params": ["x", "soon"], "id": 1})["error"]["code"] == -32602


def test_rpc_batches_and_notifications(client):
    batch = rpc(client, [
        {"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": [3, 4]},           # a notification: no answer
        {"jsonrpc": "2.0", "method": "nope", "id": 2},
        1,
        {"jsonrpc": "2.0", "method": "nope"},                            # failing notification: silent too
    ])
    assert [a["id"] for a in batch] == [1, 2, None]
    assert isinstance(batch[0]["result"], str)
    assert batch[1]["error"]["code"] == -32601 and batch[2]["error"]["code"] == -32600
    assert rpc(client, [{"jsonrpc": "2.0", "method": "add", "params": [1, 2]}], status=204) is None
    assert rpc(client, {"jsonrpc": "2.0", "method": "add", "params": [1, 2]}, status=204) is None


def test_rpc_cancel(client, web_off):
    not_started = web_off.options(expose=True, countdown=300).submit(webtasks.add, 1, 2).id
    answer = rpc(client, {"jsonrpc": "2.0", "method": "task.cancel", "params": [not_started], "id": 1})
    assert answer["result"]["cancelled"] is True and answer["result"]["state"] == "REVOKED"


# CORS --------------------------------------------------------------------------


def preflight(client, path, origin, method="POST", headers="content-type"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": headers})


@pytest.mark.parametrize("path,method", [("/offload/rpc", "POST"), ("/offload/tasks/add", "POST"),
                                         ("/offload/tasks/abc/events", "GET"), ("/offload/tasks/abc", "DELETE")])
def test_preflight_of_an_allowed_origin(client, path, method):
    answer = preflight(client, path, ALLOWED, method)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    assert method in answer.headers["access-control-allow-methods"]
    assert "content-type" in answer.headers["access-control-allow-headers"].lower()
    assert "Origin" in answer.headers["vary"]
    assert int(answer.headers["access-control-max-age"]) > 0
    assert "access-control-allow-credentials" not in answer.headers


def test_a_disallowed_origin_gets_no_allow_origin(client):
    answer = preflight(client, "/offload/rpc", OTHER)
    assert "access-control-allow-origin" not in answer.headers
    answer = client.get(f"/offload/tasks/{start(client, 'add', 1)}", headers={"Origin": OTHER})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
    assert "Origin" in answer.headers["vary"]


def test_actual_answers_and_the_event_stream_carry_cors_headers(client):
    task_id = start(client, "add", 1, 2)
    answer = client.post("/offload/tasks/add", json={"args": [1]}, headers={"Origin": ALLOWED})
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    assert "Location" in answer.headers["access-control-expose-headers"]
    with client.stream("GET", f"/offload/tasks/{task_id}/events", headers={"Origin": ALLOWED}) as stream:
        assert stream.headers["access-control-allow-origin"] == ALLOWED
        stream.read()
    error = client.post("/offload/tasks/nope", json={}, headers={"Origin": ALLOWED})
    assert error.status_code == 404 and error.headers["access-control-allow-origin"] == ALLOWED


def test_credentials_name_the_origin_and_star_with_credentials_is_refused(web_off, kind):
    with serve(kind, make_api(web_off, cors_credentials=True)) as url, httpx.Client(base_url=url) as c:
        answer = preflight(c, "/offload/rpc", ALLOWED)
        assert answer.headers["access-control-allow-origin"] == ALLOWED
        assert answer.headers["access-control-allow-credentials"] == "true"
        simple = c.get(f"/offload/tasks/{uuid.uuid4()}", headers={"Origin": ALLOWED})
        assert simple.headers["access-control-allow-origin"] == ALLOWED
    with pytest.raises(ConfigurationError, match="cookies"):
        make_api(web_off, cors_origins=["*"], cors_credentials=True)
    with pytest.raises(ConfigurationError, match="origin"):
        make_api(web_off, cors_origins=["http://app.example/"])


# Declaration-time checks ---------------------------------------------------------


def test_two_exposed_tasks_with_one_short_name_are_an_error(tmp_path):
    import testapp
    from testapp import webtasks

    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path)})
    off.task(expose=True)(webtasks.add)
    # testapp.add and testapp.webtasks.add both answer to "add": refused where
    # it is declared, before Celery registers anything.
    with pytest.raises(ConfigurationError, match="'add'.*name="):
        off.task(expose=True)(testapp.add)
    assert "testapp.add" not in off.celery.tasks
    with pytest.raises(ConfigurationError, match="'add'"):
        off.task(name="add", expose=True)(testapp.mul)  # a chosen name clashes too
    assert TaskAPI(off).tasks.find("add") is off.celery.tasks["testapp.webtasks.add"]
    # The same name given again, not exposed, or exposed under another name: fine.
    off.task(expose=True)(webtasks.add)
    off.task(name="plus", expose=True)(testapp.add)
    assert TaskAPI(off).tasks.find("plus").name == "plus"


def test_bad_options_are_clear_errors(web_off):
    for options in ({"prefix": "offload"}, {"prefix": "/offload/"}, {"max_body": 0}, {"max_wait": -1},
                    {"authorize": "yes"}, {"cors_origins": "http://a.example"}):
        with pytest.raises(ConfigurationError):
            TaskAPI(web_off, **options)


# On Redis: the main flows --------------------------------------------------------


def test_main_flows_on_each_broker(any_off, kind):
    with serve(kind, make_api(any_off)) as url, httpx.Client(base_url=url, timeout=60) as c:
        task_id = start(c, "steps", 3, pause=0.1)
        events, _ = sse_events(c, task_id)
        assert events[-1]["state"] == "SUCCESS" and events[-1]["result"] == 3
        assert final(c, start(c, "add", 5, 6))["result"] == 11
        call = rpc(c, {"jsonrpc": "2.0", "method": "add", "params": [1, 1], "id": 1})
        assert rpc(c, {"jsonrpc": "2.0", "method": "task.result", "params": [call["result"]], "id": 2})["result"] == 2


# Bad luck and attackers -------------------------------------------------------------


def test_a_failing_hook_is_a_500_that_leaks_nothing(web_off, kind):
    def authorize(info, task_name):
        raise RuntimeError("database password is hunter2")

    with serve(kind, make_api(web_off, authorize=authorize)) as url, httpx.Client(base_url=url) as c:
        answer = c.post("/offload/tasks/add", json={"args": [1]}, headers={"Origin": ALLOWED})
        assert answer.status_code == 500
        assert answer.json() == {"error": {"type": "InternalError",
                                           "message": "the server could not answer; see its log"}}
        assert answer.headers["access-control-allow-origin"] == ALLOWED  # the page can read why
        assert "hunter2" not in answer.text and "Traceback" not in answer.text


def test_a_malformed_content_length_is_400(web_off, kind):
    import socket

    with serve(kind, make_api(web_off)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /offload/tasks/add HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n"
                         b"Connection: close\r\n\r\n{}")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n", 1)[0]
        assert b"Traceback" not in reply
