"""Error reporting for one Offload: its tasks, its sinks, its pipeline.

:func:`setup` registers two tasks on the Offload's Celery app,
``offload.errors.send`` (deliver a report to every sink, retrying with
backoff) and ``offload.errors.submit_error`` (the seed's
``submit_error.delay(description, extra)``). A worker started for the app
(``celery --app=myapp worker``, ``offload worker --app myapp``) imports the
module that called ``setup`` (or built an ``ErrorReporter``), so it knows both
tasks and the sinks. The same call connects Celery's ``task_failure`` signal
for this app only, and adds a worker step that re-sends spooled reports.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from celery import bootsteps
from celery.signals import task_failure, worker_process_shutdown

from ..dispatch import CHUNK_TASK, DISPATCH_TASK
from ..exceptions import ConfigurationError
from .pipeline import Pipeline
from .report import (FILTERED, REQUEST_KEYS, SECRET_HEADERS, SECRET_NAME_PARTS, ExcInfo, Scrubber,
                     build_report, fingerprint, now_iso)
from .sinks import Sink, SinkRefused
from .spool import Spool

__all__ = ["SEND_TASK", "SUBMIT_TASK", "ErrorReporting", "setup"]

logger = logging.getLogger("offload.errors")

SEND_TASK = "offload.errors.send"
"""The name of the task that delivers a report to the sinks."""
SUBMIT_TASK = "offload.errors.submit_error"
"""The name of the seed's task: ``submit_error.delay(description, extra)``."""


class OffloadLike(Protocol):
    """What error reporting uses of an :class:`offload.Offload`."""

    celery: Any
    settings: Any
    import_name: str

    def task(self, fn: Any = None, /, **options: Any) -> Any: ...


