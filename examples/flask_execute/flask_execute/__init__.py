"""Seed 002 (Flask-Execute) as a Flask app on offload.

``create_app()`` builds the app from ``DevConfig`` and ``FLASK_*`` environment
variables (``FLASK_CELERY_BROKER_URL``, ``FLASK_SQLALCHEMY_DATABASE_URI``,
...). With ``CELERY_START_LOCAL_WORKERS`` the first submit starts the workers
``CELERY_WORKERS`` names, which build the app with this same factory.

    flask --app flask_execute run
"""

from __future__ import annotations

import collections
import uuid
from typing import Any

from flask import Flask, abort, current_app, jsonify, request

from offload import Future

from .extensions import Note, db, off
from .tasks import add, count_notes, crunch, save_note

__all__ = ["DevConfig", "create_app"]


class DevConfig:
    """Seed 002's development config: workers start on the first submit."""

    CELERY_START_LOCAL_WORKERS = True
    # Named workers with options of their own; `foo` also takes the default queue.
    CELERY_WORKERS = {
        "foo": {"concurrency": 2, "loglevel": "info", "queues": ["celery", "high-priority"]},
        "bar": {"concurrency": 1, "loglevel": "info", "queues": ["low-priority"]},
    }
    CELERY_QUEUES = ["low-priority", "high-priority"]
    # A relative SQLite path lives in the app's instance folder.
    SQLALCHEMY_DATABASE_URI = "sqlite:///flask_execute.sqlite3"


def create_app(config: object = DevConfig) -> Flask:
    """The app factory, for ``flask --app flask_execute run`` and for the workers."""
    app = Flask(__name__)
    app.config.from_object(config)
    app.config.from_prefixed_env()  # FLASK_CELERY_BROKER_URL=redis://... and so on
    off.init_app(app)
    db.init_app(app)
    with app.app_context():
        db.create_all()
    # What add_done_callback saw finish, newest last (per app, not global).
    app.extensions["flask_execute.finished"] = collections.deque(maxlen=100)
    _add_views(app)
    return app


def _int_arg(name: str, default: int | None = None) -> int:
    value = request.args.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        abort(400, f"`{name}` must be an integer.")


def _future(task_id: str) -> Future:
    """The future of a task id that came from the client: 400 if it is not one."""
    try:
        uuid.UUID(task_id)
        return off.get(task_id)
    except ValueError:
        abort(400, "not a task id (task ids look like 'c7f6a7c5-897b-4c01-89b4-e1cc3f2a30d5').")


def _describe(future: Future) -> dict[str, Any]:
    """The task's state as the result backend has it now.

    A future made this moment by ``off.get`` learns its state from offload's
    result watcher a moment later; a view that answers at once reads the
    snapshot from the future's Celery ``AsyncResult``.
    """
    snapshot = future.async_result
    state = snapshot.state
    answer: dict[str, Any] = {"id": future.id, "state": state}
    if state == "PROGRESS":
        answer["progress"] = snapshot.info
    elif state == "SUCCESS":
        answer["result"] = snapshot.result
    elif state == "FAILURE":
        answer["error"] = f"{type(snapshot.result).__name__}: {snapshot.result}"
    return answer


def _add_views(app: Flask) -> None:
    finished = app.extensions["flask_execute.finished"]

    def remember(future: Future) -> None:
        # A done callback runs in offload's result thread, outside any request.
        finished.append(future.id)

    @app.post("/add")
    def submit_add():
        """Submitting Task to Workers: ``off.submit(add, x, y)``, optionally to a queue."""
        x, y = _int_arg("x"), _int_arg("y")
        queue = request.args.get("queue")
        if queue is not None and queue not in current_app.config["CELERY_QUEUES"]:
            abort(400, f"`queue` must be one of {current_app.config['CELERY_QUEUES']}.")
        future = off.submit(add, x, y=y, queue=queue) if queue else off.submit(add, x, y=y)
        future.add_done_callback(remember)
        return {"id": future.id}, 202

    @app.get("/map")
    def map_add():
        """``off.map(add, [[1, 2], [3, 4]])``, waiting for every result."""
        try:
            pairs = [[int(n) for n in pair.split(",")] for pair in request.args["pairs"].split(";")]
        except (KeyError, ValueError):
            abort(400, "`pairs` must look like 1,2;3,4")
        if any(len(pair) != 2 for pair in pairs) or len(pairs) > 100:
            abort(400, "`pairs` takes up to 100 pairs of two integers, like 1,2;3,4")
        futures = off.map(add, iter(pairs))
        return {"results": [future.result(timeout=30) for future in futures]}

    @app.post("/crunch")
    def submit_crunch():
        """Status Updates: the task's state is PROGRESS while it runs."""
        steps = _int_arg("steps", 5)
        if not 0 < steps <= 100:
            abort(400, "`steps` must be between 1 and 100.")
        return {"id": off.submit(crunch, steps).id}, 202

    @app.post("/notes")
    def submit_note():
        text = request.form.get("text", "").strip()
        if not text or len(text) > 1000:
            abort(400, "`text` must be 1 to 1000 characters.")
        return {"id": off.submit(save_note, text).id}, 202

    @app.get("/notes")
    def list_notes():
        return {"notes": db.session.scalars(db.select(Note.text).order_by(Note.id)).all()}

    @app.post("/notes/count")
    def submit_count():
        """A registered task, sent the declarative way: ``count_notes.delay()``."""
        return {"id": count_notes.delay().id}, 202

    @app.get("/tasks/<task_id>")
    def task_state(task_id: str):
        """Working with Futures: a future for the id, its state and result."""
        return _describe(_future(task_id))

    @app.delete("/tasks/<task_id>")
    def cancel_task(task_id: str):
        future = _future(task_id)
        return {"id": future.id, "cancelled": future.cancel()}

    @app.get("/finished")
    def finished_tasks():
        """Ids that ``add_done_callback`` saw finish, in this web process."""
        return {"ids": list(finished)}

    @app.get("/status")
    def worker_status():
        return jsonify(off.status())

    @app.errorhandler(400)
    def bad_request(error):
        return {"error": error.description}, 400
