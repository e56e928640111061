"""The error-reporting service of one Offload: its tasks, its sinks, its pipeline.

Delivering what :mod:`.capture` captured; the entry points (``setup``,
``ErrorReporting``, ``submit_error``) live here.

:func:`setup` registers two tasks on the Offload's Celery app,
``offload.errors.send`` (deliver a report to every sink, retrying with
backoff) and ``offload.errors.submit_error`` (the seed's
``submit_error.delay(description, extra)``). A worker started for the app
(``celery --app=myapp worker``, ``offload --app myapp worker``) imports the
module that called ``setup`` (or built an ``ErrorReporter``), so it knows both
tasks and the sinks. The same call connects Celery's ``task_failure`` signal
for this app only, and adds a worker step that re-sends spooled reports.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import os
import socket
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from celery import bootsteps
from celery.signals import task_failure, worker_process_shutdown

from ..datadir import fallback_data_dir
from ..dispatch import CHUNK_TASK, DISPATCH_TASK
from ..exceptions import ConfigurationError
from ..interface import OffloadLike
from .pipeline import Pipeline
from .capture import MAX_TRACEBACK, REQUEST_KEYS, ExcInfo, build_report, fingerprint, now_iso
from .scrub import FILTERED, SECRET_HEADERS, SECRET_NAME_PARTS, Scrubber, repr_safe
from .sinks import FogBugz, Sink, SinkRefused
from .spool import Spool

__all__ = ["SEND_TASK", "SUBMIT_TASK", "ErrorReporting", "SubmitError", "current", "setup"]

logger = logging.getLogger("offload.errors")

#: The ErrorReporting set up last in this process (what offload.errors.submit_error uses).
_latest: weakref.ref[ErrorReporting] | None = None
#: The one made for offload.errors.submit_error / offload.errors.celery when none was set up.
_default: ErrorReporting | None = None
_default_lock = threading.Lock()

SEND_TASK = "offload.errors.send"
"""The name of the task that delivers a report to the sinks."""
SUBMIT_TASK = "offload.errors.submit_error"
"""The name of the seed's task: ``submit_error.delay(url, user, project, area, description, extra)``."""


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
                 scrub_also: Iterable[str] = (), mask_task_args: bool = False, task_failures: bool = True,
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
        self.scrubber = Scrubber(scrub, scrub_headers, also=scrub_also)
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

        def submit_error(*args: Any, **kwargs: Any) -> None:
            """Deliver one report given as BugzScout's ``submit_error`` (see :class:`SubmitError`)."""
            report = reporting.report_of_call(args, kwargs)
            if report is not None:
                reporting._send(report)

        self.send_task = off.task(name=SEND_TASK, queue=queue, ignore_result=True)(send)
        # A message sent to it by name (celery.send_task) is delivered as is;
        # what users call is the SubmitError below, which never raises.
        self.submit_error_task = off.task(name=SUBMIT_TASK, queue=queue, ignore_result=True)(submit_error)
        #: ``submit_error.delay(url, user, project, area, description, extra)``
        #: (BugzScout's call) or ``submit_error.delay(description, extra)``.
        self.submit_error = SubmitError(lambda: self)
        # The worker step and the signal find this object through the task.
        self.send_task.reporting = self
        if task_failures:
            task_failure.connect(self._on_task_failure, weak=False)
        # A pool process that ends (max_tasks_per_child, a warm shutdown)
        # leaves what is still inside its window in the spool, for the sweep.
        worker_process_shutdown.connect(self._on_process_shutdown, weak=False)
        off.celery.steps["worker"].add(SpoolSweep)
        global _latest
        _latest = weakref.ref(self)

    def __repr__(self) -> str:
        return f"<ErrorReporting {self.app['name']} sinks={self.sinks!r}>"

    @property
    def spool_folder(self) -> str:
        """Where reports wait for the broker: ``OFFLOAD_DATA_DIR/error-reports``."""
        return os.path.join(self.off.settings.data_dir or fallback_data_dir(), "error-reports")

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
            fp = fingerprint(exc_info[0], exc_info[2], exc_info[1])
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
        sinks = self._sinks_of(report)
        for index in (range(len(sinks)) if only is None else only):
            if not isinstance(index, int) or not 0 <= index < len(sinks):
                continue
            sink = sinks[index]
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
            targets = self._sinks_of(report)
            logger.error("error report dropped after %.0f s of retries, not delivered to %s: %r",
                         waited, [targets[i].name for i in failed], report.get("description"))
            return
        # A new message with a countdown, as Celery's retry() sends: only the
        # sinks that failed are tried again, after a wait that doubles.
        countdown = min(self.retry_delay * 2 ** int(attempt), self.max_retry_delay)
        self.send_task.apply_async((report,), {"sinks": failed, "started": started,
                                               "attempt": int(attempt) + 1}, countdown=countdown)

    def _sinks_of(self, report: Mapping[str, Any]) -> list[Sink]:
        # A report made by BugzScout's submit_error(url, user, project, area,
        # ...) names its own FogBugz; any other goes to the configured sinks.
        target = report.get("fogbugz")
        if not isinstance(target, Mapping):
            return self.sinks
        url = str(target.get("url"))
        # The URL comes in the message: a forged one must not make a worker
        # post to any address it can reach. BugzScout's endpoint, or a sink's.
        configured = {sink.url for sink in self.sinks if isinstance(sink, FogBugz)}
        if url not in configured and not urlsplit(url).path.lower().endswith("/scoutsubmit.asp"):
            logger.error("error report dropped: %r is neither a BugzScout address (.../scoutSubmit.asp) "
                         "nor a configured FogBugz sink's: %r", url[:200], report.get("description"))
            return []
        try:
            return [FogBugz(str(target.get("url")), str(target.get("user")), str(target.get("project")),
                            str(target.get("area")))]
        except ValueError as exc:
            logger.error("error report dropped: %s: %r", exc, report.get("description"))
            return []

    def submit(self, *args: Any, **kwargs: Any) -> None:
        """Queue one report given as ``submit_error``'s arguments; never raises."""
        try:
            report = self.report_of_call(args, kwargs)
            if report is None:
                return
            self.spool  # noqa: B018
            self.pipeline.offer(report["fingerprint"], lambda: dict(report))
        except Exception:
            logger.exception("error reporting failed to queue a submit_error report")

    def report_of_call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        """The report of one ``submit_error`` call, None (and a log line) if it cannot be one.

        Two forms: BugzScout's ``(url, user, project, area, description,
        extra=None, default_message=None)``, and offload's ``(description,
        extra=None, **fields)`` whose fields (``user``, ``project``,
        ``area``, ``default_message``, ...) go to the FogBugz sinks. Any
        value is turned into text: ``extra`` may be a traceback's frames
        (``traceback.extract_tb(tb)``), an exception, bytes.
        """
        target = None
        try:
            if len(args) >= 5 or "url" in kwargs:
                bound = _SEED_SIGNATURE.bind(*args, **kwargs)
                values = dict(bound.arguments)
                target = {key: _short_text(values.pop(key), 2000) for key in ("url", "user", "project", "area")}
                fields = {"default_message": values.pop("default_message", None)}
            else:
                bound = _SHORT_SIGNATURE.bind(*args, **kwargs)
                values = dict(bound.arguments)
                fields = dict(values.pop("fields", {}))
        except TypeError as exc:
            logger.error("submit_error() was called with %d positional argument(s) and keywords %s, "
                         "which fit neither submit_error(url, user, project, area, description, "
                         "extra=None, default_message=None) nor submit_error(description, extra=None, "
                         "**fields): %s; nothing was reported", len(args), sorted(kwargs), exc)
            return None
        # A title: its first line (FogBugz files reports by their description).
        lines = _short_text(values.get("description"), 1000).strip().splitlines()
        description = self.scrubber.text(lines[0].strip() if lines else "") or "error"
        extra = self.scrubber.text(as_text(values.get("extra")))
        fields = {str(k): self._field(v) for k, v in fields.items() if v is not None}
        report: dict[str, Any] = {
            "description": description,
            "extra": extra,
            "fields": fields,
            "app": self.app,
            "hostname": socket.gethostname(),
            "timestamp": now_iso(),
            "fingerprint": hashlib.sha1(repr((description, target)).encode("utf-8", "replace"))
            .hexdigest()[:16],
            "count": 1,
        }
        if target is not None:
            report["fogbugz"] = target
        return report

    def _field(self, value: Any) -> Any:
        # A form field: a JSON-safe scalar (bounded, scrubbed), else its text.
        value = self.scrubber.value(value)
        return value if isinstance(value, (str, int, float, bool)) else _short_text(value, 2000)

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
        try:
            args, kwargs = list(args or ()), dict(kwargs or {})
        except Exception:  # noqa: BLE001 - whatever a forged message holds
            args, kwargs = [], {}
        fn = getattr(sender, "run", None)
        if name in (DISPATCH_TASK, CHUNK_TASK) and len(args) == 3:
            # off.submit(fn), or one call of off.map(fn, chunksize=n): the
            # function's reference is the task that failed.
            reference, call_args, call_kwargs = args
            name = _short_text(reference, 300)
            args = list(call_args) if isinstance(call_args, (list, tuple)) else []
            kwargs = dict(call_kwargs) if isinstance(call_kwargs, dict) else {}
            fn = _loaded_function(name)
        if self.mask_task_args:
            args = [FILTERED] * len(args)
            kwargs = dict.fromkeys(map(str, kwargs), FILTERED)
        else:
            args, kwargs = self.scrubber.arguments(args, kwargs, _positional_names(fn))
            args = [a if a == FILTERED else _short(a) for a in args]
            kwargs = {k: v if v == FILTERED else _short(v) for k, v in kwargs.items()}
        tb = traceback if traceback is not None else getattr(einfo, "tb", None)
        self.capture((type(exception), exception, tb),
                     task={"name": name, "id": task_id, "args": args, "kwargs": kwargs})