def _app_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name.partition(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


class ErrorReporting:
    """Reports of one Offload's errors, sent through its workers to ``sinks``.

    Made by :func:`setup` (or by ``ErrorReporter``); see there for the options.
    """

    def __init__(self, off: OffloadLike, sinks: Sequence[Sink], *, window: float = 2.0,
                 scrub: Iterable[str] = SECRET_NAME_PARTS, scrub_headers: Iterable[str] = SECRET_HEADERS,
                 mask_task_args: bool = False, task_failures: bool = True,
                 give_up_after: float = 3600.0, retry_delay: float = 1.0, max_retry_delay: float = 300.0,
                 spool_size: int = 1000, sweep_interval: float = 30.0, queue: str | None = None,
                 app_name: str | None = None, app_version: str | None = None) -> None:
        sinks = list(sinks)
        if not sinks:
            raise ConfigurationError("error reporting needs at least one sink, e.g. sinks=[Log()]")
        for sink in sinks:
            if not isinstance(sink, Sink):
                raise TypeError(f"a sink has a name and a send(report) method "
                                f"(FogBugz, Webhook, Log), got {sink!r}")
        for label, value in (("give_up_after", give_up_after), ("retry_delay", retry_delay),
                             ("max_retry_delay", max_retry_delay), ("sweep_interval", sweep_interval)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{label} is a number of seconds > 0, got {value!r}")
        self.off = off
        self.sinks = sinks
        self.scrubber = Scrubber(scrub, scrub_headers)
        self.mask_task_args = bool(mask_task_args)
        self.give_up_after = float(give_up_after)
        self.retry_delay = float(retry_delay)
        self.max_retry_delay = float(max_retry_delay)
        self.sweep_interval = float(sweep_interval)
        name = app_name or off.import_name
        if name == "__main__":
            name = os.path.splitext(os.path.basename(sys.argv[0] or "app"))[0]
        self.app = {"name": name, "version": app_version or _app_version(name)}
        self._spool_size = spool_size
        self.pipeline = Pipeline(self._publish, Spool(self.spool_folder, spool_size), window=window)
        reporting = self

        def send(report: dict[str, Any], sinks: list[int] | None = None,
                 started: float | None = None, attempt: int = 0) -> None:
            """Deliver one error report to every sink (or those at ``sinks``), retrying with backoff."""
            reporting._send(report, sinks, started, attempt)

        def submit_error(description: str, extra: str | None = None, **fields: Any) -> None:
            """Report ``description`` (and ``extra`` text) to every sink."""
            reporting._submit_error(description, extra, **fields)

        self.send_task = off.task(name=SEND_TASK, queue=queue, ignore_result=True)(send)
        #: The task users call themselves: ``submit_error.delay(description, extra)``.
        self.submit_error = off.task(name=SUBMIT_TASK, queue=queue, ignore_result=True)(submit_error)
        # The worker step and the signal find this object through the task.
        self.send_task.reporting = self
        if task_failures:
            task_failure.connect(self._on_task_failure, weak=False)
        # A pool process that ends (max_tasks_per_child, a warm shutdown)
        # leaves what is still inside its window in the spool, for the sweep.
        worker_process_shutdown.connect(self._on_process_shutdown, weak=False)
        off.celery.steps["worker"].add(SpoolSweep)

    def __repr__(self) -> str:
        return f"<ErrorReporting {self.app['name']} sinks={self.sinks!r}>"

    @property
    def spool_folder(self) -> str:
        """Where reports wait for the broker: ``OFFLOAD_DATA_DIR/error-reports``."""
        return os.path.join(self.off.settings.data_dir or "instance", "error-reports")

    @property
    def spool(self) -> Spool:
        # Read at use: init_app() may move OFFLOAD_DATA_DIR after setup().
        if self.pipeline.spool.folder != self.spool_folder:
            self.pipeline.spool = Spool(self.spool_folder, self._spool_size)
        return self.pipeline.spool

    # In the reporting process ------------------------------------------------

    def capture(self, exc_info: ExcInfo, environ: Mapping[str, Any] | None = None,
                task: Mapping[str, Any] | None = None) -> None:
        """Queue a report of ``exc_info``; never raises, never waits for the broker."""
        try:
            self.spool  # noqa: B018 (follows a moved data dir)
            fp = fingerprint(exc_info[0], exc_info[2])
            # The report is built later, on the reporting thread: keep only the
            # environ's strings (the server may reuse the dict after the request).
            fields = None if environ is None else {
                key: value for key, value in environ.items()
                if isinstance(value, str) and (key.startswith("HTTP_") or key in REQUEST_KEYS)}
            self.pipeline.offer(fp, lambda: build_report(
                exc_info, app=self.app, environ=fields, scrubber=self.scrubber,
                fingerprint_=fp, task=task))
        except Exception:
            logger.exception("error reporting failed to queue a report")

    def _publish(self, report: dict[str, Any]) -> None:
        # retry=False: a broker that does not answer sends the report to the
        # spool at once instead of holding every later report back.
        self.send_task.apply_async((report,), retry=False)

    def flush_spool(self) -> int:
        """Publish the spooled reports now; how many were sent."""
        self.spool  # noqa: B018
        return self.pipeline.flush_spool()

    # On workers ---------------------------------------------------------------

    def deliver(self, report: Mapping[str, Any], only: Sequence[int] | None = None) -> list[int]:
        """Send one report to the sinks (all, or those at ``only``); the indexes that failed."""
        failed: list[int] = []
        for index in (range(len(self.sinks)) if only is None else only):
            if not isinstance(index, int) or not 0 <= index < len(self.sinks):
                continue
            sink = self.sinks[index]
            try:
                sink.send(report)
            except SinkRefused as exc:
                logger.error("error report dropped: %s refused it (%s): %r",
                             sink.name, exc, report.get("description"))
            except Exception as exc:
                logger.warning("error report not delivered to %s yet: %s", sink.name, exc)
                failed.append(index)
        return failed

    def _send(self, report: dict[str, Any], sinks: list[int] | None = None,
              started: float | None = None, attempt: int = 0) -> None:
        if not isinstance(report, dict):
            raise TypeError(f"{SEND_TASK} takes a report (a dict), got {type(report).__name__}")
        # A message cannot claim to have started in the future (and retry forever).
        now = time.time()
        started = min(float(started), now) if isinstance(started, (int, float)) else now
        failed = self.deliver(report, sinks)
        if not failed:
            return
        waited = time.time() - started
        if waited >= self.give_up_after:
            logger.error("error report dropped after %.0f s of retries, not delivered to %s: %r",
                         waited, [self.sinks[i].name for i in failed], report.get("description"))
            return
        # A new message with a countdown, as Celery's retry() sends: only the
        # sinks that failed are tried again, after a wait that doubles.
        countdown = min(self.retry_delay * 2 ** int(attempt), self.max_retry_delay)
        self.send_task.apply_async((report,), {"sinks": failed, "started": started,
                                               "attempt": int(attempt) + 1}, countdown=countdown)

    def _submit_error(self, description: str, extra: str | None = None, **fields: Any) -> None:
        if not isinstance(description, str) or not description:
            raise TypeError(f"submit_error takes a description (a non-empty string), got {description!r}")
        self._send({
            "description": description,
            "extra": "" if extra is None else str(extra),
            "fields": fields,
            "app": self.app,
            "hostname": socket.gethostname(),
            "timestamp": now_iso(),
            "fingerprint": hashlib.sha1(description.encode()).hexdigest()[:16],
            "count": 1,
        })

    def _on_process_shutdown(self, **_: Any) -> None:
        self.spool  # noqa: B018
        self.pipeline.spool_pending()

    def _on_task_failure(self, sender: Any = None, task_id: str | None = None,
                         exception: BaseException | None = None, args: Any = None, kwargs: Any = None,
                         traceback: Any = None, einfo: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not self.off.celery or exception is None:
            return
        name = getattr(sender, "name", "?")
        if name in (SEND_TASK, SUBMIT_TASK):
            return  # a report about a failing report would loop
        args, kwargs = list(args or ()), dict(kwargs or {})
        if name in (DISPATCH_TASK, CHUNK_TASK) and len(args) == 3:
            # off.submit(fn), or one call of off.map(fn, chunksize=n): the
            # function's reference is the task that failed.
            name, args, kwargs = str(args[0]), list(args[1] or ()), dict(args[2] or {})
        if self.mask_task_args:
            args = [FILTERED] * len(args)
            kwargs = dict.fromkeys(kwargs, FILTERED)
        else:
            args = [_short(a) for a in args]
            kwargs = self.scrubber.mapping({k: _short(v) for k, v in kwargs.items()})
        tb = traceback if traceback is not None else getattr(einfo, "tb", None)
        self.capture((type(exception), exception, tb),
                     task={"name": name, "id": task_id, "args": args, "kwargs": kwargs})


def _short(value: Any, limit: int = 500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class SpoolSweep(bootsteps.StartStopStep):
    """A worker step: every ``sweep_interval`` seconds, re-send spooled reports.

    A web process spools reports while the broker is away and re-sends them
    with its next report; this sweep sends them even if no other error comes.
    """

    label = "offload error spool"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        task = worker.app.tasks.get(SEND_TASK)
        reporting = getattr(task, "reporting", None)
        if not isinstance(reporting, ErrorReporting):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._sweep, args=(reporting,),
                                        name="offload-error-spool", daemon=True)
        self._thread.start()

    def _sweep(self, reporting: ErrorReporting) -> None:
        while not self._stop.is_set():
            if len(reporting.spool):
                reporting.flush_spool()
            self._stop.wait(reporting.sweep_interval)

    def stop(self, worker: Any) -> None:
        self._stop.set()


def setup(off: OffloadLike, sinks: Sequence[Sink] | None = None, **options: Any) -> ErrorReporting:
    """Set up error reporting on ``off``; call it at module level, next to ``off``.

    Parameters:
        off: the Offload whose workers send the reports.
        sinks: where reports go: ``FogBugz(...)``, ``Webhook(...)``, ``Log()``.
        **options: how reports are grouped, scrubbed, retried and spooled
            (below).

    Returns:
        The :class:`ErrorReporting` to give to each middleware or hook.

    Raises:
        ConfigurationError: no ``sinks`` the first time, or other sinks than
            the first setup's.

    The options:

    - ``window``: seconds a new error waits for copies of itself; copies
      within it make one report with a ``count`` (default 2; 0 sends at once).
    - ``scrub``: parts of header, query and argument names whose values are
      replaced by ``[Filtered]`` (default: ``report.SECRET_NAME_PARTS``,
      password, secret, token, key, session, auth, csrf, ...);
      ``scrub_headers``: headers always replaced (Authorization,
      Proxy-Authorization, Cookie, Set-Cookie).
    - ``mask_task_args``: report failed tasks without their argument values.
    - ``task_failures``: report failures of this app's tasks (default True).
    - ``give_up_after``: seconds the sending task retries a sink (default
      3600), doubling its wait from ``retry_delay`` up to ``max_retry_delay``.
    - ``spool_size``: reports kept on disk while the broker is away (default
      1000).
    - ``sweep_interval``: seconds between a worker's looks at the spool
      (default 30).
    - ``queue``: the queue the reporting tasks go to (default: the default
      queue).
    - ``app_name``, ``app_version``: what reports say the app is.

    Examples:
        >>> from offload import Offload
        >>> from offload.errors import ErrorReporter, Log, setup
        >>> errors = setup(Offload({"CELERY_ALWAYS_EAGER": True}), sinks=[Log()], window=1)
        >>> application = ErrorReporter(lambda environ, start_response: [b"ok"], errors)

    Calling it again for the same Offload returns the first setup when
    ``sinks`` is None or the same sinks; other sinks are an error.
    """
    task = off.celery.tasks.get(SEND_TASK) if SEND_TASK in off.celery.tasks else None
    existing = getattr(task, "reporting", None)
    if isinstance(existing, ErrorReporting):
        if sinks is None or (repr(list(sinks)) == repr(existing.sinks) and not options):
            return existing
        raise ConfigurationError(
            f"error reporting is already set up on {off!r} with sinks {existing.sinks!r}; "
            "set it up once (offload.errors.setup) and pass that to each ErrorReporter")
    if sinks is None:
        raise ConfigurationError("offload.errors.setup(off, sinks=[...]) needs sinks the first time")
    return ErrorReporting(off, sinks, **options)
