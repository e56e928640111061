"""Flask integration: settings from ``app.config``, tasks in the app context.

Examples:
    >>> from flask import Flask
    >>> from offload import Offload
    >>> app = Flask("myapp")
    >>> app.config["CELERY_ALWAYS_EAGER"] = True
    >>> off = Offload()
    >>> off.init_app(app)            # or Offload(app)
    >>> offload_of(app) is off
    True

Each Flask app keeps its state where Flask's extension guide has it, in
``app.extensions["offload"]`` (the Offload it was given to); nothing is kept
in module globals, and nothing Flask-specific on the Offload (which knows
the app only through the framework-neutral ``off.app_hooks`` below). One
Offload may be given to several apps (an app factory called again, in
tests): each finds it in its own ``extensions``, and the app given last is
the one whose settings the Offload reads, whose context tasks run in, and
which local workers build again.

What the core must know of that app it gets as :class:`offload.frameworks.AppHooks`
(``off.app_hooks``), kept here: how a worker process builds the same app
(the module attribute holding it, ``FLASK_APP``, or the module's
``create_app``/``make_app`` factory), and how a worker applies the settings
of the process that started it through ``app.config``.

Flask-SQLAlchemy works in tasks as in views: a task runs inside an app
context, whose teardown removes the session (Flask-SQLAlchemy's own
``teardown_appcontext``), and each pool process of a worker starts with
fresh connections: the pool the worker's main process filled (a
``db.create_all()`` in the factory) is dropped, not shared across a fork.

Nothing here imports Flask. An app is recognised by its shape, in
:mod:`offload.frameworks` (re-exported here), so that ``offload.core`` and the
CLI can ask :func:`is_flask_app` without Flask installed and without
importing this integration.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection, Mapping
from typing import Any

from .config import is_setting
from .frameworks import EXTENSION_KEY, FACTORY_NAMES, is_flask_app, offload_of
from .interface import OffloadLike

logger = logging.getLogger(__name__)

__all__ = ["EXTENSION_KEY", "FlaskHooks", "dispose_inherited_engines", "init_app", "is_flask_app", "offload_of"]


def init_app(off: OffloadLike, app: Any) -> None:
    """Configure ``off`` from ``app.config``; tasks then run in ``app``'s context.

    The data folder defaults to the app's ``instance_path``. Given another
    app before, ``off`` moves to this one (see the module's docstring).

    Raises:
        TypeError: when ``app`` is not a Flask app.
        ConfigurationError: for a setting offload cannot use.
    """
    if not is_flask_app(app) or not isinstance(app.config, Mapping):
        raise TypeError(f"init_app() takes a Flask app (with a .config mapping), got {app!r}")
    off.configure(app.config, default_data_dir=getattr(app, "instance_path", None))
    previous = off.app_hooks
    if isinstance(previous, FlaskHooks) and previous.app is not app:
        off.remove_task_context(previous.app.app_context)
    app.extensions[EXTENSION_KEY] = off
    off.app_hooks = FlaskHooks(off, app)
    off.add_task_context(app.app_context)
    off.add_commit_hook(_after_commit_of_session)
    _after_fork_in_pool(off)


class FlaskHooks:
    """What the core may ask of the Flask app an Offload was last given (:class:`offload.frameworks.AppHooks`)."""

    def __init__(self, off: OffloadLike, app: Any) -> None:
        self.off = off
        #: The Flask app; the tasks' app context is this app's.
        self.app = app

    def __repr__(self) -> str:
        return f"<FlaskHooks {self.app!r}>"

    def worker_spec(self) -> tuple[str, list[str]] | None:
        """The module attribute holding the app, else ``FLASK_APP``, else the module's factory.

        A worker must build this app (its settings, its extensions, the
        context its tasks run in), not just import a bare Offload.
        """
        from .workers import importable_spec, module_attr_holding

        module_name = getattr(self.app, "import_name", "")
        attr = module_attr_holding(module_name, self.app)
        if attr:
            return importable_spec(module_name, attr)
        if os.environ.get("FLASK_APP", "").strip():
            return os.environ["FLASK_APP"].strip(), []
        module = sys.modules.get(module_name)
        for factory in FACTORY_NAMES:
            if callable(getattr(module, factory, None)):
                return importable_spec(module_name, factory)
        return None

    def reconfigure(self, settings: Mapping[str, Any], kept: Collection[str]) -> None:
        """Put the starter's settings in ``app.config`` and read them again.

        So that ``current_app.config`` in a task reads what the starting
        script set, not only what the factory did.
        """
        config = self.app.config
        for key in [k for k in config if isinstance(k, str) and is_setting(k)]:
            if key not in settings and key not in kept:
                del config[key]
        config.update(settings)
        init_app(self.off, self.app)


def _after_commit_of_session(send: Any) -> bool:
    """``submit(..., on_commit=True)`` with Flask-SQLAlchemy: send once ``db.session`` commits.

    Inside an app context whose session is in a transaction (or holds
    unflushed changes), the message leaves after the session's next commit,
    and not at all if it rolls back first; otherwise the hook declines and
    the task leaves at once.
    """
    try:
        from flask import current_app, has_app_context
    except ImportError:
        return False
    if not has_app_context():
        return False
    extension = current_app.extensions.get("sqlalchemy")
    if extension is None:
        return False
    session = extension.session()
    if not (session.in_transaction() or session.new or session.dirty or session.deleted):
        return False
    from sqlalchemy import event

    # Whichever comes first decides; the other listener, left for its next
    # event (SQLAlchemy cannot remove a listener while it dispatches), does nothing.
    decided: list[bool] = []

    def committed(_session: Any) -> None:
        if not decided:
            decided.append(True)
            send()

    def rolled_back(_session: Any, previous: Any) -> None:
        if not decided and not previous.nested:  # a savepoint's rollback leaves the transaction open
            decided.append(False)

    event.listen(session, "after_commit", committed, once=True)
    event.listen(session, "after_soft_rollback", rolled_back)
    return True


def _after_fork_in_pool(off: OffloadLike) -> None:
    """In each new pool process of a worker, drop the app's inherited DB connections."""
    from celery.signals import worker_process_init

    def drop_inherited_connections(**_: Any) -> None:
        hooks = off.app_hooks
        if isinstance(hooks, FlaskHooks):
            dispose_inherited_engines(hooks.app)

    # One receiver per Offload however often init_app runs; it reads the
    # app the Offload was last given when the pool process starts.
    worker_process_init.connect(drop_inherited_connections, weak=False,
                                dispatch_uid=f"offload.flask.{id(off)}")


def dispose_inherited_engines(app: Any) -> None:
    """Forget the SQLAlchemy connections ``app`` holds, without closing them.

    For a forked child: the parent's connections stay the parent's (closing
    them here would close the parent's sockets); the child opens its own on
    first use. SQLAlchemy's documented way: ``engine.dispose(close=False)``.
    Does nothing when the app does not use Flask-SQLAlchemy.
    """
    extension = getattr(app, "extensions", {}).get("sqlalchemy")
    if extension is None:
        return
    try:
        with app.app_context():
            engines = list(getattr(extension, "engines", {}).values())
    except Exception:  # noqa: BLE001 (a worker must start even if this cannot be done)
        logger.exception("offload: could not list the SQLAlchemy engines of %r", app)
        return
    for engine in engines:
        engine.dispose(close=False)
