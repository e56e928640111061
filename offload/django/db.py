"""Database connections and transactions, as Django's request cycle has them."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["close_old_connections", "on_commit"]


def close_old_connections() -> None:
    """Close the connections that are unusable or past ``CONN_MAX_AGE``.

    What Django does when a request starts and when it ends
    (``django.db.close_old_connections``); a task is a request here. Queries
    kept by ``DEBUG`` are dropped too (``reset_queries``), as for a request.
    """
    from django import db

    db.reset_queries()
    db.close_old_connections()


def on_commit(send: Callable[[], None]) -> bool:
    """The commit hook of ``off.submit(..., on_commit=True)``: Django's ``transaction.on_commit``.

    Inside ``atomic()`` the message leaves after the outermost block
    commits, and never if it rolls back; outside one, at once (Django runs
    the callback immediately in autocommit mode). ``robust``: a broker
    that fails at that moment is logged by Django and does not undo the
    request's other commit callbacks (the future gets the error).
    """
    from django.db import transaction

    transaction.on_commit(send, robust=True)
    return True
