"""An app factory that makes a new Offload for each app (no module-level Offload).

``offload --app testapp.flaskfactory:create_app worker`` and ``flask --app
testapp.flaskfactory:create_app offload worker`` both build the app the way
the web process does and find its Offload in ``app.extensions``.
"""

from __future__ import annotations

from flask import Flask, current_app

from offload import Offload
from testapp.local import local_settings


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(local_settings("flaskfactory", WHO="made by create_app"))
    off = Offload(app)

    @off.task(name="flaskfactory.greet")
    def greet(name: str) -> str:
        return f"hello {name} from {current_app.config['WHO']}"

    return app


def who() -> str:
    return current_app.config["WHO"]
