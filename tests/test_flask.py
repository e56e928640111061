"""The Flask integration (offload.flask): config from app.config, state on the app,
tasks in the app context; and a core that imports no framework."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import flask
import pytest

from conftest import purge, reachable, require_service, wait_until, worker_env
from offload import ConfigurationError, Offload
from offload.flask import init_app, is_flask_app, offload_of

HOST = socket.gethostname()
BIN = os.path.dirname(sys.executable)


def make_app(tmp_path, name="web", **config):
    app = flask.Flask(name, instance_path=str(tmp_path / name / "instance"))
    app.config.update({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/9", **config})
    return app


def test_flask_config_is_read(tmp_path):
    app = make_app(tmp_path)
    off = Offload()
    off.init_app(app)
    assert off.celery.conf.broker_url == "redis://127.0.0.1:6379/9"
    assert offload_of(app) is off and app.extensions["offload"] is off
    assert off.settings.data_dir == str(tmp_path / "web" / "instance")
    assert Offload(app).celery.conf.broker_url == "redis://127.0.0.1:6379/9"


def test_only_celerys_and_offloads_keys_are_taken_from_a_flask_config(tmp_path):
    app = make_app(tmp_path, S3_BUCKET="the-apps-bucket", CONTROL_EXCHANGE="the-apps-exchange")
    off = Offload(app)
    assert off.celery.conf.s3_bucket is None
    assert off.celery.conf.control_exchange == "celery"
    # Celery's own spelling of the same settings still reaches Celery.
    app.config.update(CELERY_S3_BUCKET="results-bucket", CELERY_CONTROL_EXCHANGE="offload-control")
    off.init_app(app)
    assert off.celery.conf.s3_bucket == "results-bucket"
    assert off.celery.conf.control_exchange == "offload-control"


def test_tasks_run_in_the_context_of_the_app_given_last(tmp_path):
    first, second = make_app(tmp_path, "first"), make_app(tmp_path, "second")
    torn_down = []
    for app in (first, second):
        app.teardown_appcontext(lambda exc, name=app.name: torn_down.append(name))
    off = Offload(first)
    off.init_app(second)  # an app factory called again
    assert off.app_hooks.app is second
    with off.task_context():
        assert flask.current_app._get_current_object() is second
    # The first app's context was not pushed as well.
    assert torn_down == ["second"]


def test_one_offload_given_to_several_apps_keeps_its_state_on_each_app(tmp_path, monkeypatch):
    import types

    monkeypatch.delenv("FLASK_APP", raising=False)
    monkeypatch.delenv("OFFLOAD_APP", raising=False)
    # Two apps of two modules, as an app factory in each would make them.
    modules = {name: types.ModuleType(f"severalapps_{name}") for name in ("first", "second")}
    apps = {}
    for name, module in modules.items():
        apps[name] = module.app = make_app(tmp_path, module.__name__, CELERY_DEFAULT_QUEUE=name)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    off = Offload()
    assert off.app_hooks is None and not hasattr(off, "flask_app")  # no app kept on the Offload itself
    given = []
    for name in ("first", "second", "first"):
        off.init_app(apps[name])
        given.append(name)
        # Each app finds the Offload in its own extensions; the one given last rules.
        assert all(offload_of(apps[each]) is off for each in given)
        assert off.celery.conf.task_default_queue == name
        assert off.workers.resolve_app_spec()[0] == f"severalapps_{name}:app"
        with off.task_context():
            assert flask.current_app._get_current_object() is apps[name]
    assert off._contexts == [apps["first"].app_context]


def test_a_worker_builds_the_app_from_its_factory_or_flask_app(tmp_path, monkeypatch):
    import types

    monkeypatch.delenv("OFFLOAD_APP", raising=False)
    module = types.ModuleType("factoryapp")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    module.create_app = lambda: None  # the factory's module holds no app
    app = make_app(tmp_path, module.__name__)
    off = Offload(app)
    monkeypatch.setenv("FLASK_APP", "factoryapp:create_app('prod')")
    assert off.app_hooks.worker_spec() == ("factoryapp:create_app('prod')", [])
    monkeypatch.delenv("FLASK_APP")
    assert off.app_hooks.worker_spec()[0] == "factoryapp:create_app"
    del module.create_app
    assert off.app_hooks.worker_spec() is None


def test_a_worker_reads_the_starters_settings_through_the_app(tmp_path):
    app = make_app(tmp_path, CELERY_DEFAULT_QUEUE="mine", CELERY_ROUTES={"x": "y"}, S3_BUCKET="kept")
    off = Offload(app)
    off.app_hooks.reconfigure({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/8",
                               "CELERY_DEFAULT_QUEUE": "theirs"}, kept={"CELERY_ROUTES"})
    assert app.config["CELERY_DEFAULT_QUEUE"] == "theirs" and app.config["S3_BUCKET"] == "kept"
    assert app.config["CELERY_ROUTES"] == {"x": "y"}  # JSON could not carry it: kept as the import made it
    assert off.celery.conf.task_default_queue == "theirs"
    assert off.celery.conf.broker_url == "redis://127.0.0.1:6379/8"


def test_detecting_a_flask_app():
    assert is_flask_app(flask.Flask("x"))
    assert not is_flask_app(flask.Flask)  # the class, not an app
    assert not is_flask_app({"config": {}})
    assert offload_of(object()) is None
    with pytest.raises(TypeError, match="Flask app"):
        init_app(Offload({"CELERY_ALWAYS_EAGER": True}), object())
    with pytest.raises(TypeError, match="Flask app"):
        Offload().init_app({"CELERY_ALWAYS_EAGER": True})


def test_the_core_imports_no_framework():
    code = ("import sys; from offload import Offload; "
            "Offload({'CELERY_BROKER_URL': 'redis://127.0.0.1:6379/9'}); "
            "print(sorted(m for m in ('flask', 'pyramid', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# State per app, application factories ------------------------------------------------

def test_two_flask_apps_on_two_brokers_keep_their_own_offload_workers_and_tasks(data_root):
    require_service("redis")
    from testapp import twoflask

    offs = {"embedded": twoflask.off_embedded, "redis": twoflask.off_redis}
    assert offload_of(twoflask.app_embedded) is offs["embedded"]
    assert offload_of(twoflask.app_redis) is offs["redis"]
    assert offs["embedded"].celery.conf.broker_url.startswith("sqlite://")
    assert offs["redis"].celery.conf.broker_url.startswith("redis://")
    for off in offs.values():
        purge(off)
    try:
        for off in offs.values():
            off.start(timeout=90)
        for kind, off in offs.items():
            # Its own workers only: the other app's worker is on another broker.
            assert off.status(timeout=1)["workers"] == {f"{kind}@{HOST}": "OK"}
            assert off.submit(twoflask.who).result(timeout=30) == kind
        assert twoflask.which_embedded.delay().get(timeout=30) == ["which_embedded", "embedded"]
        assert twoflask.which_redis.delay().get(timeout=30) == ["which_redis", "redis"]
        assert "twoflask.redis_only" in offs["redis"].registered()[f"redis@{HOST}"]
        assert "twoflask.redis_only" not in offs["embedded"].registered()[f"embedded@{HOST}"]
        assert "twoflask.redis_only" not in offs["embedded"].celery.tasks
    finally:
        for off in offs.values():
            off.stop()


@pytest.mark.parametrize("command", ["offload", "flask"])
def test_an_app_factory_serves_the_web_process_and_the_worker(data_root, command):
    """`offload --app pkg:create_app worker` / `flask --app pkg:create_app offload worker`."""
    require_service("redis")
    from testapp.flaskfactory import create_app, who

    web = create_app()
    off = offload_of(web)
    assert off is not None and off is not offload_of(create_app())  # an Offload per app
    purge(off)
    name = f"factory-{command}"
    spec = "testapp.flaskfactory:create_app"
    args = ([os.path.join(BIN, "offload"), "--app", spec, "worker"] if command == "offload"
            else [os.path.join(BIN, "flask"), "--app", spec, "offload", "worker"])
    proc = subprocess.Popen(args + ["-n", name, "-c", "1", "-l", "warning"], env=worker_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: f"{name}@{HOST}" in off.status(timeout=0.5)["workers"], 60, interval=0.1)
        assert off.submit(who).result(timeout=30) == "made by create_app"
        greet = off.celery.tasks["flaskfactory.greet"]
        assert greet.submit("web").result(timeout=30) == "hello web from made by create_app"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# Flask-SQLAlchemy in tasks --------------------------------------------------------------

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_reachable() -> bool:
    return reachable("127.0.0.1", 5432)


@pytest.fixture(params=["sqlite", "postgresql"])
def flaskdb(request, data_root, tmp_path, monkeypatch):
    """testapp.flaskdb's app on a SQLite file or PostgreSQL, with its local worker."""
    require_service("redis")
    if request.param == "postgresql" and not pg_reachable():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not running on 127.0.0.1:5432")
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    from testapp import test_id
    from testapp import flaskdb as module

    app_name = f"offload-flaskdb-{test_id()}"
    url = (f"sqlite:///{tmp_path / 'rows.sqlite3'}" if request.param == "sqlite"
           else f"{PG_URL}?application_name={app_name}")
    monkeypatch.setenv("OFFLOAD_TEST_FLASK_DB", url)
    app = module.create_app()
    with app.app_context():
        module.db.session.execute(module.db.delete(module.Row))
        module.db.session.commit()
    purge(module.off)
    module.off.start(timeout=90)
    try:
        yield app, module, request.param, app_name
    finally:
        module.off.stop()
        with app.app_context():
            module.Row.__table__.drop(module.db.engine, checkfirst=True)
            module.db.engine.dispose()


