"""A Flask app factory whose Offload is created at import and configured in the factory.

A worker process cannot use the bare module-level ``off`` (it has no
config yet): it has to call ``create_app()``, which offload's local workers
and ``flask offload ...`` both work out by themselves.
"""

from __future__ import annotations

from flask import Flask

from offload import Offload
from testapp.local import local_settings

# Only a data folder until the factory configures it (so that importing
# this module writes nothing into the source tree).
off = Offload({"OFFLOAD_DATA_DIR": local_settings("flaskapp")["OFFLOAD_DATA_DIR"]})


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(local_settings("flaskapp", CELERY_WORKERS=["web"]))
    off.init_app(app)
    return app


def app_name() -> str:
    """Runs on a worker inside the app context."""
    from flask import current_app

    return current_app.name
