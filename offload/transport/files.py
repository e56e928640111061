"""Folders and files under ``OFFLOAD_DATA_DIR``, readable by their owner only.

The broker's and the results' sqlite files hold every task's arguments and
results, and the worker logs their tracebacks: other users of the machine
have no business reading them. Modes are given at creation (``os.mkdir``,
``os.open``), which the process umask can only narrow, instead of changing
the umask, which is process-wide and would race with other threads.
Existing folders and files are left as their owner made them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_FOLDER_NAME", "FILE_MODE", "FOLDER_MODE", "create_private_file", "fallback_data_dir",
           "make_private_dirs", "private_opener"]

#: The data folder's name where nothing names one (as Flask's instance folder).
DEFAULT_FOLDER_NAME = "instance"

#: Mode of the folders offload creates.
FOLDER_MODE = 0o700
#: Mode of the files offload creates.
FILE_MODE = 0o600


def fallback_data_dir() -> str:
    """``./instance``: the data folder when neither ``OFFLOAD_DATA_DIR`` nor the app names one."""
    return os.path.join(os.getcwd(), DEFAULT_FOLDER_NAME)


def make_private_dirs(path: str | os.PathLike[str]) -> None:
    """Create ``path`` and its missing parents, each owner-only (like ``os.makedirs``).

    >>> import tempfile, stat
    >>> root = tempfile.mkdtemp()
    >>> make_private_dirs(os.path.join(root, "a", "b"))
    >>> oct(stat.S_IMODE(os.stat(os.path.join(root, "a")).st_mode))
    '0o700'
    """
    folder = Path(os.path.abspath(path))
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:  # made meanwhile by another process
            pass


def private_opener(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open` that creates the file owner-only."""
    return os.open(path, flags, FILE_MODE)


def create_private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` empty and owner-only unless it exists (then leave it as is)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
