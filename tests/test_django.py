"""offload.django: a ``django-admin startproject`` project on offload's TaskBackend.

The project is made by ``startproject`` and ``startapp``, with the app's
code in tests/django_project (written from Django's Tasks documentation)
and, in settings.py, ``TASKS`` naming ``offload.django.TaskBackend`` and
``"offload.django"`` in ``INSTALLED_APPS``; no broker is configured, so the
embedded one under ``BASE_DIR/instance`` carries the tasks. A real
``manage.py offload worker`` runs them; each step below runs in a process
of its own (``manage.py shell -c``) with Django's test client, so results
are read from processes other than the one that enqueued them. The database
is a SQLite file, then the local PostgreSQL (a schema of this test's own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import Spawned, dead_broker_url, reachable, wait_until

from testapp import test_id

TESTS = Path(__file__).resolve().parent
PROJECT_CODE = TESTS / "django_project"
PG = "postgresql://postgres@127.0.0.1:5432/test"

#: What each step imports before its own lines.
PRELUDE = """
import json, time, datetime
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
client = Client()
def get(path):
    answer = client.get(path)
    assert answer.status_code == 200, (path, answer.status_code, answer.content)
    return answer.json()
def post(path, body=None):
    return client.post(path, json.dumps(body or {}), content_type="application/json")
def wait_result(result_id, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        data = get(f"/result/{result_id}")
        if data["status"] in ("SUCCESSFUL", "FAILED") or time.monotonic() > deadline:
            return data
        time.sleep(0.05)
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OFFLOAD_APP", "FLASK_APP", "DJANGO_SETTINGS_MODULE")}
    env.update(extra or {})
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def make_project(root: Path, env: dict[str, str], settings_tail: str | None = None) -> Path:
    """``startproject mysite`` + ``startapp shop``, the shop's code, TASKS; migrated."""
    python = sys.executable
    root.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "django", "startproject", "mysite", str(root)], root, env)
    _run([python, "manage.py", "startapp", "shop"], root, env)
    for path in (PROJECT_CODE / "shop").glob("*.py"):
        shutil.copy(path, root / "shop" / path.name)
    shutil.copy(PROJECT_CODE / "urls.py", root / "mysite" / "urls.py")
    with open(root / "mysite" / "settings.py", "a") as settings:
        settings.write(settings_tail or (PROJECT_CODE / "settings_tail.py").read_text())
    _run([python, "manage.py", "makemigrations", "shop", "-v0"], root, env)
    _run([python, "manage.py", "migrate", "-v0"], root, env)
    return root


