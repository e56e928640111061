"""Seed 003 in a real browser: a page on one origin uses offload.js against the
API on another origin (JSON-RPC through its CORS preflight, progress over
server-sent events, then the result); a page from an origin the API does not
allow cannot read its answers. Over WSGI and over ASGI.

Debian's chromium, driven by Playwright for Python (Playwright's own browser
download cannot work on a machine without general internet access).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from offload.web import TaskAPI
from testapp.webservers import serve, serve_wsgi

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
# Every page.wait_for_function here is given a function ("() => ..."), never an
# expression: Playwright re-evaluates an expression with eval() on each poll,
# which a page's Content Security Policy (the dashboard's: default-src 'self')
# refuses; a function is compiled once, when the wait starts.

pytestmark = pytest.mark.timeout(180)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>offload.js across origins</title></head>
<body>
<h1>A slow job, started over JSON-RPC from another origin</h1>
<div id="bar"></div>
<p>status: <span id="status">starting</span></p>
<p id="result"></p>
<script src="{api}/offload/static/offload.js"></script>
<script>
(async function () {{
  const api = new Offload("{api}/offload");
  const bar = Offload.progressBar("#bar");
  const status = document.getElementById("status");
  window.seenStates = [];
  try {{
    const id = await api.rpc("steps", [6, 0.3]);
    status.textContent = "started";
    const last = await api.follow(id, function (s) {{
      window.seenStates.push(s.state);
      bar.update(s);
      status.textContent = s.state;
    }});
    document.getElementById("result").textContent = "result: " + last.result;
  }} catch (err) {{
    document.getElementById("result").textContent = "error: " + err.type;
  }}
}})();
</script>
</body></html>
"""


def page_app(api_url: str):
    body = PAGE.format(api=api_url).encode()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return app


class Recorder:
    """Records the method and path of each request the API gets (to see the preflight)."""

    def __init__(self, api: TaskAPI) -> None:
        self.api, self.seen = api, []

    def wsgi(self, environ, start_response):
        self.seen.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        return self.api.wsgi(environ, start_response)

    async def asgi(self, scope, receive, send):
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.api.asgi(scope, receive, send)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (.ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_a_page_on_another_origin_follows_a_job_over_json_rpc(kind, browser, _workers, tmp_path):
    off = _workers("web_embedded")[0]
    shots = Path(tmp_path)
    # The page server must know the API's URL, and the API the page's origin:
    # pick the page's port first.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    page_port = sock.getsockname()[1]
    sock.close()
    allowed = f"http://127.0.0.1:{page_port}"
    api = TaskAPI(off, prefix="/offload", cors_origins=[allowed], max_wait=20)
    recorded = Recorder(api)
    with serve(kind, recorded) as api_url, serve_wsgi(page_app(api_url), page_port) as page_url, \
            serve_wsgi(page_app(api_url)) as other_url:
        assert page_url == allowed
        page = browser.new_page()
        page.goto(f"{page_url}/")
        page.wait_for_function("() => window.seenStates && window.seenStates.includes('PROGRESS')", timeout=60_000)
        page.screenshot(path=str(shots / f"{kind}-progress.png"))
        page.wait_for_function("() => document.getElementById('result').textContent !== ''", timeout=60_000)
        page.screenshot(path=str(shots / f"{kind}-done.png"))
        assert page.inner_text("#result") == "result: 6"
        assert page.get_attribute(".offload-progress", "data-state") == "SUCCESS"
        states = page.evaluate("window.seenStates")
        assert "PROGRESS" in states and states[-1] == "SUCCESS"
        assert ("OPTIONS", "/offload/rpc") in recorded.seen  # the preflight happened
        page.close()

        # The same page from an origin the API does not allow.
        stranger = browser.new_page()
        before = len([r for r in recorded.seen if r[0] == "POST"])
        stranger.goto(f"{other_url}/")
        stranger.wait_for_function("() => document.getElementById('result').textContent !== ''", timeout=60_000)
        stranger.screenshot(path=str(shots / f"{kind}-refused.png"))
        assert stranger.inner_text("#result") == "error: NetworkError"
        # The preflight failed, so the browser never sent the call itself.
        assert len([r for r in recorded.seen if r[0] == "POST"]) == before
        stranger.close()
    assert (shots / f"{kind}-done.png").stat().st_size > 0


def test_the_demo_ledger_page_shows_a_total_live(browser, tmp_path):
    """``offload demo``: the index page starts a total, shows its progress, then the result."""
    import subprocess
    import sys
    import urllib.request

    from conftest import wait_until

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    base = f"http://127.0.0.1:{number}"
    env = dict(os.environ, OFFLOAD_DEMO_DATA_DIR=str(tmp_path / "data"))
    log = open(tmp_path / "demo.log", "wb")
    demo = subprocess.Popen([sys.executable, "-m", "offload.demo", "--port", str(number)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT)

    def answers() -> bool:
        try:
            urllib.request.urlopen(base + "/", timeout=2).read()
            return True
        except OSError:
            return False

    try:
        assert wait_until(answers, timeout=90), (tmp_path / "demo.log").read_text()
        for value in (10, 32):
            urllib.request.urlopen(f"{base}/append?value={value}", timeout=10).read()
        page = browser.new_page()
        page.goto(base + "/")
        page.fill("#delay", "2")
        page.click("#start")
        page.wait_for_function(
            "() => { const p = document.querySelector('.offload-progress');"
            " return p && p.dataset.state === 'PROGRESS'; }", timeout=60_000)
        page.screenshot(path=str(tmp_path / "demo-progress.png"))
        page.wait_for_function("() => document.getElementById('total').textContent !== ''", timeout=60_000)
        page.screenshot(path=str(tmp_path / "demo-done.png"))
        assert page.inner_text("#total") == "total: 42"
        page.close()
    finally:
        demo.terminate()
        demo.wait(30)
        log.close()