def _short(value: Any, limit: int = 500) -> str:
    text = repr_safe(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _short_text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else as_text(value)
    return text if len(text) <= limit else text[:limit] + "..."


def as_text(value: Any) -> str:
    """Any ``extra`` as text: traceback frames formatted, an exception with its traceback, bytes decoded."""
    try:
        if value is None:
            text = ""
        elif isinstance(value, str):
            text = value
        elif isinstance(value, (bytes, bytearray)):
            text = bytes(value[:MAX_TRACEBACK]).decode("utf-8", "replace")
        elif isinstance(value, BaseException):
            text = "".join(traceback.format_exception(type(value), value, value.__traceback__))
        elif isinstance(value, (list, tuple)) and value and all(
                isinstance(frame, traceback.FrameSummary) for frame in value):
            text = "".join(traceback.format_list(list(value)))
        elif (isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException)):
            text = "".join(traceback.format_exception(*value))
        else:
            # Walked by the scrubber: bounded, JSON-safe, secrets replaced.
            walked = _VALUES.value(value)
            text = walked if isinstance(walked, str) else repr_safe(walked)
    except Exception:  # noqa: BLE001 - never into the request
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= MAX_TRACEBACK else text[:MAX_TRACEBACK] + "..."


def _seed_form(url: Any, user: Any, project: Any, area: Any, description: Any, extra: Any = None,
               default_message: Any = None) -> None: ...