def pg_connections(app_name: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        rows = conn.execute("select coalesce(state, ''), count(*) from pg_stat_activity "
                            "where application_name = %s group by 1", (app_name,)).fetchall()
    return dict(rows)


def test_flask_sqlalchemy_in_tasks(flaskdb):
    app, module, kind, app_name = flaskdb
    off = module.off
    # A submitted function commits; the view side reads it afterwards.
    assert off.submit(module.add_row, "first").result(timeout=30) == {"app": "testapp.flaskdb", "rows": 1}
    with app.test_request_context():
        assert module.db.session.scalars(module.db.select(module.Row.text)).all() == ["first"]
    # A registered task in the same app context.
    assert module.count_rows.delay().get(timeout=30) == 1
    # A task that flushes and never commits leaves nothing: the app context's
    # teardown (Flask-SQLAlchemy's session.remove()) rolled it back.
    for _ in range(4):
        off.submit(module.leave_uncommitted, "never committed").result(timeout=30)
    assert module.count_rows.delay("never committed").get(timeout=30) == 0
    # 200 tasks later, the connections are the pools' few, none left in a transaction.
    futures = off.map(module.add_row, [[f"row {i}"] for i in range(200)])
    assert [f.result(timeout=120)["app"] for f in futures] == ["testapp.flaskdb"] * 200
    assert module.count_rows.delay().get(timeout=30) == 201
    if kind == "postgresql":
        connections = pg_connections(app_name)
        # The web process, the worker's main process and its two pool processes:
        # a connection or two each at most, and none inside a transaction.
        assert sum(connections.values()) <= 8, connections
        assert not any(state.startswith("idle in transaction") for state in connections), connections


def test_a_task_runs_in_a_new_app_context_and_leaves_its_session_removed(tmp_path, monkeypatch):
    """Locally, through the same path a worker takes (off.task_context)."""
    monkeypatch.setenv("OFFLOAD_TEST_FLASK_DB", f"sqlite:///{tmp_path / 'local.sqlite3'}")
    from testapp import flaskdb as module

    module.create_app()
    with module.off.task_context():
        session = module.db.session()
        session.add(module.Row(text="pending"))
        session.flush()
        assert session.in_transaction()
    assert not session.in_transaction() and not session.new and not list(session.identity_map)


# Bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "message"), [
    ("CELERY_START_LOCAL_WORKERS", "maybe", "CELERY_START_LOCAL_WORKERS expects true or false"),
    ("CELERY_WORKERS", {"foo": 3}, r"CELERY_WORKERS\['foo'\] takes a dict of worker options"),
    ("CELERY_WORKERS", "[1, 2", "CELERY_WORKERS is not valid JSON"),
    ("CELERY_WORKER_PREFETCH_MULTIPLIER", "four", "worker_prefetch_multiplier' expects a int"),
    ("OFFLOAD_ALLOW", 5, "OFFLOAD_ALLOW takes a list of names"),
])
def test_a_setting_of_the_wrong_type_fails_at_init_app(tmp_path, key, value, message):
    app = make_app(tmp_path, **{key: value})
    with pytest.raises(ConfigurationError, match=message):
        Offload().init_app(app)
    with pytest.raises(ConfigurationError, match=message):
        Offload(app)


