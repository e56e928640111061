"""An app on a broker of the test's own (``OFFLOAD_TEST_RESTART_BROKER``), which
the broker-restart tests kill and start again; its results go to
``OFFLOAD_TEST_RESTART_BACKEND`` (default: the broker). On Redis,
``OFFLOAD_TEST_RESTART_VISIBILITY`` sets the visibility timeout (seconds)."""

from __future__ import annotations

import os

from testapp import Offload, settings, test_id

BROKER = os.environ.get("OFFLOAD_TEST_RESTART_BROKER", "redis://127.0.0.1:1/0")
BACKEND = os.environ.get("OFFLOAD_TEST_RESTART_BACKEND") or BROKER.replace("offload-redis://", "redis://")

config = {**settings("embedded"), "CELERY_BROKER_URL": BROKER, "CELERY_RESULT_BACKEND": BACKEND,
          "CELERY_TASK_DEFAULT_QUEUE": f"offload-restart-{test_id()}"}
if os.environ.get("OFFLOAD_TEST_RESTART_VISIBILITY"):
    config["CELERY_BROKER_TRANSPORT_OPTIONS"] = {
        "visibility_timeout": int(os.environ["OFFLOAD_TEST_RESTART_VISIBILITY"])}
off = Offload(config)
celery = off.celery
