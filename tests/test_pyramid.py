"""offload.pyramid: settings, directives, request methods, and tasks that get a
real Pyramid request on a real worker (SQLAlchemy under pyramid_tm on a SQLite
file and on the local PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import webtest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationConflictError, ConfigurationExecutionError

from conftest import WorkerProcess, reachable, wait_until, worker_env
from offload import ConfigurationError, Future, Offload
from offload.pyramid import InvalidTaskId, TaskNotRegistered


def double(request, x):
    return 2 * x


def other_double(request, x):
    return 2 * x


def plain(x):
    return x


def make_config(**settings) -> Configurator:
    config = Configurator(settings={"celery.task_always_eager": "true", **settings})
    config.include("offload.pyramid")
    return config


# Settings and the registry --------------------------------------------------------

def test_settings_are_read_and_coerced_into_an_offload_in_the_registry():
    config = make_config(**{"celery.broker_url": "redis://127.0.0.1:6379/5",
                            "celery.worker_prefetch_multiplier": "3",
                            "CELERY_TASK_DEFAULT_QUEUE": "ledger"})
    off = config.registry.offload
    assert isinstance(off, Offload)
    assert config.registry["offload"] is off
    conf = off.celery.conf
    assert (conf.broker_url, conf.result_backend) == ("redis://127.0.0.1:6379/5",) * 2
    assert (conf.worker_prefetch_multiplier, conf.task_always_eager, conf.task_default_queue) == (3, True, "ledger")
    app = config.make_wsgi_app()
    from pyramid.scripting import prepare

    with prepare(registry=app.registry) as env:
        assert env["request"].offload is off


def test_two_apps_keep_two_offloads():
    one = make_config(**{"celery.broker_url": "redis://127.0.0.1:6379/5"})
    two = make_config(**{"celery.broker_url": "redis://127.0.0.1:6379/6"})
    assert one.registry.offload is not two.registry.offload
    assert one.registry.offload.celery.conf.broker_url.endswith("/5")
    assert two.registry.offload.celery.conf.broker_url.endswith("/6")


def test_included_twice_the_app_keeps_one_offload():
    config = make_config()
    off = config.registry.offload
    config.include("offload.pyramid")
    assert config.registry.offload is off
    config.commit()


def test_the_offload_belongs_to_the_apps_package():
    off = make_config().registry.offload
    assert off.import_name == "tests" or off.import_name == __name__.partition(".")[0]
    assert off.celery.main == off.import_name


def test_a_wrong_setting_type_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="worker_prefetch_multiplier.*expects a int.*'many'"):
        make_config(**{"celery.worker_prefetch_multiplier": "many"})


# Directives ---------------------------------------------------------------------------

def test_register_task_and_delay_task_return_celery_results():
    config = make_config()
    config.register_task(double)
    config.register_task(double, name="twice")
    app = config.make_wsgi_app()
    from pyramid.scripting import prepare

    with prepare(registry=app.registry) as env:
        request = env["request"]
        result = request.delay_task(double, 21)
        assert result.ready() and result.result == 42
        assert request.delay_task("twice", 4).result == 8
        assert request.get_task_result(result.id).id == result.id
        fut = request.submit(plain, 5)
        assert isinstance(fut, Future) and fut.result(timeout=5) == 5


def test_one_name_registered_twice_is_a_pyramid_conflict():
    config = make_config()
    config.register_task(double, name="same")
    config.register_task(other_double, name="same")
    with pytest.raises(ConfigurationConflictError, match="offload.task.*same"):
        config.commit()


def test_a_name_celery_already_has_is_refused():
    config = make_config()
    config.registry.offload.task(name="taken")(plain)
    config.register_task(double, name="taken")
    with pytest.raises(ConfigurationExecutionError, match="already registered"):
        config.commit()


def test_register_task_checks_its_arguments():
    config = make_config()
    with pytest.raises(TypeError, match="takes a function"):
        config.register_task("double")
    with pytest.raises(TypeError, match="non-empty string"):
        config.register_task(double, name="")


def test_delay_task_of_something_unregistered_says_what_to_do():
    config = make_config()
    config.register_task(double)
    app = config.make_wsgi_app()
    from pyramid.scripting import prepare

    with prepare(registry=app.registry) as env:
        with pytest.raises(TaskNotRegistered, match=r"'other_double' is not a registered task.*register_task"):
            env["request"].delay_task(other_double, 1)
        with pytest.raises(TaskNotRegistered, match="'nope'"):
            env["request"].delay_task("nope", 1)
        with pytest.raises(TypeError):  # Celery checks the call against double(request, x)
            env["request"].delay_task(double, 1, 2)


@pytest.mark.parametrize("bad", ["garbage<script>", "", "../../etc", "x" * 5000, 12, None, "no such id",
                                 "c7f6a7c5-897b-4c01-89b4-e1cc3f2a30d5\n"])
def test_get_task_result_of_a_malformed_id(bad):
    config = make_config()
    app = config.make_wsgi_app()
    from pyramid.scripting import prepare

    with prepare(registry=app.registry) as env:
        with pytest.raises(InvalidTaskId, match="is not a task id"):
            env["request"].get_task_result(bad)


def test_a_malformed_id_from_a_view_answers_400_without_a_traceback():
    config = make_config()

    def result(request):
        return request.get_task_result(request.GET["id"]).id

    config.add_route("result", "/result")
    config.add_view(result, route_name="result", renderer="string")
    app = webtest.TestApp(config.make_wsgi_app())
    answer = app.get("/result", params={"id": "garbage<script>"}, status=400)
    assert "is not a task id" in answer.text and "Traceback" not in answer.text
    assert answer.content_type == "text/plain"
    good = str(uuid.uuid4())
    assert app.get("/result", params={"id": good}).text == good


# On a real worker ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pyramid_worker(data_root):
    postgres = reachable("127.0.0.1", 5432)
    from testapp import pyramidtasks, test_id

    pyramidtasks.create_tables(("sqlite", "postgres") if postgres else ("sqlite",))
    worker = WorkerProcess("testapp.pyramidtasks", f"pyramid-{test_id()}@%h",
                           data_root / "worker-pyramid.log")
    app = pyramidtasks.configure().make_wsgi_app()
    from pyramid.scripting import prepare

    env = prepare(registry=app.registry)
    request = env["request"]
    try:
        try:
            request.delay_task(pyramidtasks.add, 1, 1).get(timeout=60)
        except Exception as exc:
            raise RuntimeError(f"the worker did not start: {exc!r}\n{worker.log_tail()}") from exc
        yield request, postgres
    finally:
        env["closer"]()
        worker.stop()


def test_a_task_gets_a_real_request_from_the_same_registry(pyramid_worker):
    request, _ = pyramid_worker
    from testapp.pyramidtasks import describe

    seen = request.delay_task(describe, label="on the worker").get(timeout=30)
    assert seen == {
        "label": "on the worker",
        "greeting": "hello from the registry",  # config.add_request_method(property=True)
        "url": "http://localhost/",              # a fresh request: nothing of the view's
        "GET": {},
        "current": True,
        "setting": "hello from the registry",
        "tm_active": True,
    }
    from testapp.pyramidtasks import add

    result = request.delay_task(add, 2, 3)
    assert wait_until(result.ready, timeout=30)
    assert request.get_task_result(result.id).result == 5


def test_request_submit_runs_a_plain_function_in_the_apps_request(pyramid_worker):
    request, _ = pyramid_worker
    from testapp.pyramidtasks import plain_greeting

    fut = request.submit(plain_greeting)
    assert fut.result(timeout=30) == "hello from the registry"
    assert request.offload.get(fut.id).result(timeout=5) == "hello from the registry"


def test_get_task_result_reads_an_id_the_app_chose(pyramid_worker):
    """Any id that keeps offload.ids' rule is read, not only Celery's UUIDs."""
    request, _ = pyramid_worker
    from testapp.pyramidtasks import plain_greeting

    chosen = f"greeting:{uuid.uuid4().hex[:12]}"
    request.offload.options(task_id=chosen).submit(plain_greeting)
    assert request.get_task_result(chosen).get(timeout=30) == "hello from the registry"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_pyramid_tm_commits_a_task_that_returns_and_aborts_one_that_raises(pyramid_worker, kind):
    request, postgres = pyramid_worker
    if kind == "postgres" and not postgres:
        # As for the brokers: a developer without PostgreSQL skips, CI fails.
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not running on 127.0.0.1:5432")
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    from testapp.pyramidtasks import add_note, add_note_then_fail, count_notes

    kept, dropped = f"kept-{uuid.uuid4()}", f"dropped-{uuid.uuid4()}"
    assert request.delay_task(add_note, kind, kept).get(timeout=30) == kept
    failed = request.delay_task(add_note_then_fail, kind, dropped)
    with pytest.raises(RuntimeError, match="failed after writing"):
        failed.get(timeout=30)
    assert request.delay_task(count_notes, kind, kept).get(timeout=30) == 1
    assert request.delay_task(count_notes, kind, dropped).get(timeout=30) == 0


# Workers for an ini file ------------------------------------------------------------

def _ini(tmp_path: Path) -> Path:
    ini = tmp_path / "development.ini"
    ini.write_text("[app:main]\nuse = call:testapp.pyramidtasks:main\n")
    return ini


@pytest.mark.parametrize("command", ["celery", "offload"])
def test_a_worker_for_a_pserve_app_from_its_ini_file(tmp_path, data_root, pyramid_worker, command):
    request, _ = pyramid_worker
    ini = _ini(tmp_path)
    from testapp import pyramidtasks, test_id

    queue = f"offload-pyramid-ini-{command}-{test_id()}"
    name = f"ini-{command}-{test_id()}@%h"
    if command == "celery":
        args = [sys.executable, "-m", "celery", "-A", "offload.pyramid", "worker", "--ini", str(ini),
                "-n", name, "-Q", queue, "-c", "1", "--without-gossip", "--without-mingle"]
    else:
        args = [str(Path(sys.executable).parent / "offload"), "--app", str(ini), "worker",
                "-n", name, "-Q", queue, "-c", "1"]
    log_path = data_root / f"worker-pyramid-ini-{command}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, env=worker_env(), stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
    try:
        task = request.registry["offload.pyramid.tasks"][pyramidtasks.describe]
        result = task.apply_async(("ini",), queue=queue)
        try:
            seen = result.get(timeout=60)
        except Exception as exc:
            raise AssertionError(f"{exc!r}\n{log_path.read_text()[-3000:]}") from exc
        assert seen["greeting"] == "hello from the registry" and seen["label"] == "ini"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_registered_task_runs_on_its_schedule_with_its_request(tmp_path, data_root, pyramid_worker):
    request, _ = pyramid_worker
    from testapp.pyramidtasks import count_notes

    ini = _ini(tmp_path)
    before = request.delay_task(count_notes, "sqlite", "heartbeat").get(timeout=30)
    log_path = tmp_path / "beat.log"
    with open(log_path, "ab") as log:
        beat = subprocess.Popen([str(Path(sys.executable).parent / "offload"), "--app", str(ini), "beat"],
                                env=worker_env(), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    try:
        # Each run inserts a row in pyramid_tm's transaction: committed runs count.
        assert wait_until(
            lambda: request.delay_task(count_notes, "sqlite", "heartbeat").get(timeout=30) >= before + 2,
            timeout=90, interval=0.5), log_path.read_text()[-3000:]
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        try:
            beat.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(beat.pid, signal.SIGKILL)
            beat.wait()


def test_celery_a_offload_pyramid_without_an_ini_says_what_to_do(tmp_path):
    env = worker_env()
    env.pop("OFFLOAD_APP", None)
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "offload.pyramid", "worker"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    assert "celery -A offload.pyramid worker --ini development.ini" in proc.stdout + proc.stderr


def test_delay_task_refuses_arguments_json_cannot_carry(pyramid_worker):
    request, _ = pyramid_worker
    from testapp.pyramidtasks import add

    with pytest.raises(TypeError, match="JSON-serializable"):
        request.delay_task(add, object(), 1)


def test_delay_task_with_the_broker_down_is_a_clear_error():
    from offload import BrokerUnavailable

    config = Configurator(settings={"celery.broker_url": "redis://:s3cret@127.0.0.1:9/0"})
    config.include("offload.pyramid")
    config.register_task(double)
    app = config.make_wsgi_app()
    from pyramid.scripting import prepare

    with prepare(registry=app.registry) as env:
        with pytest.raises(BrokerUnavailable, match="127.0.0.1:9/0.*Is it running") as caught:
            env["request"].delay_task(double, 1)
    assert "s3cret" not in str(caught.value)  # the password is masked


def test_a_registered_task_can_run_on_a_schedule():
    from celery.schedules import crontab

    from offload.beat import task_entries

    config = make_config()
    config.register_task(double, schedule=crontab(minute="*/5"))
    config.register_task(other_double, schedule=30.0)
    celery = config.make_celery_app()
    entries = task_entries(celery)
    assert entries[f"{__name__}.double"]["schedule"] == crontab(minute="*/5")
    assert entries[f"{__name__}.other_double"]["schedule"].run_every.total_seconds() == 30
    bad = make_config()
    bad.register_task(double, schedule="often")
    with pytest.raises(ConfigurationExecutionError, match="schedule= takes seconds"):
        bad.commit()


def test_submit_on_commit_waits_for_pyramid_tm_and_sends_nothing_on_abort(pyramid_worker):
    from pyramid.response import Response

    from testapp import pyramidtasks

    futures = {}

    def commit(request):
        futures["commit"] = request.offload.submit(pyramidtasks.plain_greeting, on_commit=True)
        futures["state inside"] = futures["commit"].state
        return Response("ok")

    def abort(request):
        futures["abort"] = request.offload.submit(pyramidtasks.plain_greeting, on_commit=True)
        request.tm.doom()  # pyramid_tm aborts a doomed transaction
        return Response("doomed")

    config = pyramidtasks.configure()
    config.add_route("commit", "/commit")
    config.add_view(commit, route_name="commit")
    config.add_route("abort", "/abort")
    config.add_view(abort, route_name="abort")
    app = webtest.TestApp(config.make_wsgi_app())
    assert app.get("/abort").text == "doomed"
    assert app.get("/commit").text == "ok"
    assert futures["state inside"] == "PENDING"
    assert futures["commit"].result(timeout=30) == "hello from the registry"
    off = app.app.registry.offload
    # Sent before the committed one, it would have run first: it was never sent.
    assert off.celery.backend.get_task_meta(futures["abort"].id)["status"] == "PENDING"
    assert not futures["abort"].done()
    # Outside a request (no transaction) it leaves at once.
    assert off.submit(pyramidtasks.plain_greeting, on_commit=True).result(timeout=30) == "hello from the registry"
