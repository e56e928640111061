"""``GET {prefix}/openapi.json``: an OpenAPI 3.1 document of the API.

The fixed routes are described once; each exposed task adds
``POST {prefix}/tasks/{short name}`` whose body schema comes from the
function's signature and type hints (``int``, ``float``, ``str``, ``bool``,
lists, dicts, optionals; anything else is left open).
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from ..ids import PATTERN as TASK_ID_PATTERN
from .names import signature_of
from .schema import matches, schema_of

__all__ = ["matches", "openapi_document", "schema_of"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "message"], "properties": {
        "type": {"type": "string"}, "message": {"type": "string"}}}},
}

_SNAPSHOT: dict[str, Any] = {
    "type": "object",
    "required": ["id", "state"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "examples": ["PENDING", "STARTED", "PROGRESS", "SUCCESS", "FAILURE"]},
        "progress": {},
        "result": {},
        "error": {"type": "object", "required": ["type", "message"],
                  "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
    },
}

def _task_body(task: Any) -> dict[str, Any]:
    sig = signature_of(task)
    if sig is None:
        return {"type": "object", "properties": {"args": {"type": "array"}, "kwargs": {"type": "object"}},
                "additionalProperties": False}
    try:
        hints = typing.get_type_hints(getattr(task.run, "__func__", task.run))
    except Exception:  # a hint naming something not importable here
        hints = {}
    positional, named, required, prefix = [], {}, [], []
    # Each argument without a default must come positionally (args holds
    # enough items) or by name (kwargs has it): one anyOf per argument.
    needed: list[dict[str, Any]] = []
    var_args = var_kwargs = False
    for param in sig.parameters.values():
        schema = schema_of(hints.get(param.name, param.annotation))
        if param.default is not inspect.Parameter.empty and _jsonable(param.default):
            schema = {**schema, "default": param.default}
        if param.kind is param.VAR_POSITIONAL:
            var_args = True
        elif param.kind is param.VAR_KEYWORD:
            var_kwargs = True
        else:
            if param.kind is not param.KEYWORD_ONLY:
                positional.append(param.name)
                prefix.append(schema)
            if param.kind is not param.POSITIONAL_ONLY:
                named[param.name] = schema
            if param.default is inspect.Parameter.empty:
                required.append(param.name)
                ways = []
                if param.kind is not param.KEYWORD_ONLY:
                    ways.append({"required": ["args"], "properties": {"args": {"minItems": len(prefix)}}})
                if param.kind is not param.POSITIONAL_ONLY:
                    ways.append({"required": ["kwargs"], "properties": {"kwargs": {"required": [param.name]}}})
                needed.append(ways[0] if len(ways) == 1 else {"anyOf": ways})
    args_schema: dict[str, Any] = {"type": "array"}
    if prefix:  # an empty prefixItems is not a valid schema
        args_schema["prefixItems"] = prefix
    if not var_args:
        args_schema["maxItems"] = len(prefix)
    kwargs_schema: dict[str, Any] = {"type": "object", "properties": named}
    if not var_kwargs:
        kwargs_schema["additionalProperties"] = False
    body: dict[str, Any] = {
        "type": "object",
        "properties": {"args": args_schema, "kwargs": kwargs_schema},
        "additionalProperties": False,
        "description": f"Arguments of {sig}: positional in args, by name in kwargs. Required: "
                       + (", ".join(required) or "none") + ".",
    }
    if needed:
        body["allOf"] = needed
    return body


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Malformed request", 403: "Refused by authorize", 404: "No such task or route",
            405: "Method not allowed", 411: "A chunked body this server cannot read", 413: "Body too large",
            415: "The body is not sent as application/json", 422: "Arguments do not fit the signature",
            503: "Broker or result store unreachable"}
    return {str(code): _json(_ERROR, text[code]) for code in codes}


def openapi_document(api: Any) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``api`` (a :class:`offload.web.TaskAPI`)."""
    p = api.prefix
    task_id = {"name": "id", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": TASK_ID_PATTERN}}
    paths: dict[str, Any] = {}
    for short, task in api.tasks:
        doc = inspect.getdoc(task.run) or ""
        body = _task_body(task)
        paths[f"{p}/tasks/{short}"] = {"post": {
            "operationId": f"start_{short}".replace(".", "_"),
            "summary": doc.splitlines()[0] if doc else f"Start {task.name}",
            "description": doc,
            "tags": ["tasks"],
            "requestBody": {"required": "allOf" in body, "content": {"application/json": {"schema": body}}},
            "responses": {
                "202": {**_json({"type": "object", "required": ["id"], "properties": {
                    "id": {"type": "string"}, "state": {"type": "string"}, "location": {"type": "string"}}},
                    "Started"), "headers": {"Location": {"schema": {"type": "string"}}}},
                **_errors(400, 403, 404, 411, 413, 415, 422, 503),
            },
        }}
    paths[f"{p}/tasks/{{id}}"] = {
        "get": {
            "operationId": "task_status", "summary": "A task's state, progress and result or error",
            "parameters": [task_id, {"name": "wait", "in": "query", "required": False,
                                     "description": f"wait up to this many seconds (at most {api.max_wait:g}) "
                                                    "for the task to end",
                                     "schema": {"type": "number", "minimum": 0}}],
            "responses": {"200": _json(_SNAPSHOT, "The task's snapshot"), **_errors(400, 403, 404, 503)},
        },
        "delete": {
            "operationId": "task_cancel", "summary": "Revoke a task (running work only with terminate=true)",
            "parameters": [task_id, {"name": "terminate", "in": "query", "required": False,
                                     "schema": {"type": "boolean"}}],
            "responses": {"200": _json({**_SNAPSHOT, "properties": {
                **_SNAPSHOT["properties"], "cancelled": {"type": "boolean"}}}, "Revoked, or too late"),
                **_errors(400, 403, 404, 503)},
        },
    }
    paths[f"{p}/tasks/{{id}}/events"] = {"get": {
        "operationId": "task_events", "summary": "Server-sent events: each state change, then the end",
        "parameters": [task_id],
        "responses": {"200": {"description": "An event stream: each event's data is a task snapshot",
                              "content": {"text/event-stream": {"schema": {
                                  "type": "object", "required": ["data"], "properties": {
                                      "data": {"type": "string", "contentMediaType": "application/json",
                                               "contentSchema": _SNAPSHOT},
                                      "event": {"type": "string"}, "id": {"type": "string"},
                                      "retry": {"type": "integer"}}}}}},
                      **_errors(400, 403, 404, 503)},
    }}
    paths[f"{p}/rpc"] = {"post": {
        "operationId": "jsonrpc", "summary": "JSON-RPC 2.0: the exposed tasks, task.status, task.result, task.cancel",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {}},
                                                      "application/json-rpc": {"schema": {}}}},
        "responses": {"200": _json({"type": ["object", "array"]}, "JSON-RPC answer(s)"),
                      "204": {"description": "Only notifications"}, **_errors(411, 413, 415)},
    }}
    paths[f"{p}/openapi.json"] = {"get": {
        "operationId": "openapi", "summary": "This document",
        "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
    }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "offload task API", "version": "1",
                 "description": "Start exposed tasks and follow them (offload.web)."},
        "paths": paths,
    }
