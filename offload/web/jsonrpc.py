"""JSON-RPC 2.0 (and 1.0) at ``POST {prefix}/rpc``.

The methods are the exposed tasks' names (a call starts the task; its result
is the task id) and three of the API's own:

- ``task.status`` (``[id]`` or ``{"id": ...}``): the object
  ``GET {prefix}/tasks/{id}`` answers;
- ``task.result`` (``[id, timeout]`` or ``{"id", "timeout"}``): waits up to
  ``timeout`` seconds (capped by ``max_wait``); the task's result, or an
  error in the server range;
- ``task.cancel`` (``[id]`` or ``{"id", "terminate"}``): revokes, as
  ``DELETE {prefix}/tasks/{id}`` does.

Batches and notifications follow the specification; no answer carries a
stack trace. One request waits at most ``max_wait`` seconds in all, however
many ``task.result`` calls its batch holds. A call without a ``"jsonrpc"``
member is JSON-RPC 1.0 (older clients such as Pyjamas' ``JSONProxy``): it is
answered in 1.0's form, ``{"result", "error", "id"}``, and an ``"id"`` of
null makes it a notification, as 1.0 says. The body is sent as
``application/json`` or ``application/json-rpc``. Written here rather than
taken from a JSON-RPC package: the protocol is a few rules, and the calls
must run as the API's steps (waits that hold no thread under ASGI), which no
server package allows.
"""

from __future__ import annotations

import math
import time
from typing import Any

from . import strict_json
from .steps import HTTPError, Handler, RequestInfo, Response, Steps, json_response, parse_task_id

__all__ = ["PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS", "INTERNAL_ERROR",
           "TASK_FAILED", "FORBIDDEN", "UNAVAILABLE", "NOT_FINISHED", "UNKNOWN_TASK", "handle_rpc"]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: The server range (-32000 to -32099): the task failed or was revoked.
TASK_FAILED = -32000
#: ``authorize`` refused the call.
FORBIDDEN = -32001
#: The broker or the result store could not be reached.
UNAVAILABLE = -32002
#: ``task.result``: the task did not end within the timeout.
NOT_FINISHED = -32003
#: ``task.status`` / ``task.result`` / ``task.cancel``: no task with this id is served here.
UNKNOWN_TASK = -32004

#: The most calls one batch may hold.
MAX_BATCH = 100

_HTTP_TO_RPC = {403: FORBIDDEN, 404: METHOD_NOT_FOUND, 422: INVALID_PARAMS, 400: INVALID_PARAMS}


