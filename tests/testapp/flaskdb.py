"""Flask-SQLAlchemy in tasks, on the database ``OFFLOAD_TEST_FLASK_DB`` names.

The app factory configures the module-level ``off`` and ``db``; local workers
build the app with it too. The table is named per test run, so that runs
sharing the PostgreSQL database keep their rows apart.
"""

from __future__ import annotations

import os

from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from offload import Offload
from testapp import test_id
from testapp.local import local_settings

off = Offload({"OFFLOAD_DATA_DIR": local_settings("flaskdb")["OFFLOAD_DATA_DIR"]})
db = SQLAlchemy()
TABLE = "offload_flask_rows_" + "".join(c if c.isalnum() else "_" for c in test_id())


class Row(db.Model):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(local_settings(
        "flaskdb", CELERY_WORKERS={"db": {"concurrency": 2}},
        SQLALCHEMY_DATABASE_URI=os.environ["OFFLOAD_TEST_FLASK_DB"]))
    off.init_app(app)
    db.init_app(app)
    with app.app_context():
        db.create_all()  # the worker's main process connects before it forks its pool
    return app


def add_row(text: str) -> dict:
    """Submitted: commit a row; what the worker sees afterwards."""
    db.session.add(Row(text=text))
    db.session.commit()
    return {"app": current_app.name, "rows": db.session.scalar(db.select(db.func.count(Row.id)))}


def leave_uncommitted(text: str) -> int:
    """Add and flush a row but never commit: the app context's teardown must roll it back."""
    db.session.add(Row(text=text))
    db.session.flush()
    return os.getpid()


@off.task(name="flaskdb.count_rows")
def count_rows(text: str | None = None) -> int:
    """Registered: rows (with ``text``, if given)."""
    query = db.select(db.func.count(Row.id))
    if text is not None:
        query = query.where(Row.text == text)
    return db.session.scalar(query)
