"""A local worker with a pool of two, started by the first submit (``CELERY_START_LOCAL_WORKERS``)."""

from offload import Offload
from testapp.local import local_settings

off = Offload(local_settings("respawn", CELERY_START_LOCAL_WORKERS=True,
                             CELERY_WORKERS={"respawn": {"concurrency": 2}}))
