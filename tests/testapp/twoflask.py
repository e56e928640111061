"""Two Flask apps in one module, each with its own Offload on its own broker.

``app_embedded`` runs on the embedded broker, ``app_redis`` on Redis; each
has its own workers (started with ``off.start()``) and its own tasks, some
under the same name.
"""

from __future__ import annotations

from flask import Flask, current_app

from offload import Offload
from testapp.local import local_settings

app_embedded = Flask(__name__)
_embedded = local_settings("twoflask-embedded", CELERY_WORKERS=["embedded"], WHO="embedded")
del _embedded["CELERY_BROKER_URL"]  # nothing configured: the embedded broker
app_embedded.config.update(_embedded)

app_redis = Flask(__name__)
app_redis.config.update(local_settings("twoflask-redis", CELERY_WORKERS=["redis"], WHO="redis"))

off_embedded = Offload(app_embedded)
off_redis = Offload(app_redis)


def who() -> str:
    """A plain submitted function: which app's context it runs in."""
    return current_app.config["WHO"]


@off_embedded.task(name="twoflask.which")
def which_embedded() -> list[str]:
    return ["which_embedded", current_app.config["WHO"]]


@off_redis.task(name="twoflask.which")
def which_redis() -> list[str]:
    return ["which_redis", current_app.config["WHO"]]


@off_redis.task(name="twoflask.redis_only")
def redis_only() -> str:
    return current_app.config["WHO"]
