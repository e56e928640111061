"""Seed 002's "Workers" section run as written: configure ``app.config``, then
``init_app``, then ``start()``; the workers started get that configuration,
whether the package has an app factory or not (real workers on Redis).
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from conftest import require_service, worker_env
from testapp import test_id
from testapp.local import local_settings

HOST = socket.gethostname()


def _package(root: Path, name: str, *, factory: bool) -> None:
    """A package as seed 002's users have it: the extension at module level, tasks beside it."""
    package = root / name
    package.mkdir()
    init = '''
        from flask import Flask, current_app
        from offload import Offload

        celery = Offload()


        def read_setting(key):
            """What the worker's Flask app holds under ``key``."""
            return current_app.config.get(key)
    '''
    if factory:
        init += '''

        def create_app():
            app = Flask(__name__)
            celery.init_app(app)
            return app
        '''
    (package / "__init__.py").write_text(textwrap.dedent(init))
    (package / "tasks.py").write_text(textwrap.dedent(f'''
        from {name} import celery


        @celery.task
        def imported():
            return "imported by CELERY_IMPORTS"
    '''))


def _config(name: str, data_dir: Path) -> type:
    settings = local_settings(name, OFFLOAD_DATA_DIR=str(data_dir))

    # seed 002: "named workers", plus what this machine's broker needs.
    class Config:
        CELERY_BROKER_URL = settings["CELERY_BROKER_URL"]
        CELERY_TASK_DEFAULT_QUEUE = settings["CELERY_TASK_DEFAULT_QUEUE"]
        CELERY_CONTROL_EXCHANGE = settings["CELERY_CONTROL_EXCHANGE"]
        CELERY_EVENT_EXCHANGE = settings["CELERY_EVENT_EXCHANGE"]
        OFFLOAD_DATA_DIR = settings["OFFLOAD_DATA_DIR"]
        CELERY_WORKERS = ['foo', 'bar']
        CELERY_IMPORTS = [f"{name}.tasks"]
        GREETING = "set by the script"

    return Config


@pytest.fixture
def seed_package(tmp_path, monkeypatch, request):
    require_service("redis")
    factory = request.param == "factory"
    name = f"seed002_{request.param}_{test_id().replace('-', '_')}"
    _package(tmp_path, name, factory=factory)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = __import__(name)
    yield module, _config(name, tmp_path / "data")
    module.celery.stop()
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]


@pytest.mark.parametrize("seed_package", ["factory", "no_factory"], indirect=True)
def test_workers_started_by_the_script_get_its_configuration(seed_package):
    module, Config = seed_package
    celery = module.celery
    from flask import Flask

    if hasattr(module, "create_app"):
        app = module.create_app()
    else:
        app = Flask(module.__name__)
    # seed 002, "Workers":
    app.config.from_object(Config)
    celery.init_app(app)
    celery.start()
    assert celery.status(timeout=2) == {
        "ping": True, "workers": {f"foo@{HOST}": "OK", f"bar@{HOST}": "OK"}}

    # A value the script set is what a task reads on the worker (factory or not)...
    if hasattr(module, "create_app"):
        assert celery.submit(module.read_setting, "GREETING").result(timeout=30) == "set by the script"
    # ... and CELERY_IMPORTS was imported there.
    sent = celery.celery.send_task(f"{module.__name__}.tasks.imported")
    assert sent.get(timeout=30) == "imported by CELERY_IMPORTS"
    assert f"{module.__name__}.tasks.imported" in json.dumps(celery.registered(timeout=2))


@pytest.mark.parametrize("seed_package", ["factory"], indirect=True)
def test_a_setting_json_cannot_carry_is_named_by_start(seed_package):
    module, Config = seed_package
    celery = module.celery
    app = module.create_app()
    app.config.from_object(Config)
    app.config["CELERY_TASK_ROUTES"] = lambda *args, **kwargs: None  # a router function
    celery.init_app(app)
    with pytest.warns(UserWarning, match="CELERY_TASK_ROUTES.*not JSON.*own import of the app"):
        celery.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert celery.submit(module.read_setting, "GREETING").result(timeout=30) == "set by the script"


# seed 002's "more advanced worker configuration", as written.
SEED_ROUTES = {
    'core.tasks.too_long_task': {'queue': 'too_long_queue'},
    'core.tasks.quick_task': {'queue': 'quick_queue'},
}
SEED_WORKERS = {
  'foo': {
    'concurrency': 10,
    'log-level': 'error',
    'pidfile': '/var/run/celery/%n.pid',
    'queues': ['low-priority', 'high-priority']
  },
  'bar': {
    'concurrency': 5,
    'log-level': 'info',
    'queues': ['high-priority']
  }
}


def _purge(off, *queues: str) -> None:
    with off.celery.connection_for_write() as conn:
        for queue in queues:
            conn.default_channel.queue_purge(queue)


