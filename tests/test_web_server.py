"""offload.web.server: uvicorn's HTTP protocols sending each answer in one
system call, under the task API on real uvicorn servers (httptools and h11),
and the gathering transport on its own."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import closed_port, wait_until
from offload.web import TaskAPI
from offload.web.server import OneSendPerTurn
from testapp.webservers import serve_asgi

pytestmark = pytest.mark.timeout(120)

PROTOCOLS = ["offload.web.server:HttpToolsProtocol", "offload.web.server:H11Protocol"]


class Recorder(asyncio.Transport):
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 1234)})
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def test_one_turns_writes_leave_in_one_call_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        raw = Recorder()
        transport = OneSendPerTurn(raw, loop)
        buffer = bytearray(b"body")
        transport.write(b"head ")
        transport.write(buffer)
        buffer[:] = b"XXXX"  # the caller's buffer, reused before the turn ends
        transport.write(b"")
        assert raw.sent == [] and transport.get_write_buffer_size() == 9
        await asyncio.sleep(0)  # the end of the turn
        transport.writelines([b"next ", memoryview(b"turn")])
        await asyncio.sleep(0)
        assert raw.sent == [b"head body", b"next turn"]
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)  # the rest goes through
        transport.write(b"last words")
        transport.close()  # sends what is gathered, then closes
        assert raw.sent[-1] == b"last words" and raw.closed
        transport.write(b"too late")
        await asyncio.sleep(0)
        assert raw.sent[-1] == b"last words"  # a closing transport takes no more

    asyncio.run(main())


@pytest.fixture(params=PROTOCOLS, ids=["httptools", "h11"])
def url(request, web_off):
    if "HttpTools" in request.param:
        pytest.importorskip("httptools")
    api = TaskAPI(web_off, prefix="/offload", cors_origins=["http://app.example"], max_wait=20)
    with serve_asgi(api.asgi, http=request.param) as base:
        yield base


def raw_exchange(url: str, request: bytes) -> bytes:
    """One request on a fresh connection; the bytes of the first recv after it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        return sock.recv(65536)


def test_the_task_api_over_offloads_protocols(url):
    with httpx.Client(base_url=url, timeout=60) as client:  # one keep-alive connection
        task_id = client.post("/offload/tasks/add", json={"args": [2, 3]}).json()["id"]
        assert client.get(f"/offload/tasks/{task_id}", params={"wait": 20}).json()["result"] == 5
        rpc = client.post("/offload/rpc", json=[{"jsonrpc": "2.0", "method": "add", "params": [1, 1], "id": 1},
                                                {"jsonrpc": "2.0", "method": "nope", "id": 2}])
        assert [answer.get("error", {}).get("code") for answer in rpc.json()] == [None, -32601]
        preflight = client.options("/offload/rpc", headers={"Origin": "http://app.example",
                                                           "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        too_big = client.post("/offload/tasks/add", content=b"x" * (2 << 20))
        assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "TooLarge"
    # The head and the body of an answer leave together.
    answer = raw_exchange(url, f"GET /offload/tasks/{task_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["state"] == "SUCCESS"
    assert raw_exchange(url, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_an_event_stream_is_not_held_back(url, tmp_path):
    release = tmp_path / "release"
    with httpx.Client(base_url=url, timeout=60) as client:
        task_id = client.post("/offload/tasks/wait_for_file", json={"args": [str(release)]}).json()["id"]
        states = []
        with client.stream("GET", f"/offload/tasks/{task_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    states.append(json.loads(line[6:])["state"])
                    if states[-1] == "PROGRESS":
                        release.touch()  # only once the running task's progress has arrived
        assert states[-1] == "SUCCESS" and "PROGRESS" in states


def test_uvicorn_command_line_takes_the_protocol(tmp_path):
    port = closed_port()
    log = open(tmp_path / "uvicorn.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "testapp.hello_asgi:app", "--port", str(port),
         "--http", "offload.web.server:AutoHTTPProtocol"],
        cwd=Path(__file__).parent, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent)))
    try:
        def up() -> bool:
            assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).text == "hello /ping"
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=60)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
