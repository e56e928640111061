"""The result store read and written many tasks at a time, and which kind of store it is.

A chunk of ``map`` calls (:mod:`offload.dispatch`) stores its calls' results
in one batch and reads their states in one; the result hub
(:mod:`offload.hub`) hears those batches on the channel they are published
on. Both ask here which kind of backend they have (Redis, rpc://, one that
stores nothing), so that the answer is written once.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from celery import states

from .transport import REVOKED_BEFORE_START

__all__ = ["REVOKED_BEFORE_START", "OneCallStore", "batches_results", "is_redis", "is_rpc", "read_states",
           "results_channel", "store_results", "stores_results", "with_one_call_store"]

logger = logging.getLogger("offload.result_store")


def stores_results(backend: Any) -> bool:
    """True if ``backend`` keeps states any process can read (not rpc://, not none)."""
    from celery.backends.base import DisabledBackend

    return not isinstance(backend, DisabledBackend) and not is_rpc(backend)


def is_redis(backend: Any) -> bool:
    """True for Celery's Redis result backend (with its client: redis-py is installed)."""
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # redis-py not installed
        return False
    return isinstance(backend, RedisBackend) and hasattr(backend, "client")


def is_rpc(backend: Any) -> bool:
    """True for Celery's rpc:// result backend (results sent back, not stored)."""
    from celery.backends.rpc import RPCBackend

    return isinstance(backend, RPCBackend)


def read_states(backend: Any, task_ids: list[str]) -> dict[str, str]:
    """The stored state of each of ``task_ids`` (missing ones left out), in one read.

    One ``MGET`` on a key-value backend (Redis, the embedded sqlite one),
    one read per id on any other.
    """
    if not task_ids:
        return {}
    found: dict[str, str] = {}
    if hasattr(backend, "mget") and hasattr(backend, "get_key_for_task"):
        values = backend.mget([backend.get_key_for_task(task_id) for task_id in task_ids])
        for task_id, value in zip(task_ids, values):
            if value:
                found[task_id] = backend.decode(value).get("status", states.PENDING)
        return found
    for task_id in task_ids:
        status = backend.get_task_meta(task_id, cache=False).get("status", states.PENDING)
        if status != states.PENDING:
            found[task_id] = status
    return found


def store_results(backend: Any, results: list[tuple[str, str, Any, str | None]]) -> None:
    """Store ``(task_id, state, result or exception, traceback)`` for many tasks at once.

    One pipeline on Redis (each value set and published, as Celery's own
    Redis backend does for one, and all of them published again as one
    message on :func:`results_channel`), one transaction on a backend with
    ``set_many`` (the embedded sqlite one), one write per result elsewhere.
    """
    if not results:
        return
    set_many = getattr(backend, "set_many", None)
    if not hasattr(backend, "get_key_for_task") or (set_many is None and not is_redis(backend)):
        for task_id, state, result, tb in results:
            backend.store_result(task_id, result, state, traceback=tb)
        return
    items = []
    metas = _MetaTemplates(backend)
    for task_id, state, result, tb in results:
        try:
            value = metas.encoded(task_id, state, result, tb)
        except Exception as exc:  # a result JSON cannot carry fails its call alone
            error = TypeError(f"the result of {task_id} cannot be stored: {exc}")
            value = metas.encoded(task_id, states.FAILURE, error, None)
        items.append((backend.get_key_for_task(task_id), value))
    if set_many is not None:
        set_many(items)
        return
    expires = int(backend.expires) if backend.expires else 0
    batches: dict[str, list[str]] = {}
    if batches_results(backend):
        for (_key, value), (task_id, _state, _result, _tb) in zip(items, results):
            text = value.decode() if isinstance(value, bytes) else value
            batches.setdefault(results_channel(task_id[:8]), []).append(text)
    messages = [(channel, "[" + ",".join(values) + "]") for channel, values in batches.items()]
    if _stored_by_script(backend, items, expires, messages):
        return
    # No MULTI/EXEC: each SET and PUBLISH stands alone (a reader sees each
    # result whole either way), and a transaction costs the pipeline two
    # more commands and the server a queue of all of them.
    with backend.client.pipeline(transaction=False) as pipe:  # a Redis backend here
        for key, value in items:
            if expires:
                pipe.set(key, value, ex=expires)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
        for channel, message in messages:
            pipe.publish(channel, message)
        pipe.execute()


#: What :func:`store_results` runs on Redis: each result SET (with its expiry)
#: and PUBLISHed under its key, as Celery's Redis backend does for one task,
#: then each batch message PUBLISHed. KEYS: the result keys. ARGV: the
#: seconds to keep them (0: for good), the number of batch messages, their
#: (channel, message) pairs, then one value per key.
_STORE_SCRIPT = """
local ex = tonumber(ARGV[1])
local batches = tonumber(ARGV[2])
local first = 2 + 2 * batches
for i, key in ipairs(KEYS) do
    local value = ARGV[first + i]
    if ex > 0 then
        redis.call('SET', key, value, 'EX', ex)
    else
        redis.call('SET', key, value)
    end
    redis.call('PUBLISH', key, value)
end
for b = 1, batches do
    redis.call('PUBLISH', ARGV[1 + 2 * b], ARGV[2 + 2 * b])
end
return #KEYS
"""

#: The scripts registered on each Redis client, by their source (None: the
#: server refused it, and that client does without). Held weakly: a client
#: goes with its backend.
_scripts: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _script(client: Any, source: str) -> Any:
    """``source`` registered on ``client``; None if the server refused it before."""
    try:
        registered = _scripts.setdefault(client, {})
    except TypeError:  # a client that cannot be held weakly
        return None
    if source not in registered:
        registered[source] = client.register_script(source)
    return registered[source]


def _refused(client: Any, source: str, exc: BaseException, instead: str) -> bool:
    """If ``exc`` says the server takes no scripts: ``client`` does without ``source`` from now on."""
    if not _refuses_scripts(exc):
        return False
    logger.warning("the result store refused the store script (%s); %s", exc, instead)
    _scripts.setdefault(client, {})[source] = None
    return True


def _stored_by_script(backend: Any, items: list[tuple[Any, Any]], expires: int,
                      messages: list[tuple[str, str]]) -> bool:
    """Store ``items`` and publish ``messages`` in one script call; False if the server takes no scripts.

    One command in place of two per result: a flush of 128 results is one
    reply to read rather than 257, a third of a chunk's time on a worker.
    """
    client = backend.client
    script = _script(client, _STORE_SCRIPT)
    if script is None:
        return False
    args: list[Any] = [expires, len(messages)]
    for channel, message in messages:
        args += (channel, message)
    args += (value for _key, value in items)
    try:
        script(keys=[key for key, _value in items], args=args)
    except Exception as exc:
        from redis.exceptions import ResponseError

        if not isinstance(exc, ResponseError):
            raise  # the connection: the caller's, as a pipeline's would be
        # This flush goes by the pipeline, which reports an error of the data
        # itself as before. A server where scripting is off or not allowed
        # (a managed Redis may refuse EVAL) stores by pipeline from now on.
        _refused(client, _STORE_SCRIPT, exc, "storing with a pipeline")
        return False
    return True


def _refuses_scripts(exc: BaseException) -> bool:
    """Whether a Redis error says the server takes no scripts (off, or not for this user)."""
    from redis.exceptions import NoPermissionError, ResponseError

    if isinstance(exc, NoPermissionError):
        return True
    text = str(exc).lower()
    return isinstance(exc, ResponseError) and (
        "unknown command" in text or "noperm" in text or "not allowed" in text or "no permissions" in text)


def results_channel(prefix: str) -> str:
    """The Redis channel where a chunk's results are published together.

    A chunk stores and publishes each call's result under its own key, as
    Celery does for a task (so ``AsyncResult.get()`` and ``off.get(id)`` in
    any process hear of it), and also publishes all of them in one message
    on this channel, named after the first 8 characters of the call ids:
    the submitting process's result hub reads one message per flush
    instead of one per call (:class:`offload.hub.ResultHub`).
    """
    return f"offload-results-{prefix}"


def batches_results(backend: Any) -> bool:
    """True when stored results can be published as one JSON array (JSON, no compression)."""
    return (is_redis(backend) and getattr(backend, "serializer", None) == "json"
            and not getattr(backend, "compression", None))


class _MetaTemplates:
    """The stored meta of many results, built from one template per state.

    Celery builds a stored meta in a private method; using it keeps the
    format exactly what every reader of this backend expects
    (tests/test_map.py fails if it changes). It is called once per state in
    a batch, not once per result: most of its cost is the timezone-aware
    ``date_done``, the same for results stored in one flush.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.templates: dict[str, dict[str, Any]] = {}

    def encoded(self, task_id: str, state: str, result: Any, tb: str | None) -> Any:
        backend = self.backend
        template = self.templates.get(state)
        if template is None:
            template = self.templates[state] = backend._get_result_meta(
                result=None, state=state, traceback=None, request=None)
        meta = dict(template, result=backend.encode_result(result, state), traceback=tb)
        meta["task_id"] = task_id
        return backend.encode(meta)


#: What :class:`OneCallStore` runs for one result: Celery's Redis backend
#: reads the stored meta first and leaves a SUCCESS as it is (a lost
#: worker's late write must not overwrite it), then SETs and PUBLISHes the
#: new meta: two round trips, here one. A STARTED is not written over a
#: REVOKED either: the task was cancelled before it ran. KEYS: the result
#: key. ARGV: the meta, the seconds to keep it (0: for good), 1 when the
#: meta is a STARTED. Returns 1 if stored, 0 if a SUCCESS stays, -1 if the
#: task was revoked before it started.
_STORE_ONE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' then
        if meta['status'] == 'SUCCESS' then
            return 0
        end
        if meta['status'] == 'REVOKED' and ARGV[3] == '1' then
            return -1
        end
    end
end
local ex = tonumber(ARGV[2])
if ex > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ex)
else
    redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class OneCallStore:
    """A mixin for Celery's Redis result backends: a task's state stored in one round trip.

    Celery stores each state of a task (STARTED, then SUCCESS or FAILURE)
    with a GET, to leave a SUCCESS already there alone, then a
    SET + PUBLISH: four round trips a task in the worker's pool process.
    This does the same in one script call per state, with the same meta,
    key, expiry and message. A server that refuses scripts (a managed Redis
    without EVAL) gets Celery's own way from then on.

    The STARTED it stores also tells whether the task was revoked in the
    backend before it ran (``Future.cancel()`` records REVOKED for workers
    that never heard the broadcast): then nothing is written, and the
    request is marked :data:`REVOKED_BEFORE_START` for the task to skip its
    function (offload's task base does). So the worker's consumer need not
    read every task's state as it receives it
    (:class:`offload.futures.SkipRevoked`).
    """

    #: The pool process's STARTED store tells a revoked task apart (see above).
    checks_revoked_on_start = True

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        backend: Any = self
        script = _script(backend.client, _STORE_ONE_SCRIPT)
        if script is None:
            return super()._store_result(task_id, result, state, traceback=traceback,  # type: ignore[misc]
                                         request=request, **kwargs)
        from celery.exceptions import BackendStoreError
        from kombu.utils.encoding import bytes_to_str

        meta = backend._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = backend.encode(meta)
        if isinstance(value, str) and len(value) > backend._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = backend.failure_expires if state == states.FAILURE else None
        if expires is None:
            expires = backend.expires
        started = state == states.STARTED
        try:
            stored = backend.ensure(script, ([backend.get_key_for_task(task_id)],
                                             [value, int(expires or 0), 1 if started else 0]))
        except Exception as exc:
            if not _refused(backend.client, _STORE_ONE_SCRIPT, exc, "storing as Celery does"):
                raise
            return super()._store_result(task_id, result, state, traceback=traceback,  # type: ignore[misc]
                                         request=request, **kwargs)
        if started and stored == -1 and request is not None:
            setattr(request, REVOKED_BEFORE_START, True)
        return result


def with_one_call_store(backend_cls: type) -> type:
    """``backend_cls`` with :class:`OneCallStore` if it is a Redis result backend, else as it is."""
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:
        return backend_cls
    if not issubclass(backend_cls, RedisBackend) or issubclass(backend_cls, OneCallStore):
        return backend_cls
    return type(backend_cls.__name__, (OneCallStore, backend_cls), {"__module__": __name__})
