"""An app whose broker URL carries a password, on a port where nothing listens."""

import os

from offload import Offload

PASSWORD = "s3cr3t-pw"

off = Offload({
    "CELERY_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:1/0",
    "CELERY_RESULT_BACKEND": f"redis://:{PASSWORD}@127.0.0.1:1/0",
    "OFFLOAD_DATA_DIR": os.path.join(os.environ.get("OFFLOAD_TEST_DATA_DIR", "/tmp/offload-tests"), "secret"),
})