def test_a_task_name_registered_twice_fails_where_it_is_declared(tmp_path):
    off = Offload(make_app(tmp_path))

    @off.task(name="shop.total")
    def total():
        return 1

    with pytest.raises(ConfigurationError, match=r"a task named 'shop.total' is already registered "
                                                   r"\(by test_flask\..*total\); give one of them another name"):
        @off.task(name="shop.total")
        def other_total():
            return 2

    assert off.celery.tasks["shop.total"] is total
    # The same declaration made again (an app factory called twice) replaces its task.
    tasks = []
    for _ in range(2):
        @off.task
        def refresh():
            return "fresh"

        tasks.append(refresh)
    assert off.celery.tasks[tasks[1].name] is tasks[1]


@pytest.mark.parametrize("task_id", ["", "a b", "x" * 256, "line\nbreak", 42, None])
def test_off_get_refuses_what_cannot_be_a_task_id(tmp_path, task_id):
    off = Offload(make_app(tmp_path))
    with pytest.raises(ValueError, match="is not a task id"):
        off.get(task_id)


def test_two_apps_sharing_a_data_folder_are_told_to_use_their_own(data_root, tmp_path, monkeypatch):
    """Two Flask apps of one package share its instance folder by default."""
    require_service("redis")
    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])  # testapp, for the worker
    from offload.workers import WorkersNotReady
    from testapp import twoflask

    settings = dict(twoflask.app_redis.config, OFFLOAD_DATA_DIR=str(tmp_path))
    first, second = flask.Flask("first"), flask.Flask("second")
    first.config.update(settings)
    second.config.update(settings, CELERY_WORKERS=["second"])
    first_off, second_off = Offload(first), Offload(second)
    first_off.workers.app_spec = second_off.workers.app_spec = "testapp.twoflask:app_redis"
    first_off.start(timeout=90)
    try:
        with pytest.raises(WorkersNotReady, match="another Offload of this same process runs the workers"
                                                  ".*give each app its own OFFLOAD_DATA_DIR"):
            second_off.start(timeout=2)
    finally:
        second_off.stop()
        first_off.stop()


def test_submit_on_commit_waits_for_the_flask_sqlalchemy_session(flaskdb):
    app, module, _kind, _ = flaskdb
    off, db = module.off, module.db
    with app.app_context():
        db.session.add(module.Row(text="rolled back"))
        lost = off.submit(module.count_rows, "rolled back", on_commit=True)
        db.session.rollback()
        db.session.add(module.Row(text="kept"))
        kept = off.submit(module.count_rows, "kept", on_commit=True)
        assert kept.state == "PENDING"
        db.session.commit()
        # Sent after the commit: the task sees the committed row.
        assert kept.result(timeout=30) == 1
    assert off.celery.backend.get_task_meta(lost.id)["status"] == "PENDING"
    assert not lost.done()
    with app.app_context():  # no transaction: sent at once
        assert off.submit(module.count_rows, "rolled back", on_commit=True).result(timeout=30) == 0
