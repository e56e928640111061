"""A Pyramid app with registered tasks, a request property and SQLAlchemy
under pyramid_tm (a SQLite file and the local PostgreSQL).

Its worker is ``celery -A testapp.pyramidtasks worker`` (``celery`` below is
``configure().make_celery_app()``); settings come from the environment so the
test process and the worker agree on them.
"""

from __future__ import annotations

import os

import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.threadlocal import get_current_request
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine
from sqlalchemy.orm import sessionmaker

from testapp import test_id

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

metadata = MetaData()
notes = Table(f"offload_pyramid_notes_{test_id().replace('-', '_')}", metadata,
              Column("id", Integer, primary_key=True), Column("text", String(200), nullable=False))


def settings() -> dict:
    wid = test_id()
    data_dir = os.path.join(os.environ.get("OFFLOAD_TEST_DATA_DIR", "/tmp/offload-tests"), wid, "pyramidtasks")
    return {
        "celery.task_default_queue": f"offload-pyramid-{wid}",
        "celery.control_exchange": f"offload-pyramid-{wid}",
        "celery.worker_prefetch_multiplier": "1",
        "offload.data_dir": data_dir,
        "offload.allow": "testapp",
        "greeting": "hello from the registry",
        "sqlite.url": f"sqlite:///{os.path.join(data_dir, 'notes.sqlite3')}",
        "postgres.url": POSTGRES_URL,
    }


def configure(extra: dict | None = None) -> Configurator:
    config = Configurator(settings={**settings(), **(extra or {})})
    config.include("pyramid_tm")
    config.include("offload.pyramid")
    greeting = config.get_settings()["greeting"]
    config.add_request_method(lambda request: greeting, "greeting", property=True)
    factories = {}
    for kind in ("sqlite", "postgres"):
        url = config.get_settings()[f"{kind}.url"]
        if kind == "sqlite":
            os.makedirs(os.path.dirname(url[len("sqlite:///"):]), exist_ok=True)
        factories[kind] = sessionmaker(bind=create_engine(url))

    def db(request, kind):
        """A session of request.tm's transaction (as a cookiecutter app's dbsession)."""
        session = factories[kind]()
        zope.sqlalchemy.register(session, transaction_manager=request.tm)
        return session

    config.add_request_method(db, "db")
    config.register_task(describe)
    config.register_task(add_note)
    config.register_task(add_note_then_fail)
    config.register_task(count_notes)
    config.register_task(add, name="testapp.pyramid.add")
    config.register_task(heartbeat, schedule=1.0)
    return config


def create_tables(kinds: tuple[str, ...] = ("sqlite", "postgres")) -> None:
    for kind in kinds:
        url = settings()[f"{kind}.url"]
        if kind == "sqlite":
            os.makedirs(os.path.dirname(url[len("sqlite:///"):]), exist_ok=True)
        engine = create_engine(url)
        metadata.drop_all(engine)
        metadata.create_all(engine)
        engine.dispose()


def describe(request, label="x"):
    """What a task's request looks like on the worker."""
    return {
        "label": label,
        "greeting": request.greeting,
        "url": request.url,
        "GET": dict(request.GET),
        "current": get_current_request() is request,
        "setting": request.registry.settings["greeting"],
        "tm_active": request.environ.get("tm.active", False),
    }


def _insert(request, kind, text):
    session = request.db(kind)
    session.execute(notes.insert().values(text=text))
    zope.sqlalchemy.mark_changed(session)  # Core SQL, not the ORM: say the session wrote


def add_note(request, kind, text):
    _insert(request, kind, text)
    return text


def add_note_then_fail(request, kind, text):
    _insert(request, kind, text)
    raise RuntimeError(f"failed after writing {text!r}")


def count_notes(request, kind, text):
    return request.db(kind).execute(notes.select().where(notes.c.text == text)).fetchall().__len__()


def heartbeat(request):
    """Runs every second while a scheduler runs (offload --app <ini> beat)."""
    _insert(request, "sqlite", "heartbeat")


def add(request, x, y):
    return x + y


def plain_greeting():
    """A plain function sent with request.submit(): the Pyramid request is current."""
    return get_current_request().greeting


def main(global_config, **settings):
    return configure(settings).make_wsgi_app()


celery = configure().make_celery_app()