class RPCError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def _error(code: int, message: str, request_id: Any = None, data: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": RPCError(code, message, data).to_json(), "id": request_id}


def _answer(version: str, request_id: Any, result: Any = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """An answer in the call's own version of the protocol."""
    if version == "1.0":  # 1.0: both members, always; the other one null
        return {"result": result, "error": error, "id": request_id}
    if error is not None:
        return {"jsonrpc": "2.0", "error": error, "id": request_id}
    return {"jsonrpc": "2.0", "result": result, "id": request_id}


def handle_rpc(api: Any, request: RequestInfo, body: bytes) -> Handler:
    """Answer one JSON-RPC request or batch."""
    try:
        document = strict_json.loads(body)
    except strict_json.JSONError as exc:
        return json_response(200, _error(PARSE_ERROR, f"Parse error: {exc}"))
    # One bound for the whole request: a batch of task.result calls shares it.
    deadline = time.monotonic() + api.max_wait
    if isinstance(document, list):
        if not document:
            return json_response(200, _error(INVALID_REQUEST, "Invalid Request: an empty batch"))
        if len(document) > MAX_BATCH:
            return json_response(200, _error(INVALID_REQUEST, f"Invalid Request: over {MAX_BATCH} calls in one batch"))
        answers = []
        for call in document:
            answer = yield from _one(api, request, call, deadline)
            if answer is not None:
                answers.append(answer)
        return json_response(200, answers) if answers else Response(204)
    answer = yield from _one(api, request, document, deadline)
    return json_response(200, answer) if answer is not None else Response(204)


def _valid_id(value: Any) -> bool:
    # NaN or an infinity (JSON has neither) would be echoed back as non-JSON.
    return value is None or isinstance(value, str) or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def _one(api: Any, request: RequestInfo, call: Any, deadline: float) -> Steps[dict[str, Any] | None]:
    """One call's answer, or None for a notification."""
    if not isinstance(call, dict):
        return _error(INVALID_REQUEST, "Invalid Request: a call is a JSON object")
    request_id = call.get("id")
    version = "1.0" if "jsonrpc" not in call else "2.0"
    # 2.0: a call without "id" is a notification; 1.0: one whose id is null.
    notification = request_id is None if version == "1.0" else "id" not in call
    if ((version == "2.0" and call["jsonrpc"] != "2.0") or not isinstance(call.get("method"), str)
            or not _valid_id(request_id) or not isinstance(call.get("params", []), (list, dict))):
        shown_id = request_id if _valid_id(request_id) else None
        if version == "1.0":
            return _answer(version, shown_id, error=RPCError(
                INVALID_REQUEST, 'Invalid Request: {"method": str, "params": list, "id": ...}').to_json())
        return _error(INVALID_REQUEST,
                      'Invalid Request: {"jsonrpc": "2.0", "method": str, "params": list or object, "id": ...}',
                      shown_id)
    try:
        result = yield from _dispatch(api, request, call["method"], call.get("params", []), deadline)
    except RPCError as exc:
        return None if notification else _answer(version, request_id, error=exc.to_json())
    except HTTPError as exc:
        code = _HTTP_TO_RPC.get(exc.status, INTERNAL_ERROR)
        if exc.status == 503:
            code = UNAVAILABLE
        elif exc.kind == "UnknownTaskId":
            code = UNKNOWN_TASK
        error = RPCError(code, exc.message, {"type": exc.kind}).to_json()
        return None if notification else _answer(version, request_id, error=error)
    return None if notification else _answer(version, request_id, result)


def _param(params: list[Any] | dict[str, Any], index: int, name: str, default: Any = ...) -> Any:
    if isinstance(params, list):
        if index < len(params):
            return params[index]
    elif name in params:
        return params[name]
    if default is ...:
        raise RPCError(INVALID_PARAMS, f"Invalid params: missing {name!r}")
    return default


def _task_id(api: Any, params: Any) -> str:
    raw = _param(params, 0, "id")
    if not isinstance(raw, str):
        raise RPCError(INVALID_PARAMS, "Invalid params: the task id is a string")
    try:
        return parse_task_id(raw)
    except HTTPError as exc:
        raise RPCError(INVALID_PARAMS, f"Invalid params: {exc.message}") from None


def _failure(shown: dict[str, Any]) -> RPCError:
    return RPCError(TASK_FAILED, f"{shown['error']['type']}: {shown['error']['message']}", shown)


def _dispatch(api: Any, request: RequestInfo, method: str, params: Any, deadline: float) -> Steps[Any]:
    from ..exceptions import BrokerUnavailable, _ResultStoreUnreachable

    if method == "task.status":
        task_id = _task_id(api, params)
        exposure = yield from api.find_exposed(request, task_id)
        snap = yield from api.snapshot(task_id, 0.0)
        return api.present(snap, exposure)[0]
    if method == "task.result":
        task_id = _task_id(api, params)
        timeout = _param(params, 1, "timeout", api.max_wait)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not (
                math.isfinite(timeout) and timeout >= 0):
            raise RPCError(INVALID_PARAMS, "Invalid params: timeout is a number of seconds >= 0")
        exposure = yield from api.find_exposed(request, task_id)
        left = max(0.0, deadline - time.monotonic())
        snap = yield from api.snapshot(task_id, min(float(timeout), api.max_wait, left))
        shown = api.present(snap, exposure)[0]
        if not snap.final:
            raise RPCError(NOT_FINISHED, "the task has not finished yet", shown)
        if "error" in shown:
            raise _failure(shown)
        return shown["result"]
    if method == "task.cancel":
        task_id = _task_id(api, params)
        terminate = _param(params, 1, "terminate", False) is True
        return (yield from api.cancel(request, task_id, terminate))
    task = api.tasks.find(method)
    if task is None:
        raise RPCError(METHOD_NOT_FOUND, f"Method not found: no exposed task named {method!r}")
    yield from api.check_authorized(request, task.name)
    args, kwargs = (params, {}) if isinstance(params, list) else ([], params)
    try:
        task_id = yield from api.start(task, args, kwargs)
    except _ResultStoreUnreachable:
        raise RPCError(UNAVAILABLE, "the result store is unreachable or busy; try again shortly") from None
    except BrokerUnavailable:
        raise RPCError(UNAVAILABLE, "the task broker is unreachable; try again shortly") from None
    return task_id
