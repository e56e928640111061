"""Attributes whose lookup runs code: resolving a reference must never trigger them.

Each leaves a marker file in ``$OFFLOAD_TEST_DATA_DIR`` when it runs.
"""

from __future__ import annotations

import os


def marker(what: str) -> str:
    return os.path.join(os.environ.get("OFFLOAD_TEST_DATA_DIR", "/tmp/offload-tests"), f"magic-{what}-ran")


def __getattr__(name):
    if not name.startswith("_"):
        open(marker(name), "w").close()
    raise AttributeError(name)


class Config:
    @property
    def secret(self):
        open(marker("property"), "w").close()
        return os.getcwd


config = Config()
