"""The functions the views hand to workers.

Plain functions need no registration (``off.submit(add, 1, 2)``); ``count_notes``
is registered the declarative way (``@off.task``, then ``.delay()``). Each runs
on a worker inside the app context: ``current_app`` and ``db.session`` work as
they do in a view.
"""

from __future__ import annotations

import time

from flask import current_app

from offload import current_task

from .extensions import Note, db, off


def add(x: int, y: int) -> int:
    """Seed 002's ``add``."""
    return x + y


def crunch(steps: int, pause: float = 0.5) -> int:
    """Seed 002's "Status Updates": the task reports its state as it goes."""
    for step in range(1, steps + 1):
        current_task.update_state(state="PROGRESS", meta={"step": step, "steps": steps})
        time.sleep(pause)  # the work being done
    return steps


def save_note(text: str) -> dict:
    """Write a row and commit it; the view that lists notes sees it afterwards."""
    db.session.add(Note(text=text))
    db.session.commit()
    texts = db.session.scalars(db.select(Note.text).order_by(Note.id)).all()
    return {"app": current_app.name, "notes": list(texts)}


@off.task
def count_notes() -> int:
    """A registered task: ``count_notes.delay()`` returns Celery's AsyncResult."""
    return db.session.scalar(db.select(db.func.count(Note.id)))
