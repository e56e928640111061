"""An app whose CELERY_ROUTES sends testapp.whoami to a queue of its own."""

from testapp import Offload, settings, test_id

ROUTED_QUEUE = f"offload-routes-{test_id()}"

off = Offload({
    **settings("redis"),
    "CELERY_QUEUES": [ROUTED_QUEUE],
    "CELERY_ROUTES": {"testapp.whoami": {"queue": ROUTED_QUEUE}},
})
celery = off.celery
