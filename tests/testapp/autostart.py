"""``CELERY_START_LOCAL_WORKERS``: the first submit starts the worker."""

from offload import Offload
from testapp.local import local_settings

off = Offload(local_settings("autostart", CELERY_START_LOCAL_WORKERS=True, CELERY_WORKERS=1))
