"""``Offload``: one mapping of settings in, a configured Celery app out.

The object owns the Celery app (``off.celery``), the allow-list, the result
watcher and, through :mod:`offload.workers`, the local worker processes. It
knows no web framework: integrations hand it their config mapping and the
context their tasks should run in.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from celery import Celery
from celery import Task as _CeleryTask
from kombu import Queue
from kombu.exceptions import EncodeError, OperationalError

from .config import CELERY_OPTIONS, Settings, read_settings
from .dispatch import DISPATCH_TASK, AllowList, reference
from .exceptions import BrokerUnavailable, ConfigurationError
from .futures import Future, ResultWatcher
from .reliability import RedisLeaseRenewal

__all__ = ["Offload"]

#: Options that ``submit`` passes on to Celery's ``apply_async``.
SUBMIT_OPTIONS = frozenset({
    "queue", "countdown", "eta", "expires", "priority", "routing_key", "exchange",
    "headers", "time_limit", "soft_time_limit", "task_id", "link", "link_error",
    "retry", "retry_policy", "ignore_result",
})

#: Offload's reliability defaults; any of them can be overridden in config.
RELIABILITY_DEFAULTS: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    # Acknowledge after the function returns, and give the task back when the
    # worker process dies under it: a killed worker loses nothing.
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    # With late acks a worker should hold no more than it runs.
    "worker_prefetch_multiplier": 1,
    # STARTED is what makes Future.running() true.
    "task_track_started": True,
    "broker_connection_retry_on_startup": True,
    "worker_cancel_long_running_tasks_on_connection_loss": True,
    # A dead broker must make submit() fail in seconds, not hang.
    "broker_connection_timeout": 2.0,
    "task_publish_retry_policy": {
        "max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1,
    },
    "result_backend_transport_options": {"retry_policy": {"timeout": 2.0}},
}

#: Redis broker: a message taken by a worker that died becomes visible again
#: after ``visibility_timeout`` (kombu's default is an hour), checked every
#: ``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds. offload's
#: workers renew the lease of the messages they hold (offload.reliability), so
#: a long task is not delivered twice however short this is.
REDIS_TRANSPORT_DEFAULTS: dict[str, Any] = {
    "visibility_timeout": 20,
    "unacked_restore_interval": 2,
    "unacked_restore_throttle": 1,
    # The sweep holds a mutex while it restores; a worker killed while
    # holding it would block every sweep for kombu's default 5 minutes.
    "unacked_mutex_expire": 5,
    "socket_timeout": 3,
    "socket_connect_timeout": 2,
}

_PICKLE_SETTINGS = ("task_serializer", "result_serializer", "accept_content",
                    "result_accept_content", "event_serializer")


#: Modules whose frames stand between the user's code and ``Offload()``; an
#: Offload made by any other module (offload.demo included) belongs to it.
_MACHINERY = ("offload", "offload.core", "offload.flask", "offload.pyramid")


def _caller_module() -> str:
    """The module that created the Offload (skipping offload's machinery)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name not in _MACHINERY and not name.startswith("importlib"):
            return name
        frame = frame.f_back
    return "__main__"


def _module_root(module: str) -> str:
    """The folder a module's package lives in (where its instance/ goes)."""
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    if not path:
        return os.getcwd()
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(module.count(".")):
        folder = os.path.dirname(folder)
    return folder


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OperationalError, ConnectionError, TimeoutError]
    try:
        import redis.exceptions

        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:
        pass
    return tuple(errors)


_CONNECTION_ERRORS = _connection_errors()


class _CeleryApp(Celery):
    """Celery, minus a pub/sub subscription per sent task on a Redis backend.

    Celery's Redis result backend subscribes to every task it sends, on the
    chance that someone will wait for it. offload's result watcher already
    follows every future on one connection, and ``AsyncResult.get()`` still
    subscribes when it is called; the eager subscription only costs a round
    trip per submit and piles up unread messages on a connection nobody reads.
    """

    def _get_backend(self) -> Any:
        backend = super()._get_backend()
        try:
            from celery.backends.redis import RedisBackend
        except ImportError:
            return backend
        if isinstance(backend, RedisBackend):
            backend.on_task_call = _no_subscription
        return backend


def _no_subscription(producer: Any, task_id: str) -> None:
    return None


def _is_task(obj: Any) -> bool:
    return isinstance(obj, _CeleryTask) or (
        hasattr(obj, "apply_async") and hasattr(obj, "name") and hasattr(obj, "run")
    )


