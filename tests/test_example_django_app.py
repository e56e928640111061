"""examples/django_app run the way its README says (migrate, ``manage.py offload
worker``, ``manage.py runserver``), driven by a real browser: the form's POST
enqueues the task, the next page follows it live with offload.js."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import Spawned, closed_port, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_app"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]

pytestmark = pytest.mark.timeout(240)


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture
def site(tmp_path):
    """The example copied to a folder of its own (its db and instance/ go there), served."""
    root = tmp_path / "django_app"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("__pycache__", "db.sqlite3", "instance"))
    env = {k: v for k, v in os.environ.items() if k not in ("OFFLOAD_APP", "FLASK_APP", "DJANGO_SETTINGS_MODULE")}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=root, env=env, check=True, timeout=120)
    worker = Spawned([sys.executable, "manage.py", "offload", "worker", "-c", "2"], root / "worker.log",
                     env=env, cwd=root)
    port = closed_port()
    server = Spawned([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
                     root / "server.log", env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _up(base + "/"), timeout=60), server.text()
        yield base, root, worker
    finally:
        server.stop()
        worker.stop()


def test_the_page_follows_the_enqueued_task_live(site):
    base, root, worker = site
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.fill("input[name=size]", "30")
            page.click("button[type=submit]")  # a form POST with Django's CSRF token
            page.wait_for_url(f"{base}/reports/*")
            page.wait_for_selector("#state[data-state=SUCCESS]", timeout=90_000)
            # 1^2 + ... + 30^2
            assert page.text_content("#result") == "total: 9455"
            seen = page.evaluate("window.seenStates")
            assert seen[-1] == "SUCCESS", seen
            task_id = page.get_attribute("#state", "data-task-id")
        finally:
            browser.close()
    # The task ran on the worker, and wrote the report there (the ORM in a task).
    assert "offload.django.run" in worker.text()
    done = subprocess.run([sys.executable, "manage.py", "shell", "-c",
                           f"from reports.models import Report; print(Report.objects.get(result_id={task_id!r}).total)"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "9455", done.stderr
