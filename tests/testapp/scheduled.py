"""An app with periodic tasks: ``tick`` every second by ``schedule=``, ``tock``
every second by ``CELERY_BEAT_SCHEDULE``. Each run appends a line to a file.

``OFFLOAD_TEST_SCHEDULED_BROKER`` (embedded or redis) picks the broker, so the
test, its worker and its schedulers agree on it.
"""

from __future__ import annotations

import os

from offload import Offload
from testapp import settings, test_id

KIND = os.environ.get("OFFLOAD_TEST_SCHEDULED_BROKER", "embedded")

_settings = settings(KIND)
_settings.update({
    "CELERY_TASK_DEFAULT_QUEUE": f"offload-scheduled-{KIND}-{test_id()}",
    "CELERY_CONTROL_EXCHANGE": f"offload-scheduled-{KIND}-{test_id()}",
    "OFFLOAD_DATA_DIR": os.path.join(_settings["OFFLOAD_DATA_DIR"], "scheduled"),
    "OFFLOAD_ALLOW": ["testapp"],
    "CELERY_WORKERS": {f"sched-{KIND}-{test_id()}": {"concurrency": 1}},
    "CELERY_BEAT_SCHEDULE": {"tock-every-second": {"task": "testapp.scheduled.tock", "schedule": 1.0}},
})
off = Offload(_settings)


def runs_file(name: str) -> str:
    return os.path.join(off.settings.data_dir, f"{name}.runs")


def _record(name: str) -> None:
    os.makedirs(off.settings.data_dir, exist_ok=True)
    with open(runs_file(name), "a") as out:
        out.write(f"{os.getpid()}\n")


@off.task(schedule=1.0, name="testapp.scheduled.tick")
def tick():
    _record("tick")


@off.task(name="testapp.scheduled.tock")
def tock():
    _record("tock")
