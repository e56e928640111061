"""The dashboard in a real browser (Debian's chromium, Playwright), against a
real worker on Redis (ASGI) and on the embedded broker (WSGI).

Another process submits 20 tasks (2 fail, one is scheduled minutes out);
without a reload the page shows them arrive, progress and finish; a failed
one's page shows its traceback; revoking the scheduled one from its page
revokes it on the worker; an authorize hook that refuses gets 403 on every
route. Screenshots at desktop and phone width are saved in the test's tmp dir,
or in $OFFLOAD_SCREENSHOTS when set (pytest prunes old tmp dirs).
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
from celery import states

from conftest import Spawned, require_service, wait_until, worker_env
from offload.web import TaskAPI
from test_browser import CHROMIUM, CHROMIUM_ARGS, browser  # noqa: F401 (the fixture)
from testapp.webservers import serve

pytestmark = pytest.mark.timeout(240)

SUBMITTER = textwrap.dedent("""
    import sys
    from testapp import webtasks
    from testapp.webtasks import make
    off = make(sys.argv[1])
    ids = []
    for i in range(17):
        ids.append(off.submit(webtasks.steps, 6, 0.25).id)
    for i in range(2):
        ids.append(off.submit(webtasks.fail, f"broken {i}").id)
    ids.append(off.options(countdown=600).submit(webtasks.add, 1, 2).id)
    print(" ".join(ids), flush=True)
""")

# Records every state each task row shows, to see them move without a reload.
WATCH = """() => {
  window.loadedOnce = (window.loadedOnce || 0) + 1;
  window.seen = {};
  const note = () => document.querySelectorAll('#recent [data-task-id]').forEach(row => {
    (window.seen[row.dataset.taskId] = window.seen[row.dataset.taskId] || new Set()).add(row.dataset.state);
  });
  note();
  new MutationObserver(note).observe(document.getElementById('recent'), {subtree: true, childList: true});
}"""


@pytest.mark.parametrize("kind,protocol", [("embedded", "wsgi"), ("redis", "asgi")])
def test_the_dashboard_follows_tasks_of_another_process_live(kind, protocol, browser, _workers, tmp_path):  # noqa: F811
    if kind == "redis":
        require_service("redis")
    off = _workers(f"web_{kind}")[0]
    if os.environ.get("OFFLOAD_SCREENSHOTS"):
        tmp_path = Path(os.environ["OFFLOAD_SCREENSHOTS"])
        tmp_path.mkdir(parents=True, exist_ok=True)
    off.monitor.poller.interval = 1.0
    api = TaskAPI(off, prefix="/offload", dashboard=True)
    with serve(protocol, api) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/offload/dashboard")
        assert page.get_attribute("[data-worker]", "data-status") == "online"
        assert page.locator("[data-queue]").count() >= 1
        page.evaluate(WATCH)
        page.wait_for_function("() => document.getElementById('live').dataset.live === 'sse'", timeout=30_000)
        assert wait_until(lambda: off.monitor.listener.connected, timeout=30)

        log = tmp_path / f"submitter-{kind}.log"
        submitter = Spawned([sys.executable, "-c", SUBMITTER, kind], log, env=worker_env())
        assert submitter.proc.wait(60) == 0, submitter.text()
        ids = submitter.text().split()[-20:]
        failed, scheduled = ids[17:19], ids[19]

        page.wait_for_function(
            "(ids) => ids.every(id => document.querySelector(`#recent [data-task-id='${id}']`))",
            arg=ids, timeout=60_000)
        page.wait_for_function(
            "(ids) => ids.every(id => ['SUCCESS','FAILURE'].includes("
            "document.querySelector(`#recent [data-task-id='${id}']`).dataset.state))",
            arg=ids[:19], timeout=90_000)
        assert page.evaluate("window.loadedOnce") == 1  # no reload happened
        seen = page.evaluate("Object.fromEntries(Object.entries(window.seen).map(([k, v]) => [k, [...v]]))")
        assert any({"STARTED", "PROGRESS"} & set(seen.get(i, ())) for i in ids[:17]), seen
        assert all(page.get_attribute(f"#recent [data-task-id='{i}']", "data-state") == states.FAILURE for i in failed)
        page.wait_for_function(
            "(id) => document.querySelector(`#onworkers [data-id='${id}']`)", arg=scheduled, timeout=30_000)
        page.screenshot(path=str(tmp_path / f"dashboard-{kind}-desktop.png"), full_page=True)

        phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
        phone.goto(f"{base}/offload/dashboard")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        phone.screenshot(path=str(tmp_path / f"dashboard-{kind}-phone.png"), full_page=True)
        phone.close()

        # A failed task's page shows its traceback.
        page.click(f"#failed [data-task-id='{failed[0]}'] a")
        page.wait_for_selector("[data-traceback]")
        assert "ValueError: broken" in page.inner_text("[data-traceback]")
        page.screenshot(path=str(tmp_path / f"task-{kind}-failed.png"), full_page=True)

        # Revoke the scheduled one from its page.
        page.goto(f"{base}/offload/dashboard/tasks/{scheduled}")
        page.click("[data-action=revoke]")
        page.wait_for_url(f"**/dashboard/tasks/{scheduled}")
        assert wait_until(lambda: any(scheduled in r for r in off.revoked().values()), timeout=30)
        assert off.celery.AsyncResult(scheduled).state == states.REVOKED
        page.close()
    print(f"screenshots in {tmp_path}")


def test_an_authorize_that_refuses_gets_403_everywhere(browser, _workers):  # noqa: F811
    off = _workers("web_embedded")[0]
    done = off.submit(__import__("testapp.webtasks", fromlist=["fail"]).fail, "secret detail")
    with pytest.raises(ValueError):
        done.result(timeout=30)
    api = TaskAPI(off, prefix="/offload", dashboard=True, authorize=lambda request, action: False)
    with serve("wsgi", api) as base:
        page = browser.new_page()
        for path in ("/dashboard", "/dashboard/fragments", "/dashboard/live", f"/dashboard/tasks/{done.id}",
                     f"/dashboard/tasks/{done.id}/fragment", "/metrics"):
            response = page.goto(f"{base}/offload{path}")
            assert response.status == 403, path
            assert "secret detail" not in page.content()
        for action in ("revoke", "retry", "dismiss"):
            response = page.request.post(f"{base}/offload/dashboard/tasks/{done.id}/{action}", form={"csrf": "x"})
            assert response.status == 403
        page.close()


def test_without_event_streams_the_page_polls(browser, _workers, tmp_path):  # noqa: F811
    from testapp import webtasks

    off = _workers("web_embedded")[0]
    api = TaskAPI(off, prefix="/offload", dashboard=True)
    with serve("wsgi", api) as base:
        context = browser.new_context(color_scheme="dark", viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.add_init_script("delete window.EventSource")
        page.goto(f"{base}/offload/dashboard")
        page.wait_for_function("() => document.getElementById('live').dataset.live === 'poll'", timeout=30_000)
        assert wait_until(lambda: off.monitor.listener.connected, timeout=30)
        future = off.submit(webtasks.add, 40, 2)
        assert future.result(timeout=30) == 42
        page.wait_for_function(
            "(id) => { const row = document.querySelector(`#recent [data-task-id='${id}']`);"
            " return row && row.dataset.state === 'SUCCESS'; }", arg=future.id, timeout=30_000)
        page.screenshot(path=str(tmp_path / "dashboard-dark-polling.png"))
        context.close()
