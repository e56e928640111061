"""The web task API against bad input and attackers, over WSGI and ASGI, real
servers on loopback and a real worker on the embedded broker: bounded
standard JSON in and out, bodies only as JSON, only tasks marked for the web,
failures shown only where the task made them public."""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import pytest
from testapp import webtasks
from testapp.webservers import serve
from web_fixtures import make_api, start

from offload import TaskError
from offload.exceptions import ConfigurationError
from offload.web import TaskAPI
from offload.web.cors import CorsConfig

JSON = {"content-type": "application/json"}

pytestmark = pytest.mark.timeout(120)


def strict(text: str | bytes):
    """Parse as a browser's JSON.parse would: NaN and Infinity are errors."""
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON: {text[:200]!r}")

    return json.loads(text, parse_constant=refuse)


def final(client, task_id) -> dict:
    for _ in range(10):
        data = strict(client.get(f"/offload/tasks/{task_id}", params={"wait": 20}).text)
        if data["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return data
    raise AssertionError(f"{task_id} did not end: {data}")


def events(client, task_id) -> list[dict]:
    found = []
    with client.stream("GET", f"/offload/tasks/{task_id}/events") as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                found.append(strict(line[6:]))
    return found


def rpc(client, payload, content_type="application/json"):
    answer = client.post("/offload/rpc", content=payload if isinstance(payload, bytes) else json.dumps(payload),
                         headers={"content-type": content_type})
    assert answer.status_code in (200, 204), answer.text
    return strict(answer.text) if answer.content else None


def raw_exchange(url: str, request: bytes) -> bytes:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


# Bounded parsing ------------------------------------------------------------------


def test_json_nested_100000_deep_is_a_400_and_a_parse_error(client):
    body = b"[" * 100_000 + b"]" * 100_000  # 200 KB, under max_body
    answer = client.post("/offload/tasks/add", content=body, headers=JSON)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "MalformedJSON"
    assert "deeper than 64 levels" in answer.json()["error"]["message"]
    parse = rpc(client, body)
    assert parse["error"]["code"] == -32700 and "deeper than 64 levels" in parse["error"]["message"]
    # The limit itself: 64 levels pass the parser (and fail the signature), 65 do not.
    ok = client.post("/offload/tasks/echo", content=b'{"args": [' + b"[" * 62 + b"]" * 62 + b"]}", headers=JSON)
    assert ok.status_code == 422
    deep = client.post("/offload/tasks/echo", content=b'{"args": [' + b"[" * 63 + b"]" * 63 + b"]}", headers=JSON)
    assert deep.status_code == 400


def test_a_5000_digit_integer_says_what_the_api_accepts(client):
    answer = client.post("/offload/tasks/add", content=b'{"args": [' + b"7" * 5000 + b"]}", headers=JSON)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "at most 100 digits" in message and "as a string" in message
    assert "set_int_max_str_digits" not in message
    assert rpc(client, b'{"jsonrpc": "2.0", "method": "add", "params": [' + b"7" * 5000 + b'], "id": 1}')[
        "error"]["code"] == -32700


# Standard JSON only --------------------------------------------------------------------


@pytest.mark.parametrize("body", [b'{"args": [1e999999, 1]}', b'{"args": [NaN, 1]}', b'{"args": [Infinity]}',
                                  b'{"kwargs": {"x": -Infinity}}'])
def test_non_finite_arguments_are_422(client, body):
    answer = client.post("/offload/tasks/add", content=body, headers=JSON)
    assert answer.status_code == 422, answer.text
    assert "NaN or an infinity" in answer.json()["error"]["message"]
    call = b'{"jsonrpc": "2.0", "method": "add", "params": ' + body[9:-1] + b', "id": 1}'
    if body.startswith(b'{"args"'):
        assert rpc(client, call)["error"]["code"] == -32602


def test_a_result_holding_nan_or_infinity_is_an_error_that_says_so(client):
    for value in ("nan", "inf", "-inf"):
        task_id = start(client, "non_finite", value)
        data = final(client, task_id)
        assert data["state"] == "SUCCESS" and "result" not in data
        assert data["error"]["type"] == "NonFiniteResult" and "result" in data["error"]["message"]
        assert events(client, task_id)[-1]["error"]["type"] == "NonFiniteResult"
        status = rpc(client, {"jsonrpc": "2.0", "method": "task.status", "params": [task_id], "id": 1})
        assert status["result"]["error"]["type"] == "NonFiniteResult"
        result = rpc(client, {"jsonrpc": "2.0", "method": "task.result", "params": [task_id, 5], "id": 2})
        assert result["error"]["code"] == -32000 and "NonFiniteResult" in result["error"]["message"]


def test_progress_holding_infinity_is_never_sent(client):
    task_id = start(client, "non_finite", "inf", where="progress")
    seen = events(client, task_id)  # strict() fails on any Infinity
    assert seen[-1]["result"] == "done"


def test_a_json_rpc_id_of_nan_is_refused_and_starts_nothing(client, web_off):
    answer = rpc(client, b'{"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": NaN}')
    assert answer == {"jsonrpc": "2.0", "error": answer["error"], "id": None}
    assert answer["error"]["code"] == -32600
    answer = rpc(client, b'{"method": "add", "params": [1, 2], "id": Infinity}')  # 1.0 alike
    assert answer["error"]["code"] == -32600 and answer["id"] is None


# What a failed task shows ----------------------------------------------------------------


def test_a_failure_shows_a_generic_message_unless_its_type_is_public(client):
    leaked = start(client, "leak", "s3cret")
    data = final(client, leaked)
    assert data["state"] == "FAILURE"
    assert data["error"]["type"] == "TaskFailed" and leaked in data["error"]["message"]
    assert "s3cret" not in json.dumps(data) and "RuntimeError" not in json.dumps(data)
    assert "s3cret" not in json.dumps(events(client, leaked))
    answer = rpc(client, {"jsonrpc": "2.0", "method": "task.result", "params": [leaked, 5], "id": 1})
    assert answer["error"]["code"] == -32000 and "s3cret" not in json.dumps(answer)
    assert "s3cret" not in json.dumps(rpc(client, {"jsonrpc": "2.0", "method": "task.status",
                                                   "params": [leaked], "id": 2}))
    # A TaskError subclass, and a type the task lists in public_errors, keep their message.
    refused = final(client, start(client, "refuse", "tea"))
    assert refused["error"] == {"type": "OutOfStock", "message": "tea is sold out"}
    assert events(client, start(client, "fail", "no luck"))[-1]["error"] == {
        "type": "ValueError", "message": "no luck"}


def test_public_errors_must_be_exception_types(web_off):
    with pytest.raises(TypeError, match="exception types"):
        web_off.task(public_errors=("ValueError",))(webtasks.nothing)
    with pytest.raises(TypeError, match="expose=True"):
        web_off.options(public_errors=(ValueError,))
    assert issubclass(TaskError, Exception)


# Only tasks marked for the web ---------------------------------------------------------


def test_a_task_the_server_sent_for_itself_is_never_served(client, web_off):
    secret = web_off.submit(web_off.celery.tasks["testapp.webtasks.secret_probe"])
    assert secret.result(timeout=30) == "api-key-0123456789"
    for task_id in (secret.id, str(uuid.uuid4())):  # the same answer as for no task at all
        answer = client.get(f"/offload/tasks/{task_id}")
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "UnknownTaskId"
        assert client.get(f"/offload/tasks/{task_id}", params={"wait": 1}).status_code == 404
        assert client.get(f"/offload/tasks/{task_id}/events").status_code == 404
        assert client.delete(f"/offload/tasks/{task_id}").status_code == 404
        for method in ("task.status", "task.result", "task.cancel"):
            answer = rpc(client, {"jsonrpc": "2.0", "method": method, "params": [task_id], "id": 1})
            assert answer["error"]["code"] == -32004, answer
    assert "api-key" not in client.get(f"/offload/tasks/{secret.id}").text
    assert web_off.get(secret.id).result(timeout=10) == "api-key-0123456789"  # not revoked


def test_a_view_can_expose_what_it_submits_and_another_process_serves_it(client, web_off, kind):
    import testapp

    # The celery-progress pattern: a view starts work for the browser to follow.
    plain = web_off.options(expose=True).submit(testapp.add, 20, 22)
    registered = web_off.options(expose=True).submit(web_off.celery.tasks["testapp.webtasks.private_mul"], 6, 7)
    mapped = web_off.options(expose=True).map(testapp.add, [[1, 1], [2, 2], [3, 3]], chunksize=2)
    assert final(client, plain.id)["result"] == 42
    assert final(client, registered.id)["result"] == 42
    assert [final(client, f.id)["result"] for f in mapped] == [2, 4, 6]
    # A second Offload, as another web process has, knows nothing in memory: it reads the marks.
    other = webtasks.make("embedded")
    with serve(kind, make_api(other)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert final(c, plain.id)["result"] == 42
        assert c.get(f"/offload/tasks/{web_off.submit(testapp.add, 1, 1).id}").status_code == 404


def test_authorize_is_asked_on_reads_and_cancels_with_the_task(web_off, kind):
    owners: dict[str, str] = {}
    asked = []

    def authorize(info, name):
        asked.append((name, info.task_id, info.task_name))
        if info.task_id is None:  # starting a task: anyone
            return True
        return owners.get(info.task_id) == info.headers.get("x-user")

    api = make_api(web_off, authorize=authorize)
    with serve(kind, api) as url, httpx.Client(base_url=url, timeout=60) as c:
        task_id = start(c, "add", 1, 2)
        owners[task_id] = "alice"
        alice, bob = {"x-user": "alice"}, {"x-user": "bob"}
        assert c.get(f"/offload/tasks/{task_id}", headers=bob).status_code == 403
        assert c.get(f"/offload/tasks/{task_id}/events", headers=bob).status_code == 403
        assert c.delete(f"/offload/tasks/{task_id}", headers=bob).status_code == 403
        refused = c.post("/offload/rpc", json={"jsonrpc": "2.0", "method": "task.result",
                                               "params": [task_id], "id": 1}, headers=bob).json()
        assert refused["error"]["code"] == -32001
        assert c.get(f"/offload/tasks/{task_id}", params={"wait": 20}, headers=alice).json()["result"] == 3
        assert c.delete(f"/offload/tasks/{task_id}", headers=alice).status_code == 200
    assert ("testapp.webtasks.add", task_id, "testapp.webtasks.add") in asked  # a read
    assert ("task.cancel", task_id, "testapp.webtasks.add") in asked  # a cancel, with id and name


# Bodies only as JSON -----------------------------------------------------------------


def test_a_body_not_sent_as_json_is_415_and_starts_nothing(client, tmp_path):
    body = json.dumps({"args": [str(tmp_path / "never")]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/json; charset=latin-1", None):
        headers = {"content-type": content_type} if content_type else {}
        answer = client.post("/offload/tasks/wait_for_file", content=body, headers=headers)
        assert answer.status_code == 415, content_type
        assert "application/json" in answer.json()["error"]["message"]
        call = {"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 1}
        assert client.post("/offload/rpc", content=json.dumps(call), headers=headers).status_code == 415
    # text/plain is what a page on any origin may send without a preflight:
    # nothing was started by those requests.
    assert client.post("/offload/tasks/add", content=b'{"args": [1]}',
                       headers={"content-type": "application/json; charset=utf-8"}).status_code == 202
    assert client.post("/offload/tasks/add", content=b'{"args": [1]}',
                       headers={"content-type": "application/json-rpc"}).status_code == 415
    assert rpc(client, {"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 1},
               content_type="application/json-rpc")["id"] == 1


def test_content_length_is_digits_only(web_off, kind):
    with serve(kind, make_api(web_off)) as url:
        for length in (b"1_4", b"+14"):
            reply = raw_exchange(url, b"POST /offload/tasks/add HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Type: application/json\r\nContent-Length: " + length +
                                      b"\r\nConnection: close\r\n\r\n{\"args\": [1]}")
            assert b" 400 " in reply.split(b"\r\n", 1)[0], reply[:200]


def test_a_chunked_body_is_411_where_the_server_hands_it_over_undecoded(web_off, kind):
    chunked = (b"POST /offload/tasks/nothing HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    with serve(kind, make_api(web_off)) as url:
        status = raw_exchange(url, chunked).split(b"\r\n", 1)[0]
    # wsgiref passes the chunks on as they came (read as empty, the task
    # would start with no arguments); uvicorn decodes them.
    assert (b" 411 " if kind == "wsgi" else b" 202 ") in status


# CORS and caches -----------------------------------------------------------------------


def test_vary_origin_on_answers_without_an_origin(client, web_off, kind):
    js = client.get("/offload/static/offload.js")
    assert js.status_code == 200 and "public" in js.headers["cache-control"]
    assert "Origin" in js.headers["vary"]
    assert "Origin" in client.get(f"/offload/tasks/{start(client, 'add', 1)}").headers["vary"]
    with serve(kind, TaskAPI(web_off, prefix="/offload")) as url:  # no CORS: nothing varies
        assert "vary" not in httpx.get(f"{url}/offload/static/offload.js").headers


@pytest.mark.parametrize("origin", ["http://App.example", "HTTP://app.example", "http://app.example/",
                                    "http://app.example/path", "https://app.example:443", "http://app.example:80",
                                    "app.example", "http://user@app.example", "http://app.example:99999",
                                    "http://app.example?x=1"])
def test_cors_refuses_origins_that_can_never_match(origin):
    with pytest.raises(ConfigurationError, match="never match"):
        CorsConfig([origin])


def test_cors_takes_origins_as_browsers_send_them():
    config = CorsConfig(["http://127.0.0.1:8080", "https://app.example", "http://[::1]:3000"])
    assert config.is_allowed("https://app.example") and not config.is_allowed("https://App.example")


# openapi.json ---------------------------------------------------------------------------


def test_openapi_marks_required_arguments_and_a_task_without_parameters_is_valid(web_off):
    # schemathesis' validator; it checks the schema itself when built
    # (an empty prefixItems is refused there).
    from jsonschema_rs import Draft202012Validator

    api = TaskAPI(webtasks.make("embedded", expose=("add", "nothing")), prefix="/offload")
    paths = api.openapi()["paths"]
    add = paths["/offload/tasks/add"]["post"]["requestBody"]
    assert add["required"] is True
    valid = Draft202012Validator(add["content"]["application/json"]["schema"]).is_valid
    assert valid({"args": [1]}) and valid({"kwargs": {"x": 1, "y": 2}}) and valid({"args": [1, 2]})
    assert not valid({}) and not valid({"kwargs": {"y": 1}}) and not valid({"args": []})
    nothing = paths["/offload/tasks/nothing"]["post"]["requestBody"]
    assert nothing["required"] is False
    schema = nothing["content"]["application/json"]["schema"]
    assert "prefixItems" not in json.dumps(schema)
    valid = Draft202012Validator(schema).is_valid
    assert valid({}) and not valid({"args": [1]})


# JSON-RPC: one wait per request ------------------------------------------------------


def test_a_json_rpc_batch_has_one_wait_bound(web_off, kind, tmp_path):
    release = tmp_path / "release"
    with serve(kind, make_api(web_off, max_wait=2)) as url, httpx.Client(base_url=url, timeout=60) as c:
        task_id = start(c, "wait_for_file", str(release))
        batch = [{"jsonrpc": "2.0", "method": "task.result", "params": [task_id, 2], "id": n} for n in range(5)]
        began = time.monotonic()
        answers = c.post("/offload/rpc", json=batch).json()
        took = time.monotonic() - began
        release.touch()
    assert [a["error"]["code"] for a in answers] == [-32003] * 5
    assert took < 6, f"five waits of 2 s each took {took:.1f} s: the request's bound is 2 s"


def test_a_query_with_too_many_parameters_is_400(client):
    task_id = start(client, "add", 1)
    answer = client.get(f"/offload/tasks/{task_id}?" + "&".join(f"p{n}=1" for n in range(100)))
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "BadQuery"
