"""The embedded default broker and result backend.

With no broker configured, offload keeps its queue and results in files under
``OFFLOAD_DATA_DIR`` so that a bare machine needs no server.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["default_settings"]


def default_settings(data_dir: str) -> dict[str, Any]:
    """Celery settings for the embedded broker and backend under ``data_dir``."""
    queue_dir = os.path.join(data_dir, "queue")
    results_dir = os.path.join(data_dir, "results")
    for path in (queue_dir, results_dir):
        os.makedirs(path, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": queue_dir,
            "data_folder_out": queue_dir,
            "store_processed": False,
        },
        "result_backend": f"file://{results_dir}",
    }