def _short_form(description: Any, extra: Any = None, **fields: Any) -> None: ...


_SEED_SIGNATURE = inspect.signature(_seed_form)
_VALUES = Scrubber()
_SHORT_SIGNATURE = inspect.signature(_short_form)


def _loaded_function(reference: str) -> Any:
    """The function a ``module:qualname`` reference names, if its module is loaded (nothing imported)."""
    module_name, _, qualname = reference.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if obj is not None else ():
        obj = getattr(obj, part, None)
    return obj if callable(obj) else None


def _positional_names(fn: Any) -> list[str] | None:
    """The names positional arguments of ``fn`` take, as far as its signature says."""
    if fn is None:
        return None
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    names = []
    for parameter in parameters:
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            names.append(parameter.name)
        elif parameter.kind is parameter.VAR_POSITIONAL:
            names += [parameter.name] * 50  # *args: each one named by it
            break
    return names


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
      replaced by ``[Filtered]`` (default: ``offload.errors.scrub.SECRET_NAME_PARTS``,
      password, secret, token, key, session, auth, csrf, ...);
      ``scrub_headers``: headers always replaced (Authorization,
      Proxy-Authorization, Cookie, Set-Cookie, X-Api-Key,
      X-Amz-Security-Token); ``scrub_also``: names added
      to the defaults (see :mod:`offload.errors.scrub` for the whole policy).
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
    ``sinks`` is None, or the same sinks without options; other sinks, or
    the same ones with options, are an error.
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


