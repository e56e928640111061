"""The two examples of offload.web, run as a user runs them: seed 003
(examples/pyjamas_jsonrpc, in a real browser) and seed 004 (examples/async_wait
under uvicorn), each with its own local worker on the embedded broker."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import Spawned, closed_port, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.timeout(240)


def running(args: list[str], cwd: Path, data_dir: Path) -> Spawned:
    """An example's server process, its output in ``data_dir``, stopped with SIGTERM."""
    env = dict(os.environ, OFFLOAD_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    env.pop("OFFLOAD_APP", None)
    return Spawned(args, data_dir / "server.log", env, cwd=cwd)


def answers(server: Spawned, port: int, path: str) -> bool:
    """Whether the server answers yet; an exited server fails the test at once."""
    if server.proc.poll() is not None:
        raise AssertionError(f"the server exited with {server.proc.returncode}:\n{server.text()}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
        httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
        return True
    except (OSError, httpx.HTTPError):
        return False


@contextmanager
def async_wait_app(data_dir: Path) -> Iterator[httpx.Client]:
    """examples/async_wait under uvicorn, answering: a client of it, the server stopped after."""
    port = closed_port()
    server = running([sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)],
                     EXAMPLES / "async_wait", data_dir)
    try:
        assert wait_until(lambda: answers(server, port, "/offload/openapi.json"), timeout=90), server.text()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.stop(timeout=30)
    assert server.proc.returncode is not None


def test_async_wait_example(tmp_path):
    with async_wait_app(tmp_path) as c:
        ok = c.get("/divide", params={"x": 1, "y": 4})
        assert ok.status_code == 200 and ok.json() == {"result": 0.25}
        assert int(ok.headers["x-elapsed-ms"]) >= 0  # the middleware kept working
        failed = c.get("/divide", params={"x": 1, "y": 0})
        assert failed.status_code == 500
        assert "ZeroDivisionError: float division by zero" in failed.text
        assert "Traceback" not in failed.text and "x-elapsed-ms" in failed.headers
        late = c.get("/slow", params={"seconds": 3, "timeout": 0.3})
        assert late.status_code == 504 and "x-elapsed-ms" in late.headers
        assert c.get("/divide", params={"x": "a", "y": 1}).status_code == 400
        assert "/offload/tasks/divide" in c.get("/offload/openapi.json").json()["paths"]


def test_pyjamas_jsonrpc_example_in_a_browser(tmp_path):
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        if os.environ.get("CI"):
            pytest.fail(f"{chromium} is missing (.ci/run installs it)")
        pytest.skip(f"{chromium} is not installed")
    from playwright.sync_api import sync_playwright

    from test_browser import CHROMIUM_ARGS

    page_port, api_port = closed_port(), closed_port()
    server = running([sys.executable, "serve.py", "--page-port", str(page_port), "--api-port", str(api_port)],
                     EXAMPLES / "pyjamas_jsonrpc", tmp_path)
    try:
        assert wait_until(lambda: "page on" in server.text(), timeout=90), server.text()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{page_port}/")
            page.fill("#text", "hello, other origin")
            page.fill("#delay", "2")
            page.click("#send")
            page.wait_for_function("() => document.getElementById('result').textContent !== ''", timeout=90_000)
            page.screenshot(path=str(tmp_path / "pyjamas_jsonrpc.png"))
            assert page.inner_text("#result") == "echo: hello, other origin"
            assert int(page.inner_text("#polls")) >= 2  # polled on a timer while it ran
            browser.close()
        assert "OPTIONS /offload/rpc" in server.text()  # the preflight, as in the seed
    finally:
        server.stop(timeout=30)
