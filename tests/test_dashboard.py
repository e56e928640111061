"""The dashboard (offload.web.dashboard) without a browser: its record's bounds,
the one shared poller, who may look, CSRF, retry and masking, /metrics.

Real worker, real broker (the embedded one), real HTTP server on loopback.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from urllib.parse import urlencode

import pytest
from celery import states

from conftest import wait_until
from offload.events import TaskLog
from offload.monitor import Poller
from offload.web import RequestInfo, TaskAPI
from offload.web.app import drive_sync
from testapp import webtasks
from testapp.webservers import serve

pytestmark = pytest.mark.timeout(120)


def event(kind: str, uuid: str, **fields):
    return {"type": f"task-{kind}", "uuid": uuid, "timestamp": time.time(), **fields}


# The record -------------------------------------------------------------------


def test_the_record_keeps_at_most_max_tasks_and_the_failed_apart_until_dismissed_or_expired():
    now = [1000.0]
    log = TaskLog(max_tasks=5, max_failed=3, failed_retention=60, clock=lambda: now[0])
    for i in range(20):
        log.on_event(event("received", f"t{i}", name="app.job", args="(1,)", kwargs="{}"))
        log.on_event(event("started", f"t{i}"))
        if i % 5 == 0:
            log.on_event(event("failed", f"t{i}", exception=f"KeyError({i})", traceback="Traceback ..."))
        else:
            log.on_event(event("succeeded", f"t{i}", result=str(i), runtime=0.01 * i))
    assert len(log) == 5
    assert [r.id for r in log.recent(10)] == ["t19", "t18", "t17", "t16", "t15"]
    # Four failed, three kept: the newest; t0 is gone from both lists.
    assert [r.id for r in log.failed()] == ["t15", "t10", "t5"]
    assert log.get("t0") is None and log.get("t5").state == states.FAILURE
    assert log.failed(exception_type="KeyError")[0].exception_type == "KeyError"
    assert log.failed(name="other") == [] and log.failed(exception_type="ValueError") == []
    assert log.dismiss("t10") and not log.dismiss("t10")
    assert [r.id for r in log.failed()] == ["t15", "t5"]
    now[0] += 61
    assert log.failed() == []
    assert log.counts[("app.job", states.SUCCESS)] == 16 and log.counts[("app.job", states.FAILURE)] == 4


def test_events_out_of_order_never_take_a_task_back():
    log = TaskLog()
    log.on_event(event("started", "a"))
    log.on_event(event("succeeded", "a", result="1"))
    log.on_event(event("received", "a", name="app.late"))  # arrives last
    record = log.get("a")
    assert record.state == states.SUCCESS and record.name == "app.late"
    assert [s for s, _ in record.history] == [states.STARTED, states.SUCCESS, states.RECEIVED]


def test_a_late_sent_event_takes_its_place_in_the_history_by_time():
    log = TaskLog()
    sent = event("sent", "a", name="offload.dispatch", queue="celery")
    sent["timestamp"] -= 1  # sent before the worker took it; its batch arrives later
    log.on_event(event("received", "a", name="app.f"))
    log.on_event(event("started", "a"))
    log.on_event(sent)
    record = log.get("a")
    assert [s for s, _ in record.history] == [states.PENDING, states.RECEIVED, states.STARTED]
    assert record.state == states.STARTED and record.first_seen == sent["timestamp"]
    assert record.queue == "celery" and record.name == "app.f"


def test_a_malformed_event_is_ignored():
    log = TaskLog()
    for bad in ({"type": "task-received"}, {"type": "task-nonsense", "uuid": "x"}, {"type": 3, "uuid": "x"},
                {"type": "worker-heartbeat", "hostname": "w"}):
        log.on_event(bad)
    assert len(log) == 0


# The shared poller ----------------------------------------------------------------


def test_many_readers_share_one_inspect_round_per_interval(web_off):
    poller = Poller(web_off.celery, interval=1.0, timeout=0.5)
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            poller.snapshot()
            stop.wait(0.01)

    readers = [threading.Thread(target=reader) for _ in range(20)]
    began = time.monotonic()
    for thread in readers:
        thread.start()
    try:
        assert wait_until(lambda: poller.latest["workers"], timeout=20)
        stop.wait(3.0)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
        poller.stop()
    elapsed = time.monotonic() - began
    # 20 readers, about 40 reads a second each: still one round a second.
    assert 1 <= poller.rounds <= elapsed / 1.0 + 1, (poller.rounds, elapsed)
    worker = next(iter(poller.latest["workers"].values()))
    assert worker["status"] == "online" and worker["pool"] == 2


def test_many_browsers_cost_one_round_per_interval_over_http(web_off):
    api = TaskAPI(web_off, dashboard=True)
    poller = web_off.monitor.poller
    poller.interval = 1.0
    with serve("wsgi", api) as base:
        urllib.request.urlopen(base + "/offload/dashboard/fragments", timeout=10).read()
        before = poller.rounds
        began = time.monotonic()

        def browser():
            while time.monotonic() - began < 3:
                urllib.request.urlopen(base + "/offload/dashboard/fragments", timeout=10).read()

        clients = [threading.Thread(target=browser) for _ in range(8)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        elapsed = time.monotonic() - began
    assert poller.rounds - before <= elapsed / 1.0 + 1


def test_queue_lengths_on_every_broker(off):
    from kombu import Queue

    from offload.monitor import queue_lengths

    name = f"{off.celery.conf.task_default_queue}-lengths"
    with off.celery.connection_for_write() as connection:
        queue = connection.SimpleQueue(Queue(name, routing_key=name))
        try:
            for i in range(3):
                queue.put({"n": i})
            lengths = queue_lengths(off.celery, [name, f"{name}-missing"])
            assert lengths[name] == 3
            # RabbitMQ knows a queue is missing; Redis keeps no empty queue.
            assert lengths[f"{name}-missing"] == (None if off.broker_url.startswith("amqp") else 0)
        finally:
            queue.clear()
            try:
                queue.queue.delete()
            except Exception:
                pass
            queue.close()


def test_values_are_escaped_in_the_page(web_off):
    api = TaskAPI(web_off, dashboard=True)
    with serve("wsgi", api) as base:
        urllib.request.urlopen(base + "/offload/dashboard", timeout=20).read()
        assert wait_until(lambda: web_off.monitor.listener.connected, timeout=20)
        echoed = web_off.submit(webtasks.echo_text, "<script>alert(1)</script>")
        assert echoed.result(timeout=30)
        log = web_off.monitor.log
        assert wait_until(lambda: log.get(echoed.id) and log.get(echoed.id).final, timeout=20)
        for path in ("/offload/dashboard", f"/offload/dashboard/tasks/{echoed.id}"):
            page = urllib.request.urlopen(base + path, timeout=20).read().decode()
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page


# Who may look ---------------------------------------------------------------------


def answer(api: TaskAPI, path: str, client: str | None = "127.0.0.1", method: str = "GET",
           headers: dict | None = None, body: bytes = b""):
    request = RequestInfo(method, path, {}, headers or {}, client)
    return drive_sync(api, api.handle(request, body))


def test_without_authorize_only_loopback_clients_see_the_dashboard(web_off):
    future = web_off.submit(webtasks.fail, "secret-in-error")
    with pytest.raises(ValueError):
        future.result(timeout=30)
    api = TaskAPI(web_off, dashboard=True)
    paths = ["/offload/dashboard", "/offload/dashboard/fragments", "/offload/dashboard/live",
             f"/offload/dashboard/tasks/{future.id}", f"/offload/dashboard/tasks/{future.id}/fragment",
             "/offload/metrics"]
    for path in paths:
        for client, headers in (("10.1.2.3", {}), ("192.168.0.9", {}), (None, {}),
                                ("127.0.0.1", {"x-forwarded-for": "203.0.113.7"}),
                                ("::1", {"forwarded": "for=203.0.113.7"})):
            refused = answer(api, path, client, headers=headers)
            assert refused.status == 403, (path, client)
            assert b"secret-in-error" not in refused.body and b"Traceback" not in refused.body
    assert answer(api, f"/offload/dashboard/tasks/{future.id}", "127.0.0.1").status == 200
    assert answer(api, "/offload/metrics", "::1").status == 200


def test_an_authorize_hook_decides_every_dashboard_route(web_off):
    asked = []

    def authorize(request, action):
        asked.append(action)
        return request.headers.get("authorization") == "Bearer ok"

    api = TaskAPI(web_off, dashboard=True, authorize=authorize)
    task = "0f0f0f0f-aaaa-bbbb-cccc-000000000000"
    for method, path in (("GET", "/offload/dashboard"), ("GET", f"/offload/dashboard/tasks/{task}"),
                         ("POST", f"/offload/dashboard/tasks/{task}/revoke"),
                         ("POST", f"/offload/dashboard/tasks/{task}/retry"),
                         ("POST", f"/offload/dashboard/tasks/{task}/dismiss"), ("GET", "/offload/metrics")):
        assert answer(api, path, "127.0.0.1", method).status == 403, path  # loopback is not enough
    assert {"dashboard", "dashboard.revoke", "dashboard.retry", "dashboard.dismiss", "metrics"} <= set(asked)
    # From anywhere, with the hook's blessing.
    assert answer(api, "/offload/dashboard", "198.51.100.4", headers={"authorization": "Bearer ok"}).status == 200


# Actions: CSRF, revoke, retry, masking ------------------------------------------------------------


class Browser:
    """urllib with cookies and no redirects followed (to see the 303s)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def get(self, path: str) -> str:
        return self.opener.open(self.base + path, timeout=20).read().decode()

    def post(self, path: str, form: dict) -> tuple[int, str | None, str]:
        request = urllib.request.Request(self.base + path, data=urlencode(form).encode(), method="POST")
        try:
            with self.opener.open(request, timeout=20) as response:
                return response.status, response.headers.get("Location"), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Location"), exc.read().decode()


