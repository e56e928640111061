"""The app's extensions, created unbound and given the app in ``create_app``.

``off`` plays the part of the seed's ``celery`` object: ``off.submit``,
``off.map``, ``@off.task``, ``off.status()``.
"""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from offload import Offload

off = Offload()
db = SQLAlchemy()


class Note(db.Model):
    """A line of text, written by a task and read by a view."""

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]
