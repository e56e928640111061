"""Settings for the test apps that run local workers (``named``, ``routed``).

Each pytest-xdist process gets its own Redis database (8 and up, clear of
``testapp.settings``), queues and control exchange, so that pings reach only
its own workers. ``OFFLOAD_LOCAL_DATA_DIR`` points a test at its own data
folder (logs and the starter lock).
"""

from __future__ import annotations

import os

from testapp import test_id, xdist_index


def local_settings(kind: str, **extra: object) -> dict:
    wid = test_id()
    index = xdist_index()
    base = os.environ.get("OFFLOAD_TEST_DATA_DIR", "/tmp/offload-tests")
    settings = {
        "CELERY_BROKER_URL": f"redis://127.0.0.1:6379/{8 + index % 8}",
        "CELERY_TASK_DEFAULT_QUEUE": f"offload-{kind}-{wid}",
        "CELERY_CONTROL_EXCHANGE": f"offload-{kind}-{wid}",
        "CELERY_EVENT_EXCHANGE": f"offload-{kind}-ev-{wid}",
        "OFFLOAD_DATA_DIR": os.environ.get("OFFLOAD_LOCAL_DATA_DIR") or os.path.join(base, wid, kind),
        "OFFLOAD_ALLOW": ["testapp"],
    }
    settings.update(extra)
    return settings