def test_workers_that_consume_no_default_queue_are_named_at_start_and_in_the_timeout(tmp_path, monkeypatch):
    require_service("redis")
    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    from offload import Offload
    from testapp import add

    off = Offload(local_settings("seedqueues", OFFLOAD_DATA_DIR=str(tmp_path),
                                 CELERY_ROUTES=SEED_ROUTES, CELERY_WORKERS=SEED_WORKERS))
    default = off.celery.conf.task_default_queue
    nobody = f"nobody-consumes-{test_id()}"
    # Any importable Offload: the workers get this one's settings.
    off.workers.app_spec = "testapp.routed:off"
    with pytest.warns(UserWarning) as seen:
        off.start()
    try:
        messages = [str(w.message) for w in seen]
        unconsumed = next(m for m in messages if "no configured worker consumes" in m)
        for queue in (default, "too_long_queue", "quick_queue"):
            assert repr(queue) in unconsumed
        assert "'low-priority'" not in unconsumed and "CELERY_WORKERS" in unconsumed
        # No system folder created: the pid file went to the data dir, and start said so.
        assert any("/var/run/celery" in m and str(tmp_path) in m for m in messages)
        assert (tmp_path / "workers" / "foo.pid").exists()

        assert off.submit(add, 1, 2, queue="high-priority").result(timeout=30) == 3
        for future, queue in ((off.submit(add, 1, 2), default), (off.submit(add, 2, 2, queue=nobody), nobody)):
            with pytest.raises(TimeoutError) as info:
                future.result(timeout=0.5)
            message = str(info.value)
            assert "testapp.add" in message and future.id in message and repr(queue) in message
            assert "PENDING" in message and "offload inspect active_queues" in message
            assert future.cancel()
            with pytest.raises(concurrent.futures.CancelledError, match=f"{future.id}.*cancelled"):
                future.result(timeout=1)
            with pytest.raises(concurrent.futures.CancelledError, match="revoked"):
                future.exception(timeout=1)
    finally:
        off.stop()
        _purge(off, default, nobody, "high-priority", "low-priority")


def test_a_task_that_raises_timeout_error_keeps_its_own_error(redis_off):
    from testapp import time_out

    future = redis_off.submit(time_out, "the task's own words")
    with pytest.raises(TimeoutError, match="^the task's own words$"):
        future.result(timeout=30)


def test_seed_003s_celery2_settings_run_on_rabbitmq(tmp_path, monkeypatch):
    """seed 003's celeryconfig.py names the broker Celery 2's way; its tasks run on RabbitMQ."""
    require_service("rabbitmq")
    from offload import Offload
    from testapp import add

    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    queue = f"offload-seed003-{test_id()}"
    off = Offload({
        "BROKER_HOST": "127.0.0.1", "BROKER_PORT": 5672, "BROKER_USER": "guest",
        "BROKER_PASSWORD": "guest", "BROKER_VHOST": "/",
        "CELERY_TASK_DEFAULT_QUEUE": queue, "CELERY_CONTROL_EXCHANGE": queue,
        "CELERY_EVENT_EXCHANGE": f"{queue}-ev", "CELERY_WORKERS": ["seed003"],
        "OFFLOAD_DATA_DIR": str(tmp_path), "OFFLOAD_ALLOW": ["testapp"],
    })
    assert off.broker_url == "amqp://guest:**@127.0.0.1:5672//"
    off.workers.app_spec = "testapp.routed:off"  # a Redis app: the workers get these settings
    off.start()
    try:
        assert off.submit(add, 40, 2).result(timeout=30) == 42
        assert off.status(timeout=2)["workers"] == {f"seed003@{HOST}": "OK"}
    finally:
        off.stop()


def test_an_offload_plus_redis_url_runs_tasks(tmp_path, monkeypatch):
    require_service("redis")
    from offload import Offload
    from testapp import add

    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    settings = local_settings("plusredis", OFFLOAD_DATA_DIR=str(tmp_path))
    settings["CELERY_BROKER_URL"] = "offload+" + settings["CELERY_BROKER_URL"]
    off = Offload(settings)
    off.workers.app_spec = "testapp.routed:off"
    off.start()
    try:
        assert off.submit(add, 1, 2).result(timeout=30) == 3
        assert type(off.celery.connection_for_write().transport).__module__ == "offload.transport.redis"
        # The worker's banner: no password mask where there is no password.
        log = off.workers.log_path("worker1").read_text()
        assert "Connected to offload-redis://127.0.0.1:6379/" in log and ":**@" not in log
    finally:
        off.stop()


def test_a_schedule_the_module_builds_travels_by_the_workers_own_import(tmp_path, monkeypatch):
    """periodic.md's app: a ``crontab`` in ``CELERY_BEAT_SCHEDULE``, given to
    the module-level ``Offload(...)``, is not JSON, but the worker's import
    of the module builds it the same: ``start()`` warns of nothing, and the
    worker holds the schedule."""
    require_service("redis")
    name = f"periodic_{test_id().replace('-', '_')}"
    settings = local_settings(name, OFFLOAD_DATA_DIR=str(tmp_path / "data"), OFFLOAD_ALLOW=[name],
                              CELERY_WORKERS=["solo"])
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f'''
        from celery.schedules import crontab

        from offload import Offload

        off = Offload({{**{settings!r},
                       "CELERY_BEAT_SCHEDULE": {{"nightly": {{"task": "{name}.report",
                                                              "schedule": crontab(hour=3, minute=0)}}}}}})


        @off.task(name="{name}.report")
        def report():
            return "report"


        def nightly_schedule():
            return repr(off.celery.conf.beat_schedule["nightly"]["schedule"])
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = __import__(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module.off.start()
        assert module.off.submit(module.nightly_schedule).result(timeout=60) == "<crontab: 0 3 * * * (m/h/dM/MY/d)>"
    finally:
        module.off.stop()
        sys.modules.pop(name, None)
