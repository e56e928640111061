"""Seed 002's named workers: ``CELERY_WORKERS = ["foo", "bar"]`` on Redis."""

from offload import Offload
from testapp.local import local_settings

off = Offload(local_settings("named", CELERY_WORKERS=["foo", "bar"]))