def token_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_a_post_without_the_pages_csrf_token_is_refused(web_off):
    scheduled = web_off.options(countdown=600).submit(webtasks.add, 1, 2)
    api = TaskAPI(web_off, dashboard=True)
    with serve("wsgi", api) as base:
        browser = Browser(base)
        page = browser.get(f"/offload/dashboard/tasks/{scheduled.id}")
        token = token_of(page)
        revoke = f"/offload/dashboard/tasks/{scheduled.id}/revoke"
        # A cross-site form: no cookie of ours, a guessed token.
        stranger = Browser(base)
        assert stranger.post(revoke, {"csrf": token})[0] == 403
        assert browser.post(revoke, {})[0] == 403
        assert browser.post(revoke, {"csrf": token[:-1] + "x"})[0] == 403
        # The right token, but sent by another site's page.
        forged = urllib.request.Request(base + revoke, data=urlencode({"csrf": token}).encode(), method="POST",
                                        headers={"Origin": "https://evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            browser.opener.open(forged, timeout=20)
        assert refused.value.code == 403
        assert not scheduled.cancelled()
        status, location, _ = browser.post(revoke, {"csrf": token})
        assert status == 303 and location.endswith(f"/dashboard/tasks/{scheduled.id}")
    assert wait_until(lambda: any(scheduled.id in ids for ids in web_off.revoked().values()), timeout=20)
    assert web_off.celery.AsyncResult(scheduled.id).state == states.REVOKED


def test_retry_sends_the_same_arguments_again_and_links_both_ways(web_off):
    api = TaskAPI(web_off, dashboard=True)
    with serve("wsgi", api) as base:
        browser = Browser(base)
        browser.get("/offload/dashboard")  # starts the event receiver
        assert wait_until(lambda: web_off.monitor.listener.connected, timeout=20)
        failed = web_off.submit(webtasks.fail, "try again")
        with pytest.raises(ValueError):
            failed.result(timeout=30)
        log = web_off.monitor.log
        assert wait_until(lambda: log.get(failed.id) and log.get(failed.id).state == states.FAILURE, timeout=20)
        page = browser.get(f"/offload/dashboard/tasks/{failed.id}")
        assert 'data-action="retry"' in page and "try again" in page
        status, location, _ = browser.post(f"/offload/dashboard/tasks/{failed.id}/retry", {"csrf": token_of(page)})
        assert status == 303
        new_id = location.rsplit("/", 1)[1]
        assert new_id != failed.id
        with pytest.raises(ValueError, match="try again"):
            web_off.get(new_id).result(timeout=30)
        again = browser.get(f"/offload/dashboard/tasks/{new_id}")
        assert "Retry of" in again and failed.id in again
        assert "Retried as" in browser.get(f"/offload/dashboard/tasks/{failed.id}")
        # Retrying a task that did not fail is refused.
        ok = web_off.submit(webtasks.add, 2, 2)
        assert ok.result(timeout=30) == 4
        assert wait_until(lambda: log.get(ok.id) and log.get(ok.id).final, timeout=20)
        assert browser.post(f"/offload/dashboard/tasks/{ok.id}/retry", {"csrf": token_of(page)})[0] == 409
        # Dismissed, a failed task leaves the failed list.
        assert failed.id in browser.get("/offload/dashboard?exc=ValueError")
        assert browser.post(f"/offload/dashboard/tasks/{failed.id}/dismiss", {"csrf": token_of(page)})[0] == 303
        assert failed.id not in [r.id for r in log.failed()]


def test_terminate_stops_a_running_task(web_off, gate):
    api = TaskAPI(web_off, dashboard=True)
    with serve("wsgi", api) as base:
        browser = Browser(base)
        browser.get("/offload/dashboard")
        assert wait_until(lambda: web_off.monitor.listener.connected, timeout=20)
        running = web_off.submit(webtasks.wait_for_file, gate, 120)
        assert wait_until(running.running, timeout=30)
        page = browser.get(f"/offload/dashboard/tasks/{running.id}")
        assert 'data-action="revoke"' in page and 'data-action="terminate"' in page
        # Revoke alone leaves a running task running (as Future.cancel does) ...
        assert browser.post(f"/offload/dashboard/tasks/{running.id}/revoke", {"csrf": token_of(page)})[0] == 303
        assert not running.done()
        # ... terminate stops it.
        status, _, _ = browser.post(f"/offload/dashboard/tasks/{running.id}/revoke",
                                    {"csrf": token_of(page), "terminate": "1"})
        assert status == 303
        log = web_off.monitor.log
        assert wait_until(lambda: log.get(running.id) and log.get(running.id).state == states.REVOKED, timeout=30)
        assert 'data-action="revoke"' not in browser.get(f"/offload/dashboard/tasks/{running.id}")


def test_one_record_and_one_receiver_per_process_however_many_mounts(web_off):
    first = TaskAPI(web_off, dashboard=True)
    second = TaskAPI(web_off, prefix="/other", dashboard=True)
    assert first.dashboard.monitor is second.dashboard.monitor is web_off.monitor
    listener = web_off.monitor.listener
    before = {t for t in threading.enumerate() if t.name == "offload-events"}
    web_off.monitor.ensure_started()
    thread = listener._thread  # the receiver's one thread (a test's look inside)
    web_off.monitor.ensure_started()
    first.dashboard.monitor.ensure_started()
    assert listener._thread is thread and thread.is_alive()
    after = {t for t in threading.enumerate() if t.name == "offload-events"}
    assert after - before <= {thread}


def test_failed_tasks_filter_by_task_name_and_exception_type():
    log = TaskLog()
    for i, (name, exc) in enumerate([("app.a", "KeyError('x')"), ("app.b", "KeyError('y')"),
                                     ("app.a", "ValueError('z')")]):
        log.on_event(event("received", f"f{i}", name=name))
        log.on_event(event("failed", f"f{i}", exception=exc, traceback="Traceback ..."))
    assert [r.id for r in log.failed(name="app.a")] == ["f2", "f0"]
    assert [r.id for r in log.failed(exception_type="KeyError")] == ["f1", "f0"]
    assert [r.id for r in log.failed(name="app.a", exception_type="KeyError")] == ["f0"]
    assert log.failed_facets() == (["app.a", "app.b"], ["KeyError", "ValueError"])


def test_a_task_with_mask_args_never_shows_its_arguments(web_off):
    api = TaskAPI(web_off, dashboard=True)
    with serve("wsgi", api) as base:
        browser = Browser(base)
        browser.get("/offload/dashboard")
        assert wait_until(lambda: web_off.monitor.listener.connected, timeout=20)
        signed = web_off.celery.tasks[f"{webtasks.__name__}.sign"].submit("hunter2-secret", "hello")
        assert signed.result(timeout=30) == "signed 5 characters"
        log = web_off.monitor.log
        assert wait_until(lambda: log.get(signed.id) and log.get(signed.id).final, timeout=20)
        assert "hunter2" in (log.get(signed.id).args or "")  # the event has them ...
        page = browser.get(f"/offload/dashboard/tasks/{signed.id}")
        assert "data-masked" in page and "hunter2" not in page  # ... the page does not
        assert "hunter2" not in browser.get("/offload/dashboard/fragments")


# Bad input and bad luck -------------------------------------------------------------


def test_malformed_requests_get_clear_4xx(web_off):
    api = TaskAPI(web_off, dashboard=True)
    for method, path, status in (("GET", "/offload/dashboard/tasks/bad%20id!", 400),
                                 ("GET", "/offload/dashboard/nothing", 404),
                                 ("DELETE", "/offload/dashboard", 405),
                                 ("GET", "/offload/dashboard/tasks/abc/revoke", 405),
                                 ("POST", "/offload/metrics", 405),
                                 ("GET", "/offload/dashboard/live?task=x", 200)):
        path, _, query = path.partition("?")
        request = RequestInfo(method, path, dict([query.split("=")]) if query else {}, {}, "127.0.0.1")
        got = drive_sync(api, api.handle(request, b""))
        assert getattr(got, "status", 200) == status, (method, path)
    bad_live = RequestInfo("GET", "/offload/dashboard/live", {"task": "no good!"}, {}, "127.0.0.1")
    assert drive_sync(api, api.handle(bad_live, b"")).status == 400


def test_an_unreachable_broker_shows_on_the_page_without_hanging(tmp_path):
    from conftest import dead_broker_url
    from offload import Offload

    off = Offload({"CELERY_BROKER_URL": dead_broker_url("redis"), "OFFLOAD_DATA_DIR": str(tmp_path)})
    api = TaskAPI(off, dashboard=True)
    try:
        with serve("wsgi", api) as base:
            began = time.monotonic()
            with urllib.request.urlopen(base + "/offload/dashboard", timeout=30) as response:
                page = response.read().decode()
            assert response.status == 200 and time.monotonic() - began < 15
            assert "Not receiving task events" in page or "unreachable" in page
            assert wait_until(lambda: "Workers unreachable" in urllib.request.urlopen(
                base + "/offload/dashboard/fragments", timeout=30).read().decode(), timeout=60)
            with urllib.request.urlopen(base + "/offload/metrics", timeout=30) as response:
                assert response.status == 200
    finally:
        off.monitor.stop()


def test_the_event_receiver_reconnects_when_the_broker_comes_back(tmp_path):
    """A Redis of this test's own vanishes under the dashboard and returns; events flow again."""
    import shutil
    import subprocess

    from conftest import closed_port
    from offload import Offload

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    port = closed_port()

    def start():
        proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: _listening(port), timeout=10)
        return proc

    redis = start()
    off = Offload({"CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0", "OFFLOAD_DATA_DIR": str(tmp_path)})
    monitor = off.monitor
    monitor.listener.retry = 0.2
    try:
        monitor.ensure_started()
        assert wait_until(lambda: monitor.listener.connected, timeout=20)
        # No worker needed: the sender reports each task it sends (task_send_sent_event).
        first = off.submit(webtasks.add, 1, 1)
        assert wait_until(lambda: monitor.log.get(first.id) is not None, timeout=20)
        redis.kill()
        redis.wait(10)
        assert wait_until(lambda: not monitor.listener.connected, timeout=30)
        redis = start()
        assert wait_until(lambda: monitor.listener.connected, timeout=30)
        second = off.submit(webtasks.add, 2, 2)
        assert wait_until(lambda: monitor.log.get(second.id) is not None, timeout=20)
        assert monitor.log.get(second.id).name == f"{webtasks.__name__}.add"
    finally:
        monitor.stop()
        redis.kill()
        redis.wait(10)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# Metrics --------------------------------------------------------------------------


def test_metrics_are_prometheus_text(web_off):
    from prometheus_client.parser import text_string_to_metric_families

    api = TaskAPI(web_off, dashboard=True)
    with serve("asgi", api) as base:
        urllib.request.urlopen(base + "/offload/dashboard", timeout=20).read()
        assert wait_until(lambda: web_off.monitor.listener.connected, timeout=20)
        done = web_off.submit(webtasks.add, 20, 22)
        assert done.result(timeout=30) == 42
        log = web_off.monitor.log
        assert wait_until(lambda: log.get(done.id) and log.get(done.id).final, timeout=20)
        assert wait_until(lambda: web_off.monitor.poller.latest["workers"], timeout=20)
        with urllib.request.urlopen(base + "/offload/metrics", timeout=20) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    name = f"{webtasks.__name__}.add"
    tasks = [s for s in families["offload_tasks"].samples if s.name == "offload_tasks_total"]
    assert any(s.labels == {"name": name, "state": "SUCCESS"} and s.value >= 1 for s in tasks)
    runtime = families["offload_task_runtime_seconds"].samples
    assert any(s.name == "offload_task_runtime_seconds_count" and s.labels["name"] == name for s in runtime)
    assert any(s.labels.get("le") == "+Inf" for s in runtime)
    queue = web_off.celery.conf.task_default_queue
    assert any(s.labels == {"queue": queue} for s in families["offload_queue_length"].samples)
    assert any(s.value == 1 for s in families["offload_worker_up"].samples)


# offload dashboard --------------------------------------------------------------------


def test_the_dashboard_command_serves_it_standalone(web_off, tmp_path):
    import os
    import sys

    from conftest import Spawned, closed_port, worker_env

    port = closed_port()
    command = [os.path.join(os.path.dirname(sys.executable), "offload"), "--app", "testapp.on_web_embedded:off",
               "dashboard", "--port", str(port)]
    server = Spawned(command, tmp_path / "dashboard.log", env=worker_env())
    base = f"http://127.0.0.1:{port}"

    def started() -> bool:
        assert server.proc.poll() is None, server.text()
        return "offload dashboard on" in server.text()

    try:
        assert wait_until(started, timeout=60), server.text()
        # Sent before anyone looked: the command receives events from its start.
        early = web_off.submit(webtasks.add, 3, 4)
        assert early.result(timeout=30) == 7

        def shown() -> bool:
            page = urllib.request.urlopen(base + "/", timeout=20).read().decode()  # redirected
            return f'data-task-id="{early.id}" data-state="SUCCESS"' in page

        assert wait_until(shown, timeout=30, interval=0.5)
        page = urllib.request.urlopen(base + "/", timeout=20).read().decode()
        assert "data-worker=" in page and 'data-status="online"' in page
        assert urllib.request.urlopen(base + "/offload/metrics", timeout=20).status == 200
        assert f"{base}/offload/dashboard" in server.text()
    finally:
        server.stop()
