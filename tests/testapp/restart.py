"""An app on a broker of the test's own (``OFFLOAD_TEST_RESTART_BROKER``), which
the broker-restart tests kill and start again; its results go to
``OFFLOAD_TEST_RESTART_BACKEND`` (default: the broker), and
``OFFLOAD_TEST_RESTART_TRANSPORT`` picks kombu's transport for a Redis URL."""

from __future__ import annotations

import os

from testapp import Offload, settings, test_id

BROKER = os.environ.get("OFFLOAD_TEST_RESTART_BROKER", "redis://127.0.0.1:1/0")
BACKEND = os.environ.get("OFFLOAD_TEST_RESTART_BACKEND") or BROKER.replace("offload-redis://", "redis://")

config = {**settings("embedded"), "CELERY_BROKER_URL": BROKER, "CELERY_RESULT_BACKEND": BACKEND,
          "CELERY_TASK_DEFAULT_QUEUE": f"offload-restart-{test_id()}"}
if os.environ.get("OFFLOAD_TEST_RESTART_TRANSPORT"):  # "redis": kombu's own Redis transport
    config["CELERY_BROKER_TRANSPORT"] = os.environ["OFFLOAD_TEST_RESTART_TRANSPORT"]
off = Offload(config)
celery = off.celery