class SubmitError:
    """BugzScout's ``submit_error`` task, on offload: queue a report; never raises.

    ``submit_error.delay(url, user, project, area, description, extra=None,
    default_message=None)``, as BugzScout's Celery extension is called, posts
    to the FogBugz at ``url``; ``submit_error.delay(description, extra=None,
    **fields)`` goes to the configured sinks. ``extra`` may be any value
    (``traceback.extract_tb(tb)``, an exception, bytes): it is made text.
    The call only queues the report: a background thread publishes it (the
    spool keeps it while the broker is away), so nothing it is given and no
    broker outage can raise into a request. Wrong arguments are logged.
    Calling it (``submit_error(...)``) and ``apply_async(args, kwargs)`` do
    the same. It returns None, not an AsyncResult: there is no result to wait for.
    """

    name = SUBMIT_TASK

    def __init__(self, reporting: Any) -> None:
        self._reporting = reporting

    def __repr__(self) -> str:
        return f"<SubmitError {SUBMIT_TASK}>"

    def delay(self, *args: Any, **kwargs: Any) -> None:
        self.apply_async(args, kwargs)

    __call__ = delay

    def apply_async(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> None:
        try:
            args = tuple(args) if isinstance(args, (list, tuple)) else ()
            kwargs = dict(kwargs) if isinstance(kwargs, Mapping) else {}
            self._reporting().submit(*args, **{str(k): v for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001 - reporting never raises into the caller
            logger.exception("offload.errors.submit_error could not queue a report")


def current() -> ErrorReporting:
    """The ErrorReporting ``offload.errors.submit_error`` uses.

    The one :func:`setup` made last in this process; when none was, one of
    its own (:func:`default`).
    """
    latest = _latest() if _latest is not None else None
    return latest if latest is not None else default()


def default() -> ErrorReporting:
    """The reporting behind ``offload.errors.celery`` when the app sets none up.

    For BugzScout's form, where a module holds no Offload of its own: an
    Offload configured from the environment (``CELERY_BROKER_URL``,
    ``CELERY_RESULT_BACKEND``, ``OFFLOAD_DATA_DIR``; else the embedded
    broker in ``instance/`` beside the module that first asked), whose
    reports without a FogBugz of their own go to the ``offload.errors`` logger.
    """
    global _default
    with _default_lock:
        if _default is None:
            from ..core import Offload
            from .sinks import Log

            caller = _calling_module()
            config: dict[str, Any] = {key: os.environ[key] for key in
                                      ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "OFFLOAD_DATA_DIR")
                                      if os.environ.get(key)}
            if "OFFLOAD_DATA_DIR" not in config:
                from ..config import default_data_dir

                config["OFFLOAD_DATA_DIR"] = default_data_dir(caller)
            off = Offload(config, name=caller)
            # `offload --app module worker` finds this Offload from the
            # module's `celery = offload.errors.celery`.
            off.celery.offload = off
            _default = ErrorReporting(off, [Log()], app_name=caller)
        return _default


def _calling_module() -> str:
    frame: Any = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name and not name.startswith(("offload.", "importlib")) and name != "offload":
            return name
        frame = frame.f_back
    return "__main__"
