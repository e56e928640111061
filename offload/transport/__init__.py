"""The embedded default broker and result backend, on sqlite.

With no broker configured, offload keeps its queue and its results in two
sqlite files under ``OFFLOAD_DATA_DIR``, so that a bare machine needs no
server (:mod:`offload.transport.sqlite`, :mod:`offload.transport.backend`).
Importing this package registers the ``sqlite://`` kombu transport; the
``sqlite://`` result backend is registered by the package's entry point.
"""

from __future__ import annotations

import os
from typing import Any

from kombu.transport import TRANSPORT_ALIASES

from ._sqlite import (DEFAULT_BROKER_FILE, DEFAULT_RESULTS_FILE, DatabaseLocked, SQLiteFileError, parse_url,
                      require_sqlite)

__all__ = ["REVOKED_BEFORE_START", "DatabaseLocked", "SQLiteFileError", "default_settings", "expand_sqlite_urls"]

#: The attribute a result store sets on a request whose STARTED store found the
#: task revoked; offload's task base then skips the run. The sqlite backend
#: sets it, and so does :class:`offload.result_store.OneCallStore` on Redis.
REVOKED_BEFORE_START = "offload_revoked_before_start"

# kombu resolves a URL's scheme through this table; `sqlite` is free in it.
TRANSPORT_ALIASES.setdefault("sqlite", "offload.transport.sqlite:Transport")
# `offload-redis://host:port/db`: Redis with the atomic take (offload.transport.redis).
TRANSPORT_ALIASES.setdefault("offload-redis", "offload.transport.redis:Transport")


def _file_url(path: str) -> str:
    return "sqlite:///" + os.path.abspath(path)


def default_settings(data_dir: str) -> dict[str, Any]:
    """Celery settings for the embedded broker and backend under ``data_dir``.

    Nothing is created here: the files (and ``data_dir``) appear when a
    producer or a worker first connects.
    """
    return {
        "broker_url": _file_url(os.path.join(data_dir, DEFAULT_BROKER_FILE)),
        "result_backend": _file_url(os.path.join(data_dir, DEFAULT_RESULTS_FILE)),
    }


def expand_sqlite_urls(celery_settings: dict[str, Any], data_dir: str) -> None:
    """Give a bare ``sqlite://`` broker or backend its file under ``data_dir``.

    Also checks every ``sqlite://`` URL, and the sqlite library itself, now,
    so that a malformed URL or too old a sqlite fails when the app is
    configured rather than at the first task.
    """
    if any(isinstance(celery_settings.get(key), str) and celery_settings[key].startswith("sqlite:")
           for key in ("broker_url", "result_backend")):
        require_sqlite()
    for key, default_file in (("broker_url", DEFAULT_BROKER_FILE),
                              ("result_backend", DEFAULT_RESULTS_FILE)):
        url = celery_settings.get(key)
        if isinstance(url, str) and url.startswith("sqlite:"):
            query = url.partition("?")[2]
            path = parse_url(url, default_file, data_dir)
            celery_settings[key] = _file_url(path) + (f"?{query}" if query else "")
    broker = celery_settings.get("broker_url")
    if isinstance(broker, str) and broker.startswith("sqlite:") and not celery_settings.get("result_backend"):
        # A sqlite broker without a backend: results go next to its file.
        folder = os.path.dirname(parse_url(broker, DEFAULT_BROKER_FILE, data_dir))
        celery_settings["result_backend"] = _file_url(os.path.join(folder, DEFAULT_RESULTS_FILE))
