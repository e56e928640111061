"""Setting spellings, type coercion, and the translation of a config into settings.

offload reads one flat mapping (Flask's ``app.config``, Pyramid's settings, a
dict, the environment) and turns it into Celery settings plus offload's own
(:func:`translate`, a pure function). Each Celery setting may be spelled as
Celery does (``broker_url``), with a Pyramid-style prefix
(``celery.broker_url``), with a Flask-style prefix (``CELERY_BROKER_URL``) or
as one of Celery's old uppercase names that is Celery's own
(``CELERY_ALWAYS_EAGER``, ``BROKER_URL``; not ``S3_BUCKET``, which in a Flask
config is the app's). Strings (from ini files or the environment) are coerced
with the types of Celery's own setting definitions, so nothing here drifts
from Celery.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from celery.app.defaults import NAMESPACES, Option, _TO_NEW_KEY, flatten
from celery.utils.serialization import strtobool
from kombu import Queue
from kombu.serialization import registry as serializers
from kombu.utils.url import as_url, maybe_sanitize_url

from .datadir import DEFAULT_FOLDER_NAME, fallback_data_dir
from .dispatch import check_allow
from .exceptions import ConfigurationError

__all__ = [
    "AMQP_PUBLISH_RETRY_POLICY", "AMQP_TRANSPORT_DEFAULTS", "REDIS_TRANSPORT_DEFAULTS",
    "RELIABILITY_DEFAULTS", "Settings", "default_data_dir", "is_setting", "read_settings", "translate",
]

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
    # Task events feed the dashboard (offload.events): workers report each
    # task's life, and the sender reports "sent", so tasks of every process
    # of the app are seen, not only the dashboard's own.
    "worker_send_task_events": True,
    "task_send_sent_event": True,
    "broker_connection_retry_on_startup": True,
    "worker_cancel_long_running_tasks_on_connection_loss": True,
    # A worker checks each message before Celery reads it, and dead-letters
    # what offload never sends: one forged message cannot stop it.
    "worker_consumer": "offload.intake:Consumer",
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

#: RabbitMQ broker: without publisher confirms a publish returns once the
#: message is in the local socket buffer, so a submit during a network cut
#: "succeeds" and the task is lost. With ``confirm_publish`` each publish waits
#: for the broker's ack; ``confirm_timeout`` (offload's own key, read by
#: :meth:`offload.Offload.submit`; kombu ignores it) bounds that wait, after
#: which the submit raises ``BrokerUnavailable``. ``{"confirm_publish": False}``
#: in ``broker_transport_options`` turns confirms off.
AMQP_TRANSPORT_DEFAULTS: dict[str, Any] = {
    "confirm_publish": True,
    "confirm_timeout": 1.0,
}

#: RabbitMQ's publish retry policy, unless ``task_publish_retry_policy`` is
#: configured: after an unconfirmed publish (1 s) kombu reconnects before it
#: gives up, and each attempt may take ``broker_connection_timeout`` (2 s).
#: One retry keeps a submit during a network cut within 5 s (1 + 2 x 2).
AMQP_PUBLISH_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 1,
}

#: Settings naming serializers, which the pickle guard reads.
_SERIALIZER_SETTINGS = ("task_serializer", "result_serializer", "accept_content",
                        "result_accept_content", "event_serializer")

#: Celery's old names without a Celery prefix (``S3_BUCKET``, ``REDIS_HOST``,
#: ``CONTROL_EXCHANGE``) are a web app's own keys too often to be taken from
#: a shared config: they are read only with a prefix (``CELERY_S3_BUCKET``).
_OLD_NAME_PREFIXES = ("CELERY", "BROKER_")

#: Celery 2's broker settings (``BROKER_HOST``, ...). Celery 3 built the broker
#: URL from them; Celery 5 keeps the names but a URL always wins, and with
#: no URL offload would run on its embedded broker: offload builds the URL.
_BROKER_PARTS = ("broker_host", "broker_port", "broker_user", "broker_password", "broker_vhost")
#: Celery 2's names of RabbitMQ transports (``BROKER_BACKEND``), some gone from kombu.
_AMQP_TRANSPORTS = frozenset({"amqp", "amqplib", "pyamqp", "py-amqp", "librabbitmq", "amqps"})
#: Celery 2's names that Celery's own table of old names lacks.
_CELERY2_NAMES = {"BROKER_BACKEND": "broker_transport"}

#: Celery's setting definitions, by their current lowercase name.
CELERY_OPTIONS: dict[str, Option] = dict(flatten(NAMESPACES))

#: offload's own keys (they are not Celery settings) and their defaults.
OFFLOAD_KEYS: dict[str, Any] = {
    "CELERY_START_LOCAL_WORKERS": False,
    "CELERY_WORKERS": 1,
    "CELERY_QUEUES": None,
    "CELERY_ROUTES": None,
    "OFFLOAD_ALLOW": None,
    "OFFLOAD_DATA_DIR": None,
    "OFFLOAD_ALLOW_PICKLE": False,
}

_PREFIXES = ("celery.", "celery_", "CELERY_")


@dataclass
class Settings:
    """What :func:`read_settings` found in a mapping, or :func:`translate` made of it."""

    #: Celery settings, by their current lowercase names, values coerced:
    #: as given (:func:`read_settings`) or complete (:func:`translate`).
    celery: dict[str, Any] = field(default_factory=dict)
    start_local_workers: bool = False
    workers: int | list[str] | dict[str, dict[str, Any]] = 1
    queues: list[str] | None = None
    routes: dict[str, Any] | None = None
    #: ``OFFLOAD_ALLOW`` as given, or (translated) the packages allowed.
    allow: list[str] | None = None
    data_dir: str | None = None
    allow_pickle: bool = False

    def __repr__(self) -> str:
        # Broker and backend URLs carry passwords: mask them, as Celery does.
        shown = {key: maybe_sanitize_url(value) if isinstance(value, str) and "://" in value else value
                 for key, value in self.celery.items()}
        return (f"Settings(celery={shown!r}, start_local_workers={self.start_local_workers!r}, "
                f"workers={self.workers!r}, queues={self.queues!r}, routes={self.routes!r}, "
                f"allow={self.allow!r}, data_dir={self.data_dir!r}, allow_pickle={self.allow_pickle!r})")


def celery_key(key: str) -> str | None:
    """The current Celery name for one spelling of a setting, or None.

    >>> celery_key("CELERY_BROKER_URL"), celery_key("celery.result_backend")
    ('broker_url', 'result_backend')
    >>> celery_key("CELERY_ALWAYS_EAGER"), celery_key("DEBUG") is None
    ('task_always_eager', True)
    >>> celery_key("S3_BUCKET") is None, celery_key("CELERY_S3_BUCKET")
    (True, 's3_bucket')
    """
    if key in CELERY_OPTIONS:
        return key
    if key in _CELERY2_NAMES:
        return _CELERY2_NAMES[key]
    if key in _TO_NEW_KEY and key.startswith(_OLD_NAME_PREFIXES):
        return _TO_NEW_KEY[key]
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for candidate in (rest, rest.lower()):
                if candidate in CELERY_OPTIONS:
                    return candidate
            if rest.upper() in _TO_NEW_KEY:
                return _TO_NEW_KEY[rest.upper()]
    return None


def is_setting(key: str) -> bool:
    """Whether offload or Celery reads ``key`` (in any of its spellings).

    >>> is_setting("CELERY_BROKER_URL"), is_setting("celery.workers"), is_setting("SECRET_KEY")
    (True, True, False)
    """
    return _own_key(key) in OFFLOAD_KEYS or celery_key(key) is not None


def _own_key(key: str) -> str:
    return key.upper().replace(".", "_") if key.lower().startswith(("celery", "offload")) else key


def coerce(name: str, value: Any) -> Any:
    """Coerce a string ``value`` to the type Celery declares for ``name``.

    Non-strings are returned unchanged: a Python config already has types.

    >>> coerce("task_always_eager", "true"), coerce("worker_concurrency", "4")
    (True, 4)
    >>> coerce("task_default_rate_limit", "10/m")
    '10/m'
    """
    if not isinstance(value, str):
        return value
    option = CELERY_OPTIONS.get(name)
    kind = option.type if option is not None else "string"
    kind = {int: "int", float: "float", str: "string", "str": "string", "bytes": "string"}.get(kind, kind)
    text = value.strip()
    try:
        if kind == "any":
            # Celery leaves these untyped (worker_concurrency: None means "one
            # per CPU"); a whole number in an ini file still means a number.
            return int(text) if text.lstrip("-").isdigit() else value
        if kind == "string":
            return value
        if text.lower() in ("", "none", "null") and option is not None and option.default is None:
            return None
        if kind == "bool":
            return strtobool(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind in ("list", "tuple"):
            if text.startswith("["):
                items = json.loads(text)
            else:
                items = [item for item in text.replace(",", " ").split() if item]
            return tuple(items) if kind == "tuple" else list(items)
        if kind == "dict":
            return json.loads(text) if text else {}
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"setting {name!r} expects a {kind}, got {value!r}: {exc}"
        ) from None
    return value


def _coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, str):
        try:
            return bool(strtobool(value.strip()))
        except (KeyError, ValueError, TypeError):
            raise ConfigurationError(f"{key} expects true or false, got {value!r}") from None
    return bool(value)


#: Counts spelled out: ``CELERY_WORKERS = "two"`` means a count, not one worker named ``two``.
_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())

_WORKERS_FORMS = ("a count (2, or \"2\" in an ini file), a list of names (['foo', 'bar'], or "
                  "\"foo, bar\") or a dict of name -> options ({'foo': {'queues': ['high']}})")


def _coerce_workers(value: Any) -> int | list[str] | dict[str, dict[str, Any]]:
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        if text.lower() in _NUMBER_WORDS:
            raise ConfigurationError(
                f"CELERY_WORKERS = {value!r} is a count in words: write it as a number. "
                f"CELERY_WORKERS takes {_WORKERS_FORMS}")
        if text[:1] in "[{":
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ConfigurationError(f"CELERY_WORKERS is not valid JSON ({exc}): {value!r}") from None
        else:
            return [name for name in text.replace(",", " ").split() if name]
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple, Mapping)):
        raise ConfigurationError(f"CELERY_WORKERS takes {_WORKERS_FORMS}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigurationError(f"CELERY_WORKERS must not be negative, got {value}")
        return value
    if isinstance(value, Mapping):
        for name, options in value.items():
            if options is not None and not isinstance(options, Mapping):
                raise ConfigurationError(
                    f"CELERY_WORKERS[{name!r}] takes a dict of worker options "
                    f"({{'concurrency': 2, 'queues': ['high']}}), got {options!r}")
        return {str(name): dict(options or {}) for name, options in value.items()}
    return [str(name) for name in value]


def _names(key: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return [str(item) for item in json.loads(text)]
        return [item for item in text.replace(",", " ").split() if item]
    try:
        return [str(item) for item in value]
    except TypeError:
        raise ConfigurationError(f"{key} takes a list of names, got {value!r}") from None


def _closest(key: str) -> str:
    spellings = [f"CELERY_{name.upper()}" for name in CELERY_OPTIONS] + list(OFFLOAD_KEYS)
    spellings += [key for key in _TO_NEW_KEY if key.startswith(_OLD_NAME_PREFIXES)]
    match = difflib.get_close_matches(key.upper(), spellings, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def read_settings(mapping: Mapping[str, Any] | None) -> Settings:
    """Split ``mapping`` into Celery settings and offload's own, as given.

    No defaults are added (that is :func:`translate`'s job).
    Keys that are neither (``DEBUG``, ``SECRET_KEY``, ...) belong to the web
    framework and are ignored, but a ``CELERY_``/``celery.`` key that matches
    nothing gets a warning naming the closest valid key, because a typo there
    otherwise silently runs with a default.
    """
    settings = Settings()
    if mapping is None:
        return settings
    if not isinstance(mapping, Mapping):
        raise ConfigurationError(
            f"Offload's config must be a mapping (dict, Flask config, Pyramid "
            f"settings), got {type(mapping).__name__}"
        )
    for key, value in mapping.items():
        if not isinstance(key, str):
            continue
        own = _own_key(key)
        if own in OFFLOAD_KEYS:
            _read_own(settings, own, value)
            continue
        name = celery_key(key)
        if name is not None:
            settings.celery[name] = coerce(name, value)
        elif key.startswith(_PREFIXES) or key.startswith("OFFLOAD_"):
            warnings.warn(f"unknown setting {key!r}{_closest(key)}", UserWarning, stacklevel=3)
    return settings


def _read_own(settings: Settings, key: str, value: Any) -> None:
    if key == "CELERY_START_LOCAL_WORKERS":
        settings.start_local_workers = _coerce_bool(key, value)
    elif key == "CELERY_WORKERS":
        settings.workers = _coerce_workers(value)
    elif key == "CELERY_QUEUES":
        settings.queues = _names(key, value)
    elif key == "CELERY_ROUTES":
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else None
        settings.routes = value
    elif key == "OFFLOAD_ALLOW":
        settings.allow = _names(key, value)
    elif key == "OFFLOAD_DATA_DIR":
        settings.data_dir = str(value) if value else None
    elif key == "OFFLOAD_ALLOW_PICKLE":
        settings.allow_pickle = _coerce_bool(key, value)


def translate(mapping: Mapping[str, Any] | None, *, default_data_dir: str | None = None,
              default_allow: Iterable[str] = ()) -> Settings:
    """The complete settings for ``mapping``: Celery's and offload's own.

    A pure function of its arguments: offload's reliability defaults under
    the user's settings, the embedded broker and backend when no broker is
    set, Redis transport defaults, queues and the user's routes as a tuple
    in ``celery["task_routes"]``, the allow-list checked.

    Parameters:
        mapping: the config (a dict, Flask's ``app.config``, Pyramid's settings).
        default_data_dir: ``OFFLOAD_DATA_DIR`` when the mapping has none
            (see :func:`default_data_dir`); else ``./instance``.
        default_allow: ``OFFLOAD_ALLOW`` when the mapping has none.

    Raises:
        ConfigurationError: for a value offload cannot use: pickle without
            ``OFFLOAD_ALLOW_PICKLE``, an allow-list naming the standard
            library or offload, a malformed ``sqlite://`` URL, ...

    >>> settings = translate({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"},
    ...                      default_data_dir="/srv/app", default_allow=["myapp"])
    >>> settings.celery["result_backend"], settings.allow, settings.data_dir
    ('redis://127.0.0.1:6379/0', ['myapp'], '/srv/app')
    """
    from .transport import default_settings, expand_sqlite_urls

    settings = read_settings(mapping)
    celery_settings = dict(RELIABILITY_DEFAULTS)
    celery_settings.update(settings.celery)
    _read_old_broker_settings(celery_settings)
    if not settings.allow_pickle:
        _refuse_pickle(celery_settings)
    settings.allow = list(check_allow(settings.allow if settings.allow is not None else default_allow))
    settings.data_dir = os.path.abspath(
        settings.data_dir or default_data_dir or fallback_data_dir())
    if not celery_settings.get("broker_url"):
        for key, value in default_settings(settings.data_dir).items():
            celery_settings.setdefault(key, value)
    expand_sqlite_urls(celery_settings, settings.data_dir)
    removed_backend = None
    if str(celery_settings.get("result_backend") or "").strip().lower() in ("amqp", "amqp://"):
        removed_backend = celery_settings.pop("result_backend")
    scheme = str(celery_settings["broker_url"]).partition("://")[0]
    if scheme in ("offload-redis", "offload+redis", "offload+rediss"):
        # offload's Redis transport named in the URL (offload+redis:// is
        # another spelling: kombu reads "a+b://" as transport "a"): a Redis
        # broker like any other, so it gets the Redis defaults below. Without
        # them kombu's defaults apply (a lease of an hour, swept every 100 s): a
        # message a worker held when Redis went away came back an hour later.
        redis_scheme = "redis" if scheme == "offload-redis" else scheme.partition("+")[2]
        celery_settings["broker_url"] = redis_scheme + str(celery_settings["broker_url"])[len(scheme):]
        celery_settings["broker_transport"] = "offload-redis"
        scheme = redis_scheme
    if scheme in ("redis", "rediss"):
        options = dict(REDIS_TRANSPORT_DEFAULTS)
        options.update(celery_settings.get("broker_transport_options") or {})
        celery_settings["broker_transport_options"] = options
        celery_settings.setdefault("result_backend", celery_settings["broker_url"])
        # Redis with the atomic take (offload.transport.redis): a worker
        # cut off between taking and recording a message loses nothing.
        celery_settings.setdefault("broker_transport", "offload-redis")
    elif scheme in ("amqp", "amqps", "pyamqp"):
        options = dict(AMQP_TRANSPORT_DEFAULTS)
        options.update(celery_settings.get("broker_transport_options") or {})
        celery_settings["broker_transport_options"] = options
        if "task_publish_retry_policy" not in settings.celery:
            celery_settings["task_publish_retry_policy"] = dict(AMQP_PUBLISH_RETRY_POLICY)
        # Not Celery's rpc://: it sends a result only to the process that
        # sent the task, so a second web process (or a plain GET after a
        # long-poll) never sees it. The embedded store is readable by every
        # process of this machine; across machines, set a shared backend.
        celery_settings.setdefault("result_backend", default_settings(settings.data_dir)["result_backend"])
    if removed_backend is not None:
        warnings.warn(
            f"CELERY_RESULT_BACKEND = {removed_backend!r} (the AMQP result backend of Celery 2 and 3) "
            f"was removed in Celery 5: offload uses {celery_settings.get('result_backend')!r} instead. "
            "Set CELERY_RESULT_BACKEND to 'rpc://', a 'redis://' URL or 'sqlite://' (the embedded store).",
            UserWarning, stacklevel=3)
    if settings.queues:
        default = celery_settings.get("task_default_queue", "celery")
        names = [default] + [q for q in settings.queues if q != default]
        celery_settings["task_queues"] = [Queue(name, routing_key=name) for name in names]
    routes = celery_settings.get("task_routes") or settings.routes or ()
    if isinstance(routes, (dict, str)) or callable(routes):
        routes = (routes,)
    celery_settings["task_routes"] = tuple(routes)
    settings.celery = celery_settings
    return settings


def _read_old_broker_settings(celery_settings: dict[str, Any]) -> None:
    """Put Celery 2's ``BROKER_HOST``, ``BROKER_USER``, ... together into ``broker_url``.

    As Celery 2 and 3 did: RabbitMQ (``amqp``) unless ``BROKER_BACKEND`` /
    ``BROKER_TRANSPORT`` names another transport, on ``localhost``, port 5672
    and vhost ``/`` by default. With a ``BROKER_URL`` given too, the URL says
    where the broker is, and a warning names the settings left unused.
    """
    parts = {key: celery_settings.pop(key) for key in _BROKER_PARTS if key in celery_settings}
    parts = {key: value for key, value in parts.items() if value not in (None, "")}
    if not parts:
        return
    names = ", ".join(f"BROKER_{key[len('broker_'):].upper()}" for key in parts)
    if celery_settings.get("broker_url"):
        warnings.warn(
            f"{names} ignored: the broker URL ({maybe_sanitize_url(str(celery_settings['broker_url']))}) "
            "says where the broker is. Put them in CELERY_BROKER_URL, or drop them.",
            UserWarning, stacklevel=4)
        return
    transport = str(celery_settings.get("broker_transport") or "amqp").strip().lower()
    amqp = transport in _AMQP_TRANSPORTS
    # The transport goes by the URL's scheme ("amqplib" is gone from kombu,
    # and redis gets offload's own transport as any redis:// URL does).
    celery_settings.pop("broker_transport", None)
    scheme = "amqp" if amqp else transport
    vhost = str(parts.get("broker_vhost", "/" if amqp else "")).strip()
    path = vhost if vhost in ("", "/") else quote(vhost, safe="")
    # Any: kombu's type comment says int and str, yet None is its own default for each.
    fields: dict[str, Any] = {"port": parts.get("broker_port") or (5672 if amqp else None),
                              "user": parts.get("broker_user"), "password": parts.get("broker_password"),
                              "path": path or None}
    celery_settings["broker_url"] = as_url(scheme, host=str(parts.get("broker_host") or "localhost"), **fields)


def _serializer_name(value: Any) -> str:
    """A serializer's name, whether spelled as a name or as a MIME type."""
    text = str(value).strip().lower()
    return serializers.type_to_name.get(text, text)


def _refuse_pickle(celery_settings: Mapping[str, Any]) -> None:
    for key in _SERIALIZER_SETTINGS:
        value = celery_settings.get(key)
        values = [value] if isinstance(value, str) else list(value or ())
        if any("pickle" in _serializer_name(v) for v in values):
            raise ConfigurationError(
                f"{key}={value!r} would let a message run arbitrary code on a "
                "worker; offload uses JSON. Set OFFLOAD_ALLOW_PICKLE=True if every "
                "producer on the broker is trusted."
            )


def default_data_dir(module: str) -> str:
    """Where an app made in ``module`` keeps its data when ``OFFLOAD_DATA_DIR`` is unset.

    ``instance/`` next to the app's top-level package, as Flask does, for an
    app in a source tree or a script; ``./instance`` in the current folder
    for an app imported from an installed package (``site-packages``,
    ``dist-packages``), whose folder is not the app's to write in, or from
    no file at all.
    """
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path:
        return fallback_data_dir()
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(module.count(".")):
        folder = os.path.dirname(folder)
    if os.path.basename(folder) in ("site-packages", "dist-packages"):
        return fallback_data_dir()
    return os.path.join(folder, DEFAULT_FOLDER_NAME)
