"""``CELERY_START_LOCAL_WORKERS`` with a task every second, on the embedded broker.

The process that starts the local workers also starts the scheduler; each
run of ``tick`` appends this worker's pid to ``tick.runs`` in the data folder
(``OFFLOAD_LOCAL_DATA_DIR``).
"""

from __future__ import annotations

import os

from offload import Offload
from testapp.local import local_settings

_settings = local_settings("scheduled-local", CELERY_START_LOCAL_WORKERS=True,
                           CELERY_WORKERS={"ticker": {"concurrency": 1}})
del _settings["CELERY_BROKER_URL"]  # the embedded broker, in the data folder
off = Offload(_settings)


def noop() -> None:
    return None


@off.task(schedule=1.0, name="testapp.scheduled_local.tick")
def tick() -> None:
    with open(os.path.join(off.settings.data_dir, "tick.runs"), "a") as out:
        out.write(f"{os.getpid()}\n")