class Offload:
    """Background work for a web app, on Celery.

    Parameters:
        config: a mapping of settings (a dict, Flask's ``app.config``,
            Pyramid's settings), or a Flask app to read it from. With no
            broker configured, offload runs on its embedded broker.
        name: the Celery app's main name (default: the creating module).

    >>> off = Offload({"CELERY_ALWAYS_EAGER": True})
    >>> off.submit(divmod, 7, 2).result()  # doctest: +SKIP
    [3, 1]
    """

    def __init__(self, config: Mapping[str, Any] | Any = None, *, name: str | None = None) -> None:
        self.import_name = _caller_module()
        self._contexts: list[Callable[[], contextlib.AbstractContextManager[Any]]] = []
        #: The Flask app given to init_app(), which local workers must build too.
        self.flask_app: Any = None
        self._workers: Any = None
        self._exposed: dict[str, Any] = {}
        self._task_queues: dict[str, str] = {}
        self._has_routes = False
        self._configured_keys: set[str] = set()
        self._references: dict[Any, str] = {}
        self._allow = AllowList(())
        self.celery: Celery = _CeleryApp(
            name or self.import_name, set_as_current=False, task_cls=self._make_task_base(),
        )
        allow = self._allow

        def dispatch(ref: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
            """Run an allowed function by its ``module:qualname`` reference."""
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise TypeError("offload.dispatch takes (reference, list of args, dict of kwargs)")
            return allow.resolve(ref)(*args, **kwargs)

        # shared=False: Celery would otherwise add the task to every app
        # created later in the process, and two Offloads would share one.
        self._dispatcher = self.celery.task(
            name=DISPATCH_TASK, acks_late=True, reject_on_worker_lost=True, shared=False,
        )(dispatch)
        self.celery.steps["consumer"].add(RedisLeaseRenewal)
        self._watcher = ResultWatcher(lambda: self.celery.backend)
        self.settings = Settings()
        if config is not None and hasattr(config, "config") and hasattr(config, "extensions"):
            self.init_app(config)
        else:
            self.configure(config)

    def __repr__(self) -> str:
        return f"<Offload {self.import_name} broker={self.celery.conf.broker_url!r}>"

    # Configuration ----------------------------------------------------------

    def configure(self, config: Mapping[str, Any] | None, *, default_data_dir: str | None = None) -> None:
        """(Re)read settings from ``config``; ``init_app`` calls this for you."""
        settings = read_settings(config)
        celery_settings = dict(RELIABILITY_DEFAULTS)
        celery_settings.update(settings.celery)
        self._check_serializers(celery_settings, settings.allow_pickle)
        data_dir = settings.data_dir or default_data_dir or os.path.join(
            _module_root(self.import_name), "instance")
        settings.data_dir = os.path.abspath(data_dir)
        if not celery_settings.get("broker_url"):
            from .transport import default_settings

            for key, value in default_settings(settings.data_dir).items():
                celery_settings.setdefault(key, value)
        from .transport import expand_sqlite_urls

        expand_sqlite_urls(celery_settings, settings.data_dir)
        broker_url = str(celery_settings["broker_url"])
        scheme = broker_url.partition("://")[0]
        if scheme in ("redis", "rediss"):
            options = dict(REDIS_TRANSPORT_DEFAULTS)
            options.update(celery_settings.get("broker_transport_options") or {})
            celery_settings["broker_transport_options"] = options
            celery_settings.setdefault("result_backend", broker_url)
        elif scheme in ("amqp", "amqps", "pyamqp"):
            celery_settings.setdefault("result_backend", "rpc://")
        elif scheme == "sqlite":
            # Celery drives a synchronous transport with a loop that, with
            # put-locks, waits for a free pool process before going on: with
            # a prefetch above the pool's size, remote control (status(),
            # revoke) would go unread until a task ends. Without them the
            # pool queues what was prefetched, as it does on Redis.
            celery_settings.setdefault("worker_pool_putlocks", False)
        if settings.queues:
            default = celery_settings.get("task_default_queue", "celery")
            names = [default] + [q for q in settings.queues if q != default]
            celery_settings["task_queues"] = [Queue(name, routing_key=name) for name in names]
        # Queues given to @off.task(queue=...) come first; a router function
        # reads them live, so tasks registered after configuration count too.
        user_routes = celery_settings.get("task_routes") or settings.routes or ()
        if isinstance(user_routes, (dict, str)) or callable(user_routes):
            user_routes = (user_routes,)
        celery_settings["task_routes"] = (self._route_registered, *user_routes)
        self._has_routes = bool(user_routes)
        if settings.allow is not None:
            packages = settings.allow
        else:
            packages = [self._own_package()] if self._own_package() else []
        self._allow.packages = tuple(packages)
        self.settings = settings
        # A second configure (Offload() at import, init_app(app) in a factory)
        # must not keep what the first one set and the second does not.
        for key in self._configured_keys - set(celery_settings):
            option = CELERY_OPTIONS.get(key)
            celery_settings[key] = option.default if option is not None else None
        self._configured_keys = set(celery_settings)
        self.celery.conf.update(celery_settings)

    def _route_registered(self, name: str, args: Any, kwargs: Any, options: Any,
                          task: Any = None, **kw: Any) -> dict[str, str] | None:
        queue = self._task_queues.get(name)
        return {"queue": queue} if queue else None

    def _own_package(self) -> str | None:
        module = self.import_name
        if module == "__main__":
            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            module = spec.name if spec is not None else ""
        return module.partition(".")[0] or None

    @staticmethod
    def _check_serializers(celery_settings: dict[str, Any], allow_pickle: bool) -> None:
        if allow_pickle:
            return
        for key in _PICKLE_SETTINGS:
            value = celery_settings.get(key)
            values = [value] if isinstance(value, str) else list(value or ())
            if any("pickle" in str(v) for v in values):
                raise ConfigurationError(
                    f"{key}={value!r} would let a message run arbitrary code on a "
                    "worker; offload uses JSON. Set OFFLOAD_ALLOW_PICKLE=True if every "
                    "producer on the broker is trusted."
                )

    def init_app(self, app: Any) -> None:
        """Read settings from a Flask app's ``config``; tasks run in its app context."""
        config = getattr(app, "config", None)
        if not isinstance(config, Mapping):
            raise TypeError(f"init_app() takes a Flask app (with a .config mapping), got {app!r}")
        instance = getattr(app, "instance_path", None)
        self.configure(config, default_data_dir=instance)
        extensions = getattr(app, "extensions", None)
        if isinstance(extensions, dict):
            extensions["offload"] = self
            self.flask_app = app
        if hasattr(app, "app_context"):
            self.add_task_context(app.app_context)

    def add_task_context(self, factory: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        """Run every task inside ``factory()`` (an app context, a request, ...)."""
        if factory not in self._contexts:
            self._contexts.append(factory)

    @contextlib.contextmanager
    def task_context(self) -> Iterator[None]:
        """The context a task runs in on a worker (all registered contexts)."""
        with contextlib.ExitStack() as stack:
            for factory in self._contexts:
                stack.enter_context(factory())
            yield

    def _make_task_base(self) -> type[_CeleryTask]:
        off = self

        class Task(_CeleryTask):
            #: Callable over the HTTP task API (offload.web) when True.
            expose = False

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                if not off._contexts:
                    return super().__call__(*args, **kwargs)
                with off.task_context():
                    return super().__call__(*args, **kwargs)

            def submit(self, *args: Any, **kwargs: Any) -> Future:
                """Send this task to a worker; an :class:`offload.Future`."""
                return off.submit(self, *args, **kwargs)

        return Task

    # Tasks -------------------------------------------------------------------

    def task(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
             queue: str | None = None, expose: bool = False, **options: Any) -> Any:
        """Register a function as a Celery task (bare or with arguments).

        The task keeps Celery's API (``.delay``, ``.apply_async``) and gains
        ``.submit`` returning an :class:`offload.Future`. ``expose=True`` makes
        it callable over the HTTP task API.
        """
        if fn is not None and not callable(fn):
            raise TypeError(f"@off.task decorates a function, got {fn!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"task name must be a non-empty string, got {name!r}")

        def register(func: Callable[..., Any]) -> Any:
            options.setdefault("shared", False)
            task = self.celery.task(name=name, expose=bool(expose), **options)(func)
            if queue is not None:
                self._task_queues[task.name] = queue
            self._allow.register(func)
            if expose:
                self._exposed[name or f"{func.__module__}.{func.__qualname__}"] = task
            return task

        return register(fn) if fn is not None else register

    @property
    def exposed_tasks(self) -> dict[str, Any]:
        """Tasks registered with ``expose=True``, by name."""
        return {task.name: task for task in self._exposed.values()}

    # Submitting -------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; return its :class:`Future`.

        ``queue=`` is reserved: it names the queue to send to. Other Celery
        options go through :meth:`options`.
        """
        queue = kwargs.pop("queue", None)
        return self._submit(fn, args, kwargs, {"queue": queue} if queue else {})

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any], /, **options: Any) -> list[Future]:
        """Submit ``fn`` once per item: a list/tuple is ``*args``, a dict ``**kwargs``."""
        return self.options(**options).map(fn, iterable)

    def options(self, **options: Any) -> _Submitter:
        """Submit with Celery options: ``off.options(queue="high", countdown=5).submit(...)``."""
        unknown = set(options) - SUBMIT_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown submit option(s) {sorted(unknown)}; valid: {sorted(SUBMIT_OPTIONS)}"
            )
        return _Submitter(self, options)

    def get(self, task_id: str) -> Future:
        """A :class:`Future` for a task submitted earlier, by its id."""
        if not isinstance(task_id, str) or not task_id.strip():
            raise ValueError(f"a task id is a non-empty string, got {task_id!r}")
        future = Future(self.celery.AsyncResult(task_id), self._watcher)
        self._watcher.watch(future)
        return future

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...] | list[Any],
                kwargs: dict[str, Any], options: dict[str, Any], producer: Any = None) -> Future:
        if self.settings.start_local_workers:
            self.workers.ensure_started()
        if producer is not None:
            options = {**options, "producer": producer}
        if not self.celery.conf.task_always_eager:
            extra = self._watcher.submit_options()
            if extra:
                options = {**extra, **options}
        try:
            if _is_task(fn):
                result = fn.apply_async(args, kwargs, **options)
            else:
                # The checks behind reference() import and walk the module:
                # once per function, not once per submit.
                try:
                    ref = self._references[fn]
                except (KeyError, TypeError):  # TypeError: unhashable callable
                    ref = reference(fn)
                    self._references[fn] = ref
                dotted = ref.replace(":", ".")
                if self._has_routes and "queue" not in options:
                    route = self.celery.amqp.router.route({}, dotted, args, kwargs)
                    if route.get("queue") is not None:
                        options = {**options, "queue": route["queue"]}
                result = self._dispatcher.apply_async(
                    (ref, list(args), kwargs), shadow=dotted, **options)
        except EncodeError as exc:
            raise TypeError(
                f"the arguments of {getattr(fn, '__name__', fn)!r} must be JSON-serializable "
                f"(str, int, float, bool, None, list, dict): {exc}"
            ) from None
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(
                f"could not send the task: the broker at {self.celery.conf.broker_url!r} "
                f"is unreachable ({exc}). Is it running?"
            ) from exc
        future = Future(result, self._watcher)
        if self.celery.conf.task_always_eager:
            future._apply_meta({"status": result.state, "result": result.result})
        else:
            self._watcher.watch(future)
        return future

    # Workers and monitoring (offload.workers) ------------------------------

    @property
    def workers(self) -> Any:
        """The local worker processes configured by ``CELERY_WORKERS``."""
        if self._workers is None:
            from .workers import LocalWorkers

            self._workers = LocalWorkers(self)
        return self._workers

    def start(self, timeout: float = 60.0) -> None:
        """Start the local workers and wait until each answers a ping."""
        self.workers.start(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the local workers (warm shutdown, then kill after ``timeout``)."""
        if self._workers is not None:
            self._workers.stop(timeout=timeout)

    def status(self, timeout: float = 1.0) -> dict[str, Any]:
        """``{"ping": bool, "workers": {"name@host": "OK", ...}}``."""
        from .workers import status

        return status(self.celery, timeout=timeout)

    def _inspect(self, what: str, timeout: float) -> dict[str, Any]:
        from .workers import inspect

        return inspect(self.celery, what, timeout=timeout)

    def active(self, timeout: float = 1.0) -> dict[str, Any]:
        """Tasks running now, per worker."""
        return self._inspect("active", timeout)

    def scheduled(self, timeout: float = 1.0) -> dict[str, Any]:
        """Tasks with an ETA or countdown, per worker."""
        return self._inspect("scheduled", timeout)

    def reserved(self, timeout: float = 1.0) -> dict[str, Any]:
        """Tasks taken from the queue but not yet started, per worker."""
        return self._inspect("reserved", timeout)

    def revoked(self, timeout: float = 1.0) -> dict[str, Any]:
        """Ids of revoked tasks, per worker."""
        return self._inspect("revoked", timeout)

    def registered(self, timeout: float = 1.0) -> dict[str, Any]:
        """Task names each worker knows."""
        return self._inspect("registered", timeout)

    def stats(self, timeout: float = 1.0) -> dict[str, Any]:
        """Each worker's statistics."""
        return self._inspect("stats", timeout)


class _Submitter:
    """``off.options(...)``: submit and map with fixed Celery options."""

    def __init__(self, off: Offload, options: dict[str, Any]) -> None:
        self._off = off
        self._options = options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        options = dict(self._options)
        if "queue" in kwargs:
            options["queue"] = kwargs.pop("queue")
        return self._off._submit(fn, args, kwargs, options)

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any], /) -> list[Future]:
        items = list(iterable)
        futures: list[Future] = []
        if self._off.celery.conf.task_always_eager:
            return [self._submit_item(fn, item, None) for item in items]
        # One producer (one connection) for the whole batch.
        with self._off.celery.producer_or_acquire() as producer:
            for item in items:
                futures.append(self._submit_item(fn, item, producer))
        return futures

    def _submit_item(self, fn: Callable[..., Any], item: Any, producer: Any) -> Future:
        if isinstance(item, Mapping):
            args, kwargs = (), dict(item)
        elif isinstance(item, (list, tuple)):
            args, kwargs = tuple(item), {}
        else:
            args, kwargs = (item,), {}
        return self._off._submit(fn, args, kwargs, dict(self._options), producer)

