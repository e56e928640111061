"""An app on the embedded broker in ``$OFFLOAD_PRIVATE_DATA_DIR`` (a folder a test makes fresh)."""

from __future__ import annotations

import os

from offload import Offload


def private_settings() -> dict:
    return {
        "OFFLOAD_DATA_DIR": os.environ["OFFLOAD_PRIVATE_DATA_DIR"],
        "CELERY_WORKERS": {"private": {"concurrency": 1}},
        "OFFLOAD_ALLOW": ["testapp"],
    }


off = Offload(private_settings()) if os.environ.get("OFFLOAD_PRIVATE_DATA_DIR") else None
