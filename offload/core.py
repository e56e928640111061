"""``Offload``: one mapping of settings in, a configured Celery app out.

The object owns the Celery app (``off.celery``), the allow-list, the result
watcher and, through :mod:`offload.workers`, the local worker processes. It
knows no web framework: integrations hand it their config mapping and the
context their tasks should run in.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from types import FrameType
from typing import Any, Literal, overload

from celery import Celery
from celery import Task as _CeleryTask
from celery.utils.saferepr import saferepr
from kombu import Connection
from kombu.exceptions import EncodeError
from kombu.serialization import dumps
from kombu.utils.url import maybe_sanitize_url, parse_url

from .config import REDIS_TRANSPORT_DEFAULTS, RELIABILITY_DEFAULTS, CELERY_OPTIONS, Settings
from .config import default_data_dir as _default_data_dir
from .config import translate
from .dispatch import (CHUNK_TASK, AllowList, chunk_call_ids, default_allow, install_chunk_dispatcher,
                       install_dispatcher, reference)
from .exceptions import (CONNECTION_ERRORS, BrokerUnavailable, ConfigurationError, ResultBackendLimit,
                         _ResultStoreUnreachable, broker_unreachable, result_store_unreachable)
from .executor import Executor
from .exposure import Exposures
from .frameworks import INTEGRATIONS, AppHooks, integration_for
from .futures import Future, SkipRevoked
from .hub import ResultHub, TaskEvent, stores_results
from .ids import check_task_id
from .intake import finite
from .reliability import AMQP as ReliableAMQP
from .reliability import HandBack, RedisLeaseRenewal
from .result_store import REVOKED_BEFORE_START, with_one_call_store
from .task import AsyncTask, BoundTaskDecorator, P, R, Task, TaskDecorator

__all__ = ["CONNECTION_ERRORS", "REDIS_TRANSPORT_DEFAULTS", "RELIABILITY_DEFAULTS", "Offload", "exposed_name"]

#: Options that ``submit`` passes on to Celery's ``apply_async``.
SUBMIT_OPTIONS = frozenset({
    "queue", "countdown", "eta", "expires", "priority", "routing_key", "exchange",
    "headers", "time_limit", "soft_time_limit", "task_id", "link", "link_error",
    "retry", "retry_policy", "ignore_result",
})

#: Options of offload's own that :meth:`Offload.options` takes besides Celery's:
#: ``expose=True`` lets the web task API show (and cancel) the calls sent,
#: ``public_errors`` names the exception types whose message it may show.
EXPOSE_OPTIONS = frozenset({"expose", "public_errors"})

#: ``map``'s default chunking (``chunksize=None``). Each message costs the
#: sender about 0.5 ms however little it carries (Celery's apply_async and a
#: broker write), a call in a chunk some 40 us (its future, id and JSON):
#: at 128 calls a message, the message's own cost is under a tenth of the
#: chunk's. Chunks grow from 1 call, doubling, so the first results come
#: back after one call's work while a large map reaches full chunks after 7
#: messages; and no chunk is larger than 1/MAP_MIN_CHUNKS of the map, so
#: that even a small map is spread over the workers.
MAP_CHUNK_MAX = 128
MAP_MIN_CHUNKS = 16

#: Options that name or bound a single task; with them, map's default keeps
#: one message per call (a time limit or expiry would apply to a whole chunk).
_PER_CALL_OPTIONS = frozenset({"task_id", "link", "link_error", "time_limit", "soft_time_limit", "expires"})

#: ``hook(send) -> bool``: run ``send`` once the current transaction commits
#: (and never if it rolls back), returning True; or False when no
#: transaction of its kind is open. Integrations register one each
#: (:meth:`Offload.add_commit_hook`).
CommitHook = Callable[[Callable[[], None]], bool]

#: Modules whose frames stand between the user's code and ``Offload()``; an
#: Offload made by any other module (offload.demo included) belongs to it.
_MACHINERY = ("offload", "offload.core", "offload.flask", "offload.pyramid")


def _caller_module() -> str:
    """The module that created the Offload (skipping offload's machinery)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name not in _MACHINERY and not name.startswith("importlib"):
            return name
        frame = frame.f_back
    return "__main__"


class _Connection(Connection):
    """kombu's Connection, whose URL shows no password mask where there is no password.

    kombu masks the password of a transport that does not parse its own URL
    (Redis, offload-redis) whether there is one or not: the worker's banner
    read ``redis://:**@host`` for a broker without a password.
    """

    def as_uri(self, include_password: bool = False, mask: str = "**", *args: Any, **kwargs: Any) -> str:
        # *args: kombu's getfields may come by position too.
        uri = super().as_uri(include_password, mask, *args, **kwargs)
        if include_password or self.password or not mask:
            return uri
        # A transport's default password (amqp's guest) is a password too.
        if parse_url(super().as_uri(True, mask, *args, **kwargs)).get("password"):
            return uri
        return uri.replace(f":{mask}@", "@", 1).replace("://@", "://", 1)


class _AMQP(ReliableAMQP):
    """Celery's message sender as :mod:`offload.reliability` sets it up (no
    broker-side TTL for ``expires``), with the unmasked :class:`_Connection`."""

    Connection = _Connection


class _CeleryApp(Celery):
    """Celery, minus a pub/sub subscription per sent task on a Redis backend,
    whose worker stores each state of a task in one round trip.

    Celery's Redis result backend subscribes to every task it sends, on the
    chance that someone will wait for it. offload's result watcher already
    follows every future on one connection, and ``AsyncResult.get()`` still
    subscribes when it is called; the eager subscription only costs a round
    trip per submit and piles up unread messages on a connection nobody reads.
    """

    amqp_cls = _AMQP

    #: The file where this app's workers record the messages they refuse
    #: (:class:`offload.intake.DeadLetters`); set by :meth:`Offload.configure`.
    dead_letters_path: str | None = None

    def _get_backend(self) -> Any:
        # A Redis result backend stores each state in one round trip, not
        # two (offload.result_store.OneCallStore).
        from celery.app import backends

        backend_cls, url = backends.by_url(self.backend_cls or self.conf.result_backend, self.loader)
        backend = with_one_call_store(backend_cls)(app=self, url=url)
        try:
            from celery.backends.redis import RedisBackend
        except ImportError:
            return backend
        if isinstance(backend, RedisBackend):
            backend.on_task_call = _no_subscription
        return backend


def _no_subscription(producer: Any, task_id: str) -> None:
    return None


def _skip_revoked(task: Any, task_id: str) -> None:
    """Skip a run whose task was revoked before it started: said, evented, acknowledged."""
    import logging

    from celery.exceptions import Ignore

    logging.getLogger("offload.worker").info("Discarding revoked task: %s[%s]", task.name, task_id)
    try:
        task.send_event("task-revoked", terminated=False, signum=None, expired=False, retry=False)
    except Exception:  # the dashboard misses it; the task is skipped all the same
        logging.getLogger("offload.worker").debug("could not send task-revoked", exc_info=True)
    raise Ignore()


def _awaited(value: Any) -> Any:
    """A task's return value; an ``async def`` task's coroutine run to its end (offload.aio)."""
    if inspect.iscoroutine(value):
        from .aio import run

        return run(value)
    return value


def _delay_of(options: Mapping[str, Any]) -> float:
    """Seconds a task waits on purpose before it runs (countdown or eta)."""
    countdown = options.get("countdown")
    if countdown:
        return max(float(countdown), 0.0)
    eta = options.get("eta")
    if eta is not None:
        import datetime

        now = datetime.datetime.now(eta.tzinfo) if getattr(eta, "tzinfo", None) else datetime.datetime.now()
        return max((eta - now).total_seconds(), 0.0)
    return 0.0


def _is_task(obj: Any) -> bool:
    return isinstance(obj, _CeleryTask) or (
        hasattr(obj, "apply_async") and hasattr(obj, "name") and hasattr(obj, "run")
    )


def exposed_name(task: Any, celery_app: Any) -> str:
    """The short name an exposed task is called by over HTTP.

    Celery names a task declared without ``name=`` ``module.function``; that
    default becomes the function's own name (``add``). A name chosen with
    ``name=`` is kept as it is.
    """
    run = getattr(task.run, "__func__", task.run)
    module, func_name = getattr(run, "__module__", ""), getattr(run, "__name__", "")
    if func_name and task.name == celery_app.gen_task_name(func_name, module):
        return func_name
    return task.name


class Offload:
    """Background work for a web app, on Celery.

    Parameters:
        config: a mapping of settings (a dict, Flask's ``app.config``,
            Pyramid's settings), or a Flask app to read it from
            (:mod:`offload.flask`). With no broker configured, offload runs
            on its embedded broker.
        name: the Celery app's main name (default: the creating module).

    Examples:
        >>> off = Offload({"CELERY_ALWAYS_EAGER": True})   # in-process, for tests
        >>> @off.task
        ... def add(x, y):
        ...     return x + y
        >>> add.submit(1, 2).result(), off.submit(add, 3, 4).result()
        (3, 7)
    """

    def __init__(self, config: Mapping[str, Any] | Any = None, *, name: str | None = None) -> None:
        self.import_name = _caller_module()
        """The module that created this Offload; its package is allowed by default."""
        self._contexts: list[Callable[[], contextlib.AbstractContextManager[Any]]] = []
        #: What the integration that configured this Offload from a web app
        #: (``init_app``) says of that app: how local workers build it too, how
        #: a worker reads the starter's settings through it. None without one.
        self.app_hooks: AppHooks | None = None
        self._workers: Any = None
        self._monitor: Any = None
        self._exposed: dict[str, Any] = {}
        self._task_queues: dict[str, str] = {}
        self._has_routes = False
        self._publish_options: dict[str, Any] = {}
        self._configured_keys: set[str] = set()
        #: A copy of the mapping the last :meth:`configure` read (local
        #: workers are started with it, :mod:`offload.workers`).
        self.configured_from: dict[str, Any] = {}
        #: The mapping given to the constructor: a value still there (the
        #: same object) is rebuilt by a worker's own import of the module.
        self.constructed_from: dict[str, Any] = {}
        self._references: dict[Any, str] = {}
        self._commit_hooks: list[CommitHook] = []
        self._allow = AllowList(())
        self.celery: Celery = _CeleryApp(
            name or self.import_name, set_as_current=False, task_cls=self._make_task_base(),
        )
        """The real Celery app: ``celery -A module worker`` works where a module holds it."""
        self._dispatcher = install_dispatcher(self.celery, self._allow)
        # Each call of a chunk runs in the task contexts (an app context, a
        # request) of its own, as a task of its own would.
        self._chunk_dispatcher = install_chunk_dispatcher(self.celery, self._allow,
                                                          call_context=self._call_context)
        self.celery.steps["consumer"].add(RedisLeaseRenewal)
        self.celery.steps["consumer"].add(HandBack)
        self.celery.steps["consumer"].add(SkipRevoked)
        self.hub = ResultHub(lambda: self.celery.backend)
        """The result hub: every Future of this Offload listens to it."""
        self.exposures = Exposures(lambda: self.celery.backend)
        """Which task ids the web task API may show (:mod:`offload.exposure`)."""
        self.settings = Settings()
        """The translated settings (:func:`offload.config.translate`)."""
        if config is not None and any(recognises(config) for recognises, _ in INTEGRATIONS):
            self.init_app(config)
        else:
            self.configure(config)
            self.constructed_from = dict(self.configured_from)

    def __repr__(self) -> str:
        return f"<Offload {self.import_name} broker={self.broker_url!r}>"

    @property
    def broker_url(self) -> str:
        """The broker's URL with its password masked, for messages and logs."""
        return str(maybe_sanitize_url(str(self.celery.conf.broker_url or "")))

    # Configuration ----------------------------------------------------------

    def configure(self, config: Mapping[str, Any] | None, *, default_data_dir: str | None = None) -> None:
        """(Re)read settings from ``config``; ``init_app`` calls this for you.

        Raises:
            ConfigurationError: for a setting offload cannot use (see
                :func:`offload.config.translate`).
        """
        settings = translate(
            config,
            default_data_dir=default_data_dir or _default_data_dir(self.import_name),
            default_allow=default_allow(self.import_name),
        )
        celery_settings = dict(settings.celery)
        # Queues given to @off.task(queue=...) come first; a router function
        # reads them live, so tasks registered after configuration count too.
        user_routes = settings.celery["task_routes"]
        celery_settings["task_routes"] = (self._route_registered, *user_routes)
        self._has_routes = bool(user_routes)
        # RabbitMQ with publisher confirms: each publish waits for the ack at
        # most confirm_timeout (config.AMQP_TRANSPORT_DEFAULTS), then fails.
        transport_options = settings.celery.get("broker_transport_options") or {}
        timeout = transport_options.get("confirm_timeout")
        self._publish_options = (
            {"confirm_timeout": timeout} if transport_options.get("confirm_publish") and timeout else {})
        self._allow.packages = settings.allow or ()
        self.settings = settings
        self.configured_from = {k: v for k, v in (config or {}).items() if isinstance(k, str)}
        self.celery.dead_letters_path = (os.path.join(settings.data_dir, "dead-letters.jsonl")
                                         if settings.data_dir else None)
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

    def init_app(self, app: Any) -> None:
        """Read settings from a Flask app's ``config``; tasks run in its app context.

        The app's integration does the work (:func:`offload.flask.init_app`),
        found by the app's kind (:mod:`offload.frameworks`).

        Raises:
            TypeError: when ``app`` is not a Flask app.
        """
        init = integration_for(app)
        if init is None:
            raise TypeError(f"init_app() takes a Flask app (with a .config mapping), got {app!r}")
        init(self, app)

    def add_task_context(self, factory: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        """Run every task inside ``factory()`` (an app context, a request, ...)."""
        if factory not in self._contexts:
            self._contexts.append(factory)

    def remove_task_context(self, factory: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        """Stop running tasks inside ``factory()`` (no error when it was not added)."""
        if factory in self._contexts:
            self._contexts.remove(factory)

    @contextlib.contextmanager
    def task_context(self) -> Iterator[None]:
        """The context a task runs in on a worker (all registered contexts)."""
        with contextlib.ExitStack() as stack:
            for factory in self._contexts:
                stack.enter_context(factory())
            yield

    def _call_context(self) -> contextlib.AbstractContextManager[Any]:
        """What one call of a chunk runs inside: the task contexts, if any."""
        return self.task_context() if self._contexts else contextlib.nullcontext()

    def _make_task_base(self) -> type[_CeleryTask]:
        off = self

        class Task(_CeleryTask):
            #: Callable over the HTTP task API (offload.web) when True.
            expose = False
            #: Bounds how often one task may kill its pool process (offload.intake),
            #: and hands back, never revokes, a task cancelled after a broker
            #: connection loss (offload.reliability, a subclass of intake's).
            Request = "offload.reliability:Request"
            #: Exception types whose message the HTTP task API shows (see offload.TaskError).
            public_errors: tuple[type[BaseException], ...] = ()

            def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                            *more: Any, **options: Any) -> Any:
                # An exposed task's calls are marked before they are sent,
                # however they are sent (.delay, .submit, the web API), so
                # that the web task API may answer for them.
                if self.expose and not options.pop("_offload_marked", False):
                    from celery.utils import uuid

                    task_id = task_id or uuid()
                    try:
                        off.exposures.mark([task_id], self.name, self.public_errors)
                    except CONNECTION_ERRORS as exc:
                        raise result_store_unreachable(self.app, exc, f"send the task {self.name}") from exc
                # .delay() too: a dead broker is offload's BrokerUnavailable,
                # as for submit (still a kombu OperationalError).
                try:
                    return super().apply_async(args, kwargs, task_id, *more, **options)
                except CONNECTION_ERRORS as exc:
                    if isinstance(exc, BrokerUnavailable):
                        raise
                    raise broker_unreachable(self.app, exc, f"send the task {self.name}") from exc

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                # A chunk enters the contexts once per call (_call_context).
                if not off._contexts or self.name == CHUNK_TASK:
                    return _awaited(super().__call__(*args, **kwargs))
                with off.task_context():
                    return _awaited(super().__call__(*args, **kwargs))

            def submit(self, *args: Any, **kwargs: Any) -> Future:
                """Send this task to a worker; an :class:`offload.Future`."""
                return off.submit(self, *args, **kwargs)

            def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
                # Revoked in the result store before this run began (its
                # STARTED store found it, offload.result_store.OneCallStore):
                # the function does not run, and the REVOKED stays.
                if getattr(self.request, REVOKED_BEFORE_START, False):
                    _skip_revoked(self, task_id)

            def update_state(self, task_id: str | None = None, state: str | None = None,
                             meta: Any = None, **kwargs: Any) -> Any:
                # JSON has no NaN or infinities, and the worker reads a stored
                # state back (before it stores the next) with a decoder that
                # refuses them (offload.intake.strict_json): null in their place.
                return super().update_state(task_id, state, finite(meta), **kwargs)

        return Task

    def add_commit_hook(self, hook: CommitHook) -> None:
        """Let ``submit(..., on_commit=True)`` wait for a transaction ``hook`` knows.

        ``hook(send)`` arranges for ``send()`` to run once the current
        transaction commits (never if it rolls back) and returns True, or
        returns False when it sees no transaction. The integrations register
        theirs (``offload.django``: Django's ``transaction.on_commit``).
        """
        if hook not in self._commit_hooks:
            self._commit_hooks.append(hook)

    # Tasks -------------------------------------------------------------------

    # An async def function's task: its futures hold what the coroutine returns.
    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /, *, name: str | None = None,
             queue: str | None = None, expose: bool = False, schedule: Any = None,
             public_errors: Iterable[type[BaseException]] = (), **options: Any) -> AsyncTask[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /, *, name: str | None = None, queue: str | None = None,
             expose: bool = False, schedule: Any = None,
             public_errors: Iterable[type[BaseException]] = (), **options: Any) -> Task[P, R]: ...

    # bind=True: Celery passes the task itself first, which no caller gives.
    @overload
    def task(self, fn: None = None, /, *, bind: Literal[True], name: str | None = None,
             queue: str | None = None, expose: bool = False, schedule: Any = None,
             public_errors: Iterable[type[BaseException]] = (),
             **options: Any) -> BoundTaskDecorator: ...

    @overload
    def task(self, fn: None = None, /, *, name: str | None = None, queue: str | None = None,
             expose: bool = False, schedule: Any = None,
             public_errors: Iterable[type[BaseException]] = (),
             **options: Any) -> TaskDecorator: ...

    def task(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
             queue: str | None = None, expose: bool = False, schedule: Any = None,
             public_errors: Iterable[type[BaseException]] = (), **options: Any) -> Any:
        """Register a function as a Celery task (bare or with arguments).

        The task keeps Celery's API (``.delay``, ``.apply_async``) and gains
        ``.submit`` returning an :class:`offload.Future`. ``expose=True`` makes
        it callable over the HTTP task API. ``public_errors=(ValueError,)``
        names the exception types whose message that API shows a client
        (any other failure answers a generic message and the task id;
        :class:`offload.TaskError` subclasses are always shown). ``schedule=``
        (seconds, a timedelta or ``crontab(...)``) runs it periodically
        (:mod:`offload.beat`).

        For a type checker the task keeps the function's signature
        (:class:`offload.task.Task`): ``add.submit(1, 2)`` is a
        ``Future[int]`` for ``def add(x: int, y: int) -> int``.
        """
        if fn is not None and not callable(fn):
            raise TypeError(f"@off.task decorates a function, got {fn!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"task name must be a non-empty string, got {name!r}")
        public = exception_types(public_errors, "public_errors")
        if public:
            options["public_errors"] = public
        if schedule is not None:
            from .beat import as_schedule, use_scheduler

            options["schedule"] = as_schedule(schedule)
            use_scheduler(self.celery)

        def register(func: Callable[..., Any]) -> Any:
            options.setdefault("shared", False)
            self._check_task_name(name, func)
            key = name or f"{func.__module__}.{func.__qualname__}"
            if expose:
                self._check_exposed_name(name, func, key)
            task = self.celery.task(name=name, expose=bool(expose), **options)(func)
            if queue is not None:
                self._task_queues[task.name] = queue
            try:
                self._allow.register(func, task)
            except TypeError:
                # A lambda or a closure has no reference to send; its task
                # still runs by its task name.
                pass
            if expose:
                self._exposed[key] = task
            return task

        return register(fn) if fn is not None else register

    def _check_exposed_name(self, name: str | None, func: Callable[..., Any], key: str) -> None:
        """Refuse, before anything is registered, a second exposed task answering to one name."""
        func_name, module = getattr(func, "__name__", ""), getattr(func, "__module__", "")
        default = self.celery.gen_task_name(func_name, module)
        short = func_name if name is None or name == default else name
        for other_key, other in self._exposed.items():
            if other_key != key and short in (exposed_name(other, self.celery), other.name):
                raise ConfigurationError(
                    f"two exposed tasks answer to the name {short!r} over HTTP: {other.name!r} "
                    f"and {name or default!r}. Give one of them another name with "
                    f"@off.task(name=..., expose=True)."
                )

    def _check_task_name(self, name: str | None, func: Callable[..., Any]) -> None:
        """Refuse a second, different function under a task name already taken.

        Celery would silently put the second in the first one's place, so
        that calls meant for the first run the second. The same ``def``
        registered again (a module imported twice, an app factory
        that declares its tasks and is called again) replaces its task.
        """
        module = getattr(func, "__module__", None)
        task_name = name or self.celery.gen_task_name(getattr(func, "__name__", repr(func)), module)
        existing = self.celery.tasks.get(task_name)
        if existing is None:
            return
        previous = getattr(existing, "__wrapped__", None)
        if previous is func:
            return
        # The same code under the same qualified name: one declaration made
        # again (a decorator's wrapper shares its code with every function it
        # wraps, but functools.wraps gives each the wrapped one's name).
        same_code = getattr(previous, "__code__", None) is not None and (
            getattr(previous, "__code__", None) is getattr(func, "__code__", None)
            and getattr(previous, "__qualname__", None) == getattr(func, "__qualname__", None)
            and getattr(previous, "__module__", None) == getattr(func, "__module__", None))
        if same_code:
            self.celery.tasks.unregister(task_name)
            return
        where = (f"{previous.__module__}.{previous.__qualname__}"
                 if previous is not None and hasattr(previous, "__qualname__") else repr(existing))
        raise ConfigurationError(
            f"a task named {task_name!r} is already registered (by {where}); give one of them "
            "another name: @off.task(name='...')")

    @property
    def task_queues(self) -> dict[str, str]:
        """The queues given to ``@off.task(queue=...)``, by task name."""
        return dict(self._task_queues)

    @property
    def exposed_tasks(self) -> dict[str, Any]:
        """Tasks registered with ``expose=True``, by name."""
        return {task.name: task for task in self._exposed.values()}

    # Submitting -------------------------------------------------------------

    # An async def function: the worker awaits the coroutine, the future holds its result.
    @overload
    def submit(self, fn: Callable[P, Coroutine[Any, Any, R]], /, *args: P.args,
               **kwargs: P.kwargs) -> Future[R]: ...

    @overload
    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]: ...

    # The reserved keywords are not fn's: with one, only the result is typed.
    # mypy reads P.kwargs as taking any keyword and so calls these two
    # unreachable, yet it does fall back on them when the first one fails.
    @overload
    def submit(self, fn: Callable[..., Coroutine[Any, Any, R]], /, *args: Any,  # type: ignore[overload-cannot-match]
               queue: str | None, **kwargs: Any) -> Future[R]: ...

    @overload
    def submit(self, fn: Callable[..., R], /, *args: Any, queue: str | None,  # type: ignore[overload-cannot-match]
               **kwargs: Any) -> Future[R]: ...

    @overload
    def submit(self, fn: Callable[..., Coroutine[Any, Any, R]], /, *args: Any,  # type: ignore[overload-cannot-match]
               on_commit: bool, **kwargs: Any) -> Future[R]: ...

    @overload
    def submit(self, fn: Callable[..., R], /, *args: Any, on_commit: bool,  # type: ignore[overload-cannot-match]
               **kwargs: Any) -> Future[R]: ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker; return its :class:`Future`.

        ``queue=`` is reserved: it names the queue to send to. Other Celery
        options go through :meth:`options`. ``on_commit=True`` is reserved
        too: the message leaves only once the current database transaction
        commits, and never if it rolls back (the future then stays pending);
        outside a transaction it leaves at once. It needs an integration
        that knows the transaction (``offload.django``, ``offload.pyramid``
        with ``pyramid_tm``, ``offload.flask`` with Flask-SQLAlchemy).
        """
        queue = kwargs.pop("queue", None)
        on_commit = kwargs.pop("on_commit", False)
        options = {"queue": queue} if queue else {}
        if on_commit:
            return self._submit_on_commit(fn, args, kwargs, options)
        return self._submit(fn, args, kwargs, options)

    def _submit_on_commit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                          options: dict[str, Any]) -> Future:
        """Check and encode now; send when the transaction commits (see :meth:`submit`)."""
        if not self._commit_hooks:
            raise ConfigurationError(
                "submit(..., on_commit=True) needs an integration that knows the app's "
                "transactions: add 'offload.django' to INSTALLED_APPS, "
                "config.include('offload.pyramid') with pyramid_tm, or Offload(app) on a Flask "
                "app with Flask-SQLAlchemy")
        import uuid

        options = {**options, "task_id": options.get("task_id") or str(uuid.uuid4())}
        send = self._prepare(fn, args, kwargs, options)
        try:
            dumps(send[1], serializer=self.celery.conf.task_serializer)
        except EncodeError as exc:
            raise TypeError(
                f"the arguments of {getattr(fn, '__name__', fn)!r} must be JSON-serializable "
                f"(str, int, float, bool, None, list, dict): {exc}") from None
        future: Future[Any] = Future(options["task_id"], app=self.celery)

        def send_now() -> None:
            if self.settings.start_local_workers:
                self.workers.ensure_started()
            try:
                self._send(fn, send, future=future)
            except Exception as exc:  # the commit is done: tell the future, not the committer
                future.set_exception(exc)
                raise

        for hook in self._commit_hooks:
            if hook(send_now):
                return future
        send_now()
        return future

    @overload
    def map(self, fn: Callable[..., Coroutine[Any, Any, R]], iterable: Iterable[Any], /, *,
            chunksize: int | None = None, **options: Any) -> list[Future[R]]: ...

    @overload
    def map(self, fn: Callable[..., R], iterable: Iterable[Any], /, *,
            chunksize: int | None = None, **options: Any) -> list[Future[R]]: ...

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any], /, *,
            chunksize: int | None = None, **options: Any) -> list[Future[Any]]:
        """Submit ``fn`` once per item: a list/tuple is ``*args``, a dict ``**kwargs``.

        Calls of a plain function go several to a message, which a worker
        runs in a loop, each call with its own future, id, state and
        exception (``offload.dispatch_chunk``; the guide's *Futures*: "``map``: many small
        calls, few messages").
        By default chunks grow from 1 call to 128 (:func:`chunk_sizes`);
        ``chunksize=n`` fixes the size, ``chunksize=1`` sends one message
        per call. ``options`` are those of :meth:`options`.

        Raises:
            ValueError: ``chunksize`` is not None or an int >= 1.
            TypeError: an item cannot be sent (nothing is sent then).
            BrokerUnavailable: the broker cannot be reached.
        """
        return self.options(**options).map(fn, iterable, chunksize=chunksize)

    def executor(self, **options: Any) -> Executor:
        """A :class:`concurrent.futures.Executor` running calls on the workers.

        ``options`` are those of :meth:`options` (``queue``, ``countdown``,
        ...), applied to every call. See :mod:`offload.executor`.

        Raises:
            TypeError: an unknown option.
        """
        return Executor(self.options(**options))

    def options(self, **options: Any) -> _Submitter:
        """Submit with Celery options: ``off.options(queue="high", countdown=5).submit(...)``.

        Besides Celery's, ``expose=True`` lets the web task API
        (:mod:`offload.web`) show and cancel the calls sent, for a view that
        starts work for the browser to follow; ``public_errors=(ValueError,)``
        then names the exception types whose message it shows.

        Raises:
            TypeError: an option offload does not know, or one of the wrong type.
            InvalidTaskId: ``task_id=`` cannot be a task id (:mod:`offload.ids`).
        """
        unknown = set(options) - SUBMIT_OPTIONS - EXPOSE_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown submit option(s) {sorted(unknown)}; valid: {sorted(SUBMIT_OPTIONS)}, "
                f"and offload's {sorted(EXPOSE_OPTIONS)}"
            )
        if options.get("task_id") is not None:  # None: Celery makes one
            check_task_id(options["task_id"])
        expose = options.pop("expose", False)
        if not isinstance(expose, bool):
            raise TypeError(f"expose is True or False, got {expose!r}")
        public = exception_types(options.pop("public_errors", ()), "public_errors")
        if public and not expose:
            raise TypeError("public_errors= applies to calls sent with expose=True")
        return _Submitter(self, options, public if expose else None)

    def get(self, task_id: str) -> Future[Any]:
        """A :class:`Future` for a task submitted earlier, by its id.

        Any number of futures may follow one id. On rpc:// only the process
        that sent a task receives its result: there ``get`` follows only
        this process's own tasks.

        Raises:
            InvalidTaskId: ``task_id`` cannot be a task id (:mod:`offload.ids`
                says what can: up to 255 letters, digits and the characters
                a URL path segment carries). It is a ``ValueError``: a view
                that passes an id from the client answers 400 for it.
        """
        check_task_id(task_id)
        if self.celery.conf.task_always_eager:
            future: Future[Any] = Future(task_id, app=self.celery)
            result = self.celery.AsyncResult(task_id)
            future.on_event(TaskEvent(task_id, result.state, result.result))
            return future
        if not self.hub.follows_foreign_tasks and not self.hub.knows(task_id):
            raise ResultBackendLimit(
                f"off.get({task_id!r}): the rpc:// result backend sends a result only to the "
                "process that sent the task, so another process cannot follow it. Use a result "
                "backend every process can read: CELERY_RESULT_BACKEND='redis://...' or the "
                "embedded 'sqlite://'."
            )
        return Future(task_id, app=self.celery).follow(self.hub)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...] | list[Any],
                kwargs: dict[str, Any], options: dict[str, Any], producer: Any = None,
                exposed: tuple[type[BaseException], ...] | None = None) -> Future:
        if self.settings.start_local_workers:
            self.workers.ensure_started()
        send = self._prepare(fn, args, kwargs, options)
        return self._send(fn, send, producer, exposed)

    def _prepare(self, fn: Callable[..., Any], args: tuple[Any, ...] | list[Any],
                 kwargs: dict[str, Any], options: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """What to send for one call: (task, apply_async's args, its options)."""
        if _is_task(fn):
            return fn, (args, kwargs), options
        ref = self._reference(fn)
        dotted = ref.replace(":", ".")
        if self._has_routes and "queue" not in options:
            route = self.celery.amqp.router.route({}, dotted, args, kwargs)
            if route.get("queue") is not None:
                options = {**options, "queue": route["queue"]}
        return self._dispatcher, ((ref, list(args), kwargs),), {**options, "shadow": dotted}

    def _reference(self, fn: Callable[..., Any]) -> str:
        # The checks behind reference() import and walk the module:
        # once per function, not once per submit.
        try:
            return self._references[fn]
        except (KeyError, TypeError):  # TypeError: unhashable callable
            ref = reference(fn)
            try:
                self._references[fn] = ref
            except TypeError:
                pass
            return ref

    def _send(self, fn: Callable[..., Any], send: tuple[Any, tuple[Any, ...], dict[str, Any]],
              producer: Any = None, exposed: tuple[type[BaseException], ...] | None = None,
              future: Future | None = None) -> Future:
        """Send one call; ``exposed`` (public error types) marks it for the web task API.

        ``future``: one made earlier for this call's ``task_id`` (a call sent
        when a transaction commits); a new one otherwise.
        """
        task, call_args, options = send
        if producer is not None:
            options = {**options, "producer": producer}
        eager = self.celery.conf.task_always_eager
        follow = not eager and not options.get("ignore_result")
        if not eager:
            # The id (and rpc://'s reply queue) comes first, and the future
            # listens before the message leaves: a fast result is never missed.
            try:
                options = {**self._publish_options, **self.hub.submit_options(), **options}
            except CONNECTION_ERRORS as exc:  # rpc://'s reply queue is on the broker
                raise broker_unreachable(self.celery, exc, "send the task") from exc
        if exposed is not None:
            from celery.utils import uuid

            options = {**options, "task_id": options.get("task_id") or uuid()}
            self._mark_exposed(task, [options["task_id"]], options, exposed)
            if getattr(task, "expose", False):
                options["_offload_marked"] = True  # not again by Task.apply_async
        given = future is not None
        if future is None:
            future = Future(options.get("task_id") or "", app=self.celery)
        future.describe(options.get("shadow") or task.name, options.get("queue"))
        if follow:
            future.follow(self.hub, grace=_delay_of(options))
        try:
            result = task.apply_async(*call_args, **options)
        except EncodeError as exc:
            future.unfollow()
            raise TypeError(
                f"the arguments of {getattr(fn, '__name__', fn)!r} must be JSON-serializable "
                f"(str, int, float, bool, None, list, dict): {exc}"
            ) from None
        except _ResultStoreUnreachable:
            future.unfollow()
            raise
        except BrokerUnavailable as exc:  # from Task.apply_async: said here as submit says it
            future.unfollow()
            cause = exc.__cause__ or exc
            raise broker_unreachable(self.celery, cause, "send the task") from cause
        except CONNECTION_ERRORS as exc:
            future.unfollow()
            raise broker_unreachable(self.celery, exc, "send the task") from exc
        except BaseException:
            future.unfollow()
            raise
        if eager:
            if not given:
                future = Future(result.id, app=self.celery)
                future.describe(options.get("shadow") or task.name, options.get("queue"))
            future.on_event(TaskEvent(result.id, result.state, result.result))
        return future

    def _mark_exposed(self, task: Any, task_ids: list[str], options: Mapping[str, Any],
                      public: tuple[type[BaseException], ...]) -> None:
        """Mark calls for the web task API before they leave (a plain function: by its reference)."""
        name = options.get("shadow") or task.name
        name = name.removesuffix("[chunk]")
        try:
            self.exposures.mark(task_ids, name, (*getattr(task, "public_errors", ()), *public))
        except CONNECTION_ERRORS as exc:
            raise result_store_unreachable(self.celery, exc, "send the task") from exc

    # Workers and monitoring (offload.workers) ------------------------------

    @property
    def workers(self) -> Any:
        """The local worker processes configured by ``CELERY_WORKERS``."""
        if self._workers is None:
            from .workers import LocalWorkers

            self._workers = LocalWorkers(self)
        return self._workers

    @property
    def monitor(self) -> Any:
        """This process's view of every task and worker (:class:`offload.events.Monitor`): the dashboard's source."""
        if self._monitor is None:
            from .events import Monitor

            self._monitor = Monitor(self)
        return self._monitor

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

    def __init__(self, off: Offload, options: dict[str, Any],
                 exposed: tuple[type[BaseException], ...] | None = None) -> None:
        self._off = off
        self._options = options
        #: None, or (expose=True) the error types the web task API may show.
        self._exposed = exposed

    @overload
    def submit(self, fn: Callable[P, Coroutine[Any, Any, R]], /, *args: P.args,
               **kwargs: P.kwargs) -> Future[R]: ...

    @overload
    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]: ...

    @overload  # as Offload.submit's: reachable although mypy says not
    def submit(self, fn: Callable[..., Coroutine[Any, Any, R]], /, *args: Any,  # type: ignore[overload-cannot-match]
               queue: str | None, **kwargs: Any) -> Future[R]: ...

    @overload
    def submit(self, fn: Callable[..., R], /, *args: Any, queue: str | None,  # type: ignore[overload-cannot-match]
               **kwargs: Any) -> Future[R]: ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Send ``fn(*args, **kwargs)`` with these options (``queue=`` is reserved, as in ``off.submit``)."""
        options = dict(self._options)
        if "queue" in kwargs:
            options["queue"] = kwargs.pop("queue")
        return self._off._submit(fn, args, kwargs, options, exposed=self._exposed)

    def submit_call(self, fn: Callable[..., R], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Future[R]:
        """Send ``fn(*args, **kwargs)`` with these options; no keyword is reserved."""
        return self._off._submit(fn, args, kwargs, dict(self._options), exposed=self._exposed)

    @overload
    def map(self, fn: Callable[..., Coroutine[Any, Any, R]], iterable: Iterable[Any], /, *,
            chunksize: int | None = None) -> list[Future[R]]: ...

    @overload
    def map(self, fn: Callable[..., R], iterable: Iterable[Any], /, *,
            chunksize: int | None = None) -> list[Future[R]]: ...

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any], /, *,
            chunksize: int | None = None) -> list[Future[Any]]:
        """Submit ``fn`` once per item; nothing is sent unless every item can be.

        Each item's arguments are checked and encoded before the first
        message leaves, so a bad item in the middle (an argument JSON cannot
        carry) raises ``TypeError`` with nothing half sent.

        Calls go several to a message, which a worker runs in a loop
        (``offload.dispatch_chunk``): each call still has its own future,
        id, state, exception and ``progress()``. By default (``chunksize=None``)
        chunks grow from 1 call to 128, doubling (:func:`chunk_sizes`): the
        first result comes back as fast as a single call's, a large map
        sends one message per 128 calls. ``chunksize=n`` fixes the size;
        ``chunksize=1`` sends one message per call. Chunking applies to
        plain functions on a result backend that stores results (Redis, the
        embedded one, a database); registered tasks, ``ignore_result``,
        rpc:// and eager mode send one message per call, and so does the
        default with an option that bounds a single task (``task_id``,
        ``expires``, ``time_limit``, ``soft_time_limit``, ``link``,
        ``link_error``).
        """
        return self.map_calls(fn, [_arguments(item) for item in iterable], chunksize=chunksize)

    def map_calls(self, fn: Callable[..., R], calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                  *, chunksize: int | None = None) -> list[Future[R]]:
        """Send one call per ``(args, kwargs)`` pair, all through one producer.

        As :meth:`map`: nothing is sent unless every call can be.

        Raises:
            ValueError: ``chunksize`` is not None or a positive int.
            TypeError: an argument is not JSON-serializable, ``fn`` cannot be
                sent, or ``task_id`` is given with ``chunksize``.
            BrokerUnavailable: the broker cannot be reached.
        """
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                      or chunksize < 1):
            raise ValueError(f"chunksize must be None or an int >= 1, got {chunksize!r}")
        off = self._off
        if off.settings.start_local_workers and calls:
            off.workers.ensure_started()
        eager = off.celery.conf.task_always_eager
        if chunksize is None and (_PER_CALL_OPTIONS & self._options.keys()):
            chunksize = 1
        if not eager and chunksize != 1 and self._can_chunk(fn):
            if "task_id" in self._options:
                raise TypeError("task_id= names one task: it cannot be given with chunksize")
            if not calls:
                return []
            # One call's options (queue, routing, shown name) for every chunk;
            # the calls themselves go as [args, kwargs] pairs.
            first = off._prepare(fn, calls[0][0], calls[0][1], dict(self._options))
            pairs = [[list(args), kwargs] for args, kwargs in calls]
            self._check_encodable(fn, pairs)
            return self._send_chunks(fn, first[2], pairs, chunk_sizes(len(pairs), chunksize))
        prepared = [off._prepare(fn, args, kwargs, dict(self._options)) for args, kwargs in calls]
        self._check_encodable(fn, [call_args for _task, call_args, _options in prepared])
        if eager:
            return [off._send(fn, send, exposed=self._exposed) for send in prepared]
        # One producer (one connection) for the whole batch.
        with off.celery.producer_or_acquire() as producer:
            return [off._send(fn, send, producer, self._exposed) for send in prepared]

    def _check_encodable(self, fn: Callable[..., Any], calls: list[Any]) -> None:
        # One encoding of every call's arguments; item by item only to name
        # the one that fails.
        serializer = self._off.celery.conf.task_serializer
        try:
            dumps(calls, serializer=serializer)
            return
        except EncodeError:
            pass
        for index, call_args in enumerate(calls):
            try:
                dumps(call_args, serializer=serializer)
            except EncodeError as exc:
                raise TypeError(
                    f"item {index} of map({getattr(fn, '__name__', fn)!r}, ...) cannot be sent "
                    f"(arguments must be JSON-serializable: str, int, float, bool, None, list, "
                    f"dict); nothing was sent: {exc}"
                ) from None

    def _can_chunk(self, fn: Callable[..., Any]) -> bool:
        # A chunk's calls report through stored results: none with
        # ignore_result, none to read back on rpc://.
        return (not _is_task(fn) and not self._options.get("ignore_result")
                and stores_results(self._off.celery.backend))

    def _send_chunks(self, fn: Callable[..., Any], first_options: dict[str, Any], calls: list[list[Any]],
                     sizes: list[int]) -> list[Future]:
        off = self._off
        ref = off._reference(fn)
        # Queue, routing and the name shown in monitors: as for one call.
        options = {**off._publish_options, **{key: value for key, value in first_options.items() if key != "shadow"}}
        options["shadow"] = f"{first_options['shadow']}[chunk]"
        hub = off.hub
        # A call's id is its chunk's id and its index there (chunk_call_ids):
        # a chunk's worker writes results to no id the message could choose.
        chunk_ids = hub.new_task_ids(len(sizes))
        if self._exposed is not None:
            call_ids = [call_id for chunk_id, size in zip(chunk_ids, sizes)
                        for call_id in chunk_call_ids(chunk_id, size)]
            off._mark_exposed(off._dispatcher, call_ids, first_options, self._exposed)
        name, queue = first_options["shadow"], options.get("queue")
        grace = _delay_of(options)
        maxsize, maxlevels = off.celery.amqp.argsrepr_maxsize, off.celery.conf.task_repr_maxlevels
        futures: list[Future[Any]] = []
        sent = 0
        try:
            with off.celery.producer_or_acquire() as producer:
                # Sent as they are made, group by group: the first chunk at
                # once (workers start on it), then about SEND_GROUP calls'
                # chunks at a time, in one round trip where the transport can
                # (offload-redis). Every future of a group listens before its
                # chunks leave: no result is missed, and the workers run the
                # first chunks while the futures of the last are being made.
                dispatch = off._chunk_dispatcher.apply_async
                pipelined = getattr(producer.channel, "pipelined_puts", None)
                start = index = 0
                while index < len(sizes):
                    group_end = index + 1
                    if index:
                        grouped = sizes[index]
                        while group_end < len(sizes) and grouped < MAP_SEND_GROUP:
                            grouped += sizes[group_end]
                            group_end += 1
                    made: list[Future[Any]] = []
                    group: list[tuple[str, list[list[Any]]]] = []
                    for chunk_id, size in zip(chunk_ids[index:group_end], sizes[index:group_end]):
                        made += [Future(call_id, app=off.celery, name=name, queue=queue)
                                 for call_id in chunk_call_ids(chunk_id, size)]
                        group.append((chunk_id, calls[start:start + size]))
                        start += size
                    Future.follow_all(made, hub, grace=grace)
                    futures += made
                    with pipelined() if pipelined is not None and len(group) > 1 else contextlib.nullcontext():
                        for chunk_id, chunk in group:
                            dispatch((ref, chunk), producer=producer, task_id=chunk_id,
                                     argsrepr=_chunk_argsrepr(ref, chunk, maxsize, maxlevels), **options)
                    sent = len(futures)
                    index = group_end
        except BaseException as exc:
            for future in futures[sent:]:
                future.unfollow()
            if isinstance(exc, CONNECTION_ERRORS) and not isinstance(exc, _ResultStoreUnreachable):
                cause = (exc.__cause__ or exc) if isinstance(exc, BrokerUnavailable) else exc
                raise broker_unreachable(off.celery, cause, "send the tasks") from cause
            raise
        return futures


#: ``map`` sends its chunks as it makes their futures, about this many calls'
#: chunks in one round trip after the first chunk (see _Submitter._send_chunks).
MAP_SEND_GROUP = 512

#: A chunk's arguments as monitors show them: the reference and this many calls.
_REPR_CALLS = 3


def _chunk_argsrepr(ref: str, chunk: list[list[Any]], maxsize: int, maxlevels: int) -> str | None:
    """What a chunk's ``argsrepr`` shows, or None for Celery's own (small chunks).

    Celery would build the repr of the whole chunk, cut to ``maxsize``
    characters (and ``maxlevels`` deep, as here): the walk over a chunk of
    128 calls costs more than sending it.
    The head stays the same, ``('module:qualname', [[args, kwargs], ...``, and
    the count of calls ends it.
    """
    if len(chunk) <= _REPR_CALLS:
        return None
    shown = saferepr((ref, chunk[:_REPR_CALLS]), maxsize, maxlevels=maxlevels)
    if shown.endswith("])"):
        shown = f"{shown[:-2]}, ... {len(chunk)} calls])"
    return str(shown)


def exception_types(value: Any, what: str) -> tuple[type[BaseException], ...]:
    """``value`` (an exception type or several) as a tuple, or TypeError saying what it must be."""
    if isinstance(value, type):
        value = (value,)
    try:
        types = tuple(value)
    except TypeError:
        types = None
    if types is None or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise TypeError(f"{what} is a tuple of exception types, e.g. (ValueError,), got {value!r}")
    return types


def chunk_sizes(total: int, chunksize: int | None) -> list[int]:
    """How ``map`` cuts ``total`` calls into messages.

    ``chunksize=n``: chunks of ``n`` (the last one smaller). ``None``, the
    default: 1, 2, 4, ... calls, doubling up to :data:`MAP_CHUNK_MAX`, and
    never more than ``total / MAP_MIN_CHUNKS`` (rounded up).

    >>> chunk_sizes(10, 4), chunk_sizes(48, None), len(chunk_sizes(10_000, None))
    ([4, 4, 2], [1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3], 85)
    """
    if chunksize is not None:
        largest, size = chunksize, chunksize
    else:
        largest, size = max(1, min(MAP_CHUNK_MAX, -(-total // MAP_MIN_CHUNKS))), 1
    sizes = []
    while total > 0:
        size = min(size, largest, total)
        sizes.append(size)
        total -= size
        size *= 2
    return sizes


def _arguments(item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A map item as a call: a list/tuple is ``*args``, a mapping ``**kwargs``."""
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (list, tuple)):
        return tuple(item), {}
    return (item,), {}
