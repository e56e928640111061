"""Reports that could not reach the broker wait here, on disk, until it answers.

One JSON file per report in a folder under ``OFFLOAD_DATA_DIR``; several
processes (web processes, workers) may write and drain the same folder. A
file is claimed by renaming it, which only one process can do, so a report is
re-sent once even when two processes drain at the same time. The folder is
bounded: past ``max_reports`` files the oldest are deleted, each with a log line.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Spool"]

logger = logging.getLogger("offload.errors")

_SUFFIX = ".json"
_CLAIMED = ".claimed"


class Spool:
    """A bounded folder of reports waiting for the broker."""

    def __init__(self, folder: str, max_reports: int = 1000) -> None:
        if max_reports < 1:
            raise ValueError(f"the spool must hold at least one report, got max_reports={max_reports}")
        self.folder = folder
        self.max_reports = max_reports

    def __repr__(self) -> str:
        return f"<Spool {self.folder} ({len(self)} waiting)>"

    def _names(self) -> list[str]:
        try:
            names = [n for n in os.listdir(self.folder) if n.endswith(_SUFFIX)]
        except FileNotFoundError:
            return []
        # Names start with a zero-padded nanosecond time: sorted is oldest first.
        return sorted(names)

    def __len__(self) -> int:
        return len(self._names())

    def put(self, report: Mapping[str, Any]) -> None:
        """Write one report (atomically: a reader never sees half a file)."""
        os.makedirs(self.folder, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = os.path.join(self.folder, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(report, fh)
        os.replace(tmp, os.path.join(self.folder, name + _SUFFIX))
        self._trim()

    def _trim(self) -> None:
        names = self._names()
        for name in names[: max(0, len(names) - self.max_reports)]:
            report = self._take(name)
            if report is not None:
                logger.warning("error spool full (%d reports): dropped the oldest, %r",
                               self.max_reports, report.get("description"))

    def _take(self, name: str) -> dict[str, Any] | None:
        """Claim and read one file; None if another process took it first."""
        path = os.path.join(self.folder, name)
        claimed = f"{path}{_CLAIMED}-{os.getpid()}"
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None
        try:
            with open(claimed, encoding="utf-8") as fh:
                report = json.load(fh)
        except (OSError, ValueError, RecursionError) as exc:  # a damaged or hand-made file
            logger.warning("error spool: dropped unreadable %s (%s)", name, exc)
            report = None
        os.unlink(claimed)
        return report if isinstance(report, dict) else None

    def drain(self, send: Callable[[dict[str, Any]], None]) -> int:
        """Hand each waiting report to ``send``, oldest first; the count sent.

        A report whose ``send`` raises is written back and draining stops
        (the broker is still away: the next drain tries again).
        """
        sent = 0
        for name in self._names():
            report = self._take(name)
            if report is None:
                continue
            try:
                send(report)
            except Exception:
                self.put(report)
                raise
            sent += 1
        return sent
