"""Two local workers where only ``bar`` consumes the ``bar-only`` queue."""

from offload import Offload
from testapp import test_id
from testapp.local import local_settings

BAR_ONLY = f"bar-only-{test_id()}"
DEFAULT = f"offload-routed-{test_id()}"

off = Offload(local_settings("routed", CELERY_WORKERS={
    "foo": {"concurrency": 1},
    "bar": {"concurrency": 1, "log-level": "info", "queues": [DEFAULT, BAR_ONLY]},
}))
celery = off.celery