class Project:
    """A made project, its environment, and its worker."""

    def __init__(self, root: Path, env: dict[str, str], kind: str) -> None:
        self.root = root
        self.env = env
        self.kind = kind
        self.worker: Spawned | None = None

    def manage(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
        return _run([sys.executable, "manage.py", *args], self.root, {**self.env, **(env or {})}, timeout)

    def step(self, code: str, timeout: float = 120, env: dict[str, str] | None = None) -> dict:
        """Run ``code`` in a new Django process (with ``env`` added); the JSON it prints last."""
        out = self.manage("shell", "-c", PRELUDE + textwrap.dedent(code), timeout=timeout, env=env)
        return json.loads(out.strip().splitlines()[-1])

    def start_worker(self, *args: str) -> Spawned:
        self.worker = Spawned([sys.executable, "manage.py", "offload", "worker", "-c", "2", *args],
                              self.root / "worker.log", env=self.env, cwd=self.root)
        return self.worker


def _pg_schema_create(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')


def _pg_schema_drop(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def project(request, tmp_path_factory):
    """The project on a SQLite file or on PostgreSQL, with its worker running."""
    kind = request.param
    extra: dict[str, str] = {}
    schema = ""
    if kind == "postgresql":
        if not reachable("127.0.0.1", 5432):
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL is not running on 127.0.0.1:5432")
            pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
        schema = f"offload_django_{test_id()}_{uuid.uuid4().hex[:8]}".lower().replace("-", "_")
        _pg_schema_create(schema)
        extra = {"SHOP_DATABASE": "postgresql", "SHOP_SCHEMA": schema, "SHOP_APP_NAME": schema}
    env = _env(extra)
    root = make_project(tmp_path_factory.mktemp(f"django-{kind}") / "mysite", env)
    made = Project(root, env, kind)
    worker = made.start_worker()
    try:
        # Ready when it has run a task (the first one also creates the queues).
        ready = made.step("""
            sent = post("/enqueue/add", {"args": [1, 1]}).json()
            print(json.dumps(wait_result(sent["id"], timeout=90)))
        """)
        assert ready["status"] == "SUCCESSFUL", (ready, worker.text()[-3000:])
        yield made
    finally:
        worker.stop()
        if schema:
            _pg_schema_drop(schema)


def test_the_embedded_broker_lives_under_base_dir(project):
    # No broker configured: the embedded one, in BASE_DIR/instance.
    assert (project.root / "instance").is_dir()
    assert any((project.root / "instance").iterdir())


def test_tasks_run_on_the_worker_and_results_are_read_from_another_process(project):
    sent = project.step("""
        ids = {}
        for name, args in [("add", [2, 3]), ("describe", ["ctx"]), ("write_note", ["from a task"]),
                           ("fail", ["it broke"])]:
            answer = post(f"/enqueue/{name}", {"args": args})
            assert answer.status_code == 202, answer.content
            assert answer.json()["status"] == "READY"
            ids[name] = answer.json()["id"]
        print(json.dumps(ids))
    """)
    # Another process: Django's test client on the result view, and the ORM.
    read = project.step(f"""
        ids = {sent!r}
        results = {{name: wait_result(result_id) for name, result_id in ids.items()}}
        from shop.models import Note
        results["notes"] = list(Note.objects.values_list("text", "written_by"))
        print(json.dumps(results))
    """)
    add, described, note, failed = read["add"], read["describe"], read["write_note"], read["fail"]
    assert add["status"] == "SUCCESSFUL" and add["return_value"] == 5
    assert add["task"] == "shop.tasks.add"
    assert len(add["worker_ids"]) == 1 and add["worker_ids"][0]
    assert add["enqueued_at"] <= add["started_at"] <= add["finished_at"]
    # takes_context=True: the task saw its own result, running, first attempt.
    context = described["return_value"]
    assert context == {"id": sent["describe"], "attempt": 1, "tag": "ctx", "status": "RUNNING", "args": ["ctx"]}
    # The ORM inside a task, committed, seen by the reading process.
    assert note["status"] == "SUCCESSFUL" and note["return_value"]["count"] >= 1
    assert ["from a task", "task"] in read["notes"]
    # A failure: the exception's class path and its traceback.
    assert failed["status"] == "FAILED" and "return_value" not in failed
    [error] = failed["errors"]
    assert error["exception_class_path"] == "builtins.ValueError"
    assert "ValueError: it broke" in error["traceback"] and "shop/tasks.py" in error["traceback"]


def test_refresh_and_get_result_on_the_task(project):
    out = project.step("""
        from shop import tasks
        result = tasks.add.enqueue(20, 22)
        before = str(result.status)
        deadline = time.monotonic() + 60
        while not result.is_finished and time.monotonic() < deadline:
            time.sleep(0.05)
            result.refresh()
        again = tasks.add.get_result(result.id)
        try:
            tasks.describe.get_result(result.id)
            mismatch = None
        except Exception as exc:
            mismatch = type(exc).__name__
        print(json.dumps({"before": before, "after": str(result.status), "value": result.return_value,
                          "again": again.return_value, "attempts": again.attempts, "mismatch": mismatch}))
    """)
    assert out == {"before": "READY", "after": "SUCCESSFUL", "value": 42, "again": 42, "attempts": 1,
                   "mismatch": "TaskResultMismatch"}


def test_aenqueue_and_aget_result(project):
    out = project.step("""
        import asyncio
        from shop import tasks
        async def main():
            result = await tasks.add.aenqueue(1, 2)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                found = await tasks.add.aget_result(result.id)
                if found.is_finished:
                    return found.return_value
                await asyncio.sleep(0.05)
        print(json.dumps({"value": asyncio.run(main())}))
    """)
    assert out == {"value": 3}


def test_run_after_defers_the_task(project):
    out = project.step("""
        from shop import tasks
        from django.utils import timezone
        run_after = timezone.now() + datetime.timedelta(seconds=3)
        result = tasks.add.using(run_after=run_after).enqueue(4, 4)
        time.sleep(0.5)  # the worker has had time to take it: it holds it until run_after
        result.refresh()
        early = str(result.status)
        deadline = time.monotonic() + 60
        while not result.is_finished and time.monotonic() < deadline:
            time.sleep(0.05)
            result.refresh()
        print(json.dumps({"early": early, "status": str(result.status), "value": result.return_value,
                          "late_enough": result.started_at >= run_after}))
    """)
    assert out == {"early": "READY", "status": "SUCCESSFUL", "value": 8, "late_enough": True}


def test_enqueue_on_commit_sends_nothing_when_the_transaction_rolls_back(project):
    sent = project.step("""
        answer = post("/rollback")
        print(json.dumps(answer.json()))
    """)
    out = project.step(f"""
        from shop.models import Note
        from django_tasks import task_backends
        from django_tasks.exceptions import TaskResultDoesNotExist
        backend = task_backends["on_commit"]
        committed = wait_result({sent["committed_id"]!r})
        try:
            backend.get_result({sent["id"]!r})
            rolled = "found"
        except TaskResultDoesNotExist:
            rolled = "does not exist"
        from offload.django import get_offload
        meta = get_offload().celery.backend.get_task_meta({sent["id"]!r})
        print(json.dumps({{"committed": committed["status"], "rolled": rolled, "meta": meta["status"],
                          "texts": sorted(set(Note.objects.values_list("text", flat=True)))}}))
    """)
    # The committed one ran (after its own transaction: it counts its note);
    # of the rolled-back one nothing reached the broker or the result store.
    assert out["committed"] == "SUCCESSFUL"
    assert out["rolled"] == "does not exist" and out["meta"] == "PENDING"
    assert "committed" in out["texts"] and "rolled back" not in out["texts"]


def test_submit_on_commit_in_the_core(project):
    out = project.step("""
        from django.db import transaction
        from offload.django import get_offload
        from shop.jobs import count_notes_plain
        off = get_offload()
        try:
            with transaction.atomic():
                lost = off.submit(count_notes_plain, on_commit=True)
                raise RuntimeError
        except RuntimeError:
            pass
        with transaction.atomic():
            kept = off.submit(count_notes_plain, on_commit=True)
            inside = kept.state
        now = off.submit(count_notes_plain, on_commit=True)  # no transaction: sent at once
        value = kept.result(timeout=60)
        now.result(timeout=60)
        meta = off.celery.backend.get_task_meta(lost.id)
        print(json.dumps({"inside": inside, "value": isinstance(value, int), "lost": meta["status"],
                          "lost_done": lost.done()}))
    """)
    assert out == {"inside": "PENDING", "value": True, "lost": "PENDING", "lost_done": False}


def test_only_tasks_declared_with_task_run_from_a_message(project):
    out = project.step("""
        from offload.django import get_offload
        off = get_offload()
        forged = {}
        for ref in ["shop.tasks:not_a_task", "os:system", "shop.models:Note", "shop.tasks:nope",
                    "django.core.management:call_command", 42]:
            result = off.celery.send_task("offload.django.run", args=[ref, ["echo pwned"], {}, {}])
            try:
                result.get(timeout=60)
                forged[str(ref)] = "ran"
            except Exception as exc:
                forged[str(ref)] = type(exc).__name__
        print(json.dumps(forged))
    """)
    assert set(out.values()) == {"NotAllowedError"}, out
    assert "refused to run 'shop.tasks:not_a_task'" in project.worker.text()


def test_what_the_backend_cannot_do_is_invalid_task(project):
    out = project.step("""
        from shop import tasks
        from django_tasks.exceptions import InvalidTaskError, TaskResultDoesNotExist
        errors = {}
        def attempt(name, fn):
            try:
                fn()
                errors[name] = "accepted"
            except (InvalidTaskError, TaskResultDoesNotExist) as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
        attempt("queue", lambda: tasks.add.using(queue_name="nowhere"))
        attempt("priority", lambda: tasks.add.using(priority=500))
        attempt("naive run_after", lambda: tasks.add.using(run_after=datetime.datetime(2030, 1, 1)))
        attempt("unknown id", lambda: tasks.add.get_result("no-such-id"))
        attempt("emails queue", lambda: tasks.send_mail.enqueue("x@example.com"))
        try:
            tasks.add.enqueue(object(), 1)
            errors["not json"] = "accepted"
        except TypeError as exc:
            errors["not json"] = "TypeError"
        from django_tasks import default_task_backend as backend
        errors["priorities"] = [backend.celery_priority(p) for p in (-100, 0, 100)]
        print(json.dumps(errors))
    """)
    assert out["queue"].startswith("InvalidTaskError: Queue 'nowhere'")
    assert out["priority"].startswith("InvalidTaskError: priority")
    assert out["naive run_after"].startswith("InvalidTaskError: run_after must be an aware")
    assert out["unknown id"].startswith("TaskResultDoesNotExist")
    assert out["emails queue"] == "accepted"
    assert out["not json"] == "TypeError"
    assert out["priorities"] == [0, 5, 9]  # the embedded broker takes 9 first, as Django's 100


@pytest.mark.parametrize("project", ["sqlite"], indirect=True)
def test_enqueue_with_the_broker_down_is_a_clear_error(project):
    out = project.step("""
        from shop import tasks
        from offload import BrokerUnavailable
        started = time.monotonic()
        try:
            tasks.add.enqueue(1, 2)
            print(json.dumps({"error": None}))
        except BrokerUnavailable as exc:
            print(json.dumps({"error": str(exc), "seconds": time.monotonic() - started}))
    """, env={"SHOP_BROKER": dead_broker_url("redis")})
    # Its result store is that Redis too, written first (the task's record): named as the store.
    assert out["error"] and "enqueue shop.tasks.add" in out["error"]
    assert "the result store at 'redis://" in out["error"] and "did not answer" in out["error"]
    assert out["seconds"] < 20


def test_manage_py_offload_status_and_inspect(project):
    status = json.loads(project.manage("offload", "status", "--json", "--timeout", "2"))
    assert status["ping"] is True and status["workers"]
    registered = json.loads(project.manage("offload", "inspect", "registered", "--json", "--timeout", "2"))
    names = [name for names in registered.values() for name in names]
    assert any(name.startswith("offload.django.run") for name in names), registered
    # The worker took the queues of TASKS' QUEUES (the emails one) without -Q.
    out = project.step("""
        from shop import tasks
        result = tasks.send_mail.enqueue("a@example.com")
        print(json.dumps(wait_result(result.id)))
    """)
    assert out["status"] == "SUCCESSFUL" and out["return_value"] == "sent to a@example.com"


def test_the_task_api_through_django_with_its_auth_and_csrf(project):
    out = project.step("""
        from django.contrib.auth.models import User
        from django.utils import timezone
        from shop import tasks
        answers = {}
        # Following a Django task through offload.web, as offload.js does.
        result = tasks.add.enqueue(6, 7)
        answers["follow"] = client.get(f"/offload/tasks/{result.id}?wait=30").json()
        answers["openapi"] = client.get("/offload/openapi.json").status_code
        answers["js"] = client.get("/offload/static/offload.js").status_code
        # Starting an exposed task: anonymous users may not.
        answers["anonymous"] = post("/offload/tasks/double", {"args": [21]}).status_code
        User.objects.filter(username="ann").delete()
        User.objects.create_user("ann", password="pw")
        strict = Client(enforce_csrf_checks=True)
        strict.login(username="ann", password="pw")
        answers["no csrf"] = strict.post("/offload/tasks/double", json.dumps({"args": [21]}),
                                         content_type="application/json").status_code
        # With the CSRF cookie and header a page of the site would send.
        secret = "x" * 32
        strict.cookies["csrftoken"] = secret
        started = strict.post("/offload/tasks/double", json.dumps({"args": [21]}),
                              content_type="application/json", HTTP_X_CSRFTOKEN=secret)
        answers["signed in"] = started.status_code
        task_id = started.json()["id"]
        answers["double"] = client.get(f"/offload/tasks/{task_id}?wait=30").json()["result"]
        # Bad input through Django: malformed JSON, a body over the API's limit.
        answers["malformed"] = strict.post("/offload/tasks/double", "{nope", content_type="application/json",
                                           HTTP_X_CSRFTOKEN=secret).status_code
        answers["too large"] = strict.post("/offload/tasks/double", "x" * (2 << 20),
                                           content_type="application/json",
                                           HTTP_X_CSRFTOKEN=secret).status_code
        answers["unknown task"] = strict.post("/offload/tasks/nope", "{}", content_type="application/json",
                                              HTTP_X_CSRFTOKEN=secret).status_code
        # The dashboard: staff only.
        answers["dashboard anonymous"] = Client().get("/offload/dashboard").status_code
        answers["dashboard user"] = client.get("/offload/dashboard").status_code
        answers["metrics user"] = client.get("/offload/metrics").status_code
        User.objects.filter(username="sam").delete()
        User.objects.create_user("sam", password="pw", is_staff=True)
        staff = Client(enforce_csrf_checks=True)
        staff.login(username="sam", password="pw")
        page = staff.get("/offload/dashboard")
        answers["dashboard staff"] = page.status_code
        answers["metrics staff"] = staff.get("/offload/metrics").status_code
        # Its actions carry the dashboard's own CSRF token (Django's check
        # is not asked for them); without it, 403.
        slow = tasks.add.using(run_after=timezone.now() + datetime.timedelta(seconds=60)).enqueue(1, 1)
        token = staff.cookies["offload_csrf"].value
        form = "application/x-www-form-urlencoded"  # as the page's form sends it
        answers["revoke no token"] = staff.post(f"/offload/dashboard/tasks/{slow.id}/revoke", "",
                                                content_type=form).status_code
        answers["revoke"] = staff.post(f"/offload/dashboard/tasks/{slow.id}/revoke", f"csrf={token}",
                                       content_type=form).status_code
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            slow.refresh()
            if slow.is_finished:
                break
            time.sleep(0.05)
        answers["revoked"] = str(slow.status)
        print(json.dumps(answers))
    """)
    follow = out["follow"]
    assert follow["state"] == "SUCCESS" and follow["result"] == 13
    assert out["openapi"] == 200 and out["js"] == 200
    assert out["anonymous"] == 403
    assert out["no csrf"] == 403
    assert out["signed in"] == 202 and out["double"] == 42
    assert out["malformed"] == 400 and out["too large"] == 413 and out["unknown task"] == 404
    assert out["dashboard anonymous"] == 403 and out["dashboard user"] == 403 and out["metrics user"] == 403
    assert out["dashboard staff"] == 200 and out["metrics staff"] == 200
    assert out["revoke no token"] == 403 and out["revoke"] == 303
    assert out["revoked"] == "FAILED"


@pytest.mark.parametrize("project", ["postgresql"], indirect=True)
def test_database_connections_are_closed_after_each_task(project):
    # Connection states are read from PostgreSQL's pg_stat_activity.
    out = project.step("""
        from shop import tasks
        results = [tasks.write_note.enqueue(f"note {i}") for i in range(40)]
        done = [wait_result(r.id)["status"] for r in results]
        from django.db import connection
        with connection.cursor() as cursor:
            cursor.execute("select current_setting('application_name')")
            name = cursor.fetchone()[0]
        print(json.dumps({"done": sorted(set(done)), "name": name}))
    """)
    assert out["done"] == ["SUCCESSFUL"]
    assert out["name"] == project.env["SHOP_APP_NAME"]  # what the states below are filtered by
    import psycopg

    app_name = project.env["SHOP_APP_NAME"]

    def states() -> list[str]:
        with psycopg.connect(PG, autocommit=True) as conn:
            return [row[0] or "" for row in conn.execute(
                "select state from pg_stat_activity where application_name = %s", (app_name,))]

    # CONN_MAX_AGE = 0 (Django's default): each task's connection is closed
    # when it ends, as a request's is; none is left open, none in a transaction.
    assert wait_until(lambda: states() == [], timeout=10), states()


@pytest.mark.parametrize("project", ["sqlite"], indirect=True)  # the workers' boot is what is tested
def test_manage_py_offload_cluster_starts_workers_that_set_django_up(project):
    cluster = Spawned([sys.executable, "manage.py", "offload", "cluster", "--no-flower", "--json",
                       "--timeout", "90"], project.root / "cluster.log", env=project.env, cwd=project.root)
    try:
        # Ready: each worker (celery -A offload._boot:app, OFFLOAD_APP=offload.django.boot:off)
        # set Django up, found the project's Offload and answered a ping.
        assert wait_until(lambda: '"event": "ready"' in cluster.text() or cluster.proc.poll() is not None,
                          timeout=120), cluster.text()
        assert '"event": "ready"' in cluster.text(), cluster.text()
    finally:
        cluster.stop()
    assert '"event": "stopped"' in cluster.text()


def test_tasks_setting_alone_without_the_app_in_installed_apps(tmp_path):
    """TASKS names the backend and nothing else: the worker is `offload --app offload.django.boot`."""
    tail = (PROJECT_CODE / "settings_tail.py").read_text().replace('"offload.django", ', "")
    assert '"offload.django"' not in tail
    env = _env()
    root = make_project(tmp_path / "mysite", env, tail)
    made = Project(root, env, "sqlite")
    worker = Spawned([sys.executable, "-c", "from offload.cli import main; main()", "--app",
                      "offload.django.boot:off", "worker", "-c", "1", "-Q", "celery,emails"],
                     root / "worker.log", env={**env, "DJANGO_SETTINGS_MODULE": "mysite.settings"}, cwd=root)
    try:
        out = made.step("""
            from shop import tasks
            result = tasks.write_note.enqueue("standalone")
            print(json.dumps(wait_result(result.id, timeout=90)))
        """)
        assert out["status"] == "SUCCESSFUL", (out, worker.text()[-3000:])
        assert out["return_value"]["count"] == 1
        assert (root / "instance").is_dir()
    finally:
        worker.stop()
