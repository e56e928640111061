"""Folders and files under ``OFFLOAD_DATA_DIR``, readable by their owner only.

The functions live in :mod:`offload.transport.files`, so that the embedded
transport, a plain kombu plugin, needs nothing of offload outside
``offload.transport``; they are re-exported here under their public names.
"""

from __future__ import annotations

from .transport.files import (DEFAULT_FOLDER_NAME, FILE_MODE, FOLDER_MODE, create_private_file, fallback_data_dir,
                              make_private_dirs, private_opener)

__all__ = ["DEFAULT_FOLDER_NAME", "FILE_MODE", "FOLDER_MODE", "create_private_file", "fallback_data_dir",
           "make_private_dirs", "private_opener"]
