"""JSON Schema of a task's type hints, and the check that a JSON value fits one.

``openapi.json`` publishes these schemas for each exposed task's body, and
:mod:`offload.web.names` checks the arguments of a call over HTTP against
them: one reading of the type hints for both.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

__all__ = ["matches", "schema_of"]


_SCALARS: dict[Any, dict[str, Any]] = {
    int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
    bool: {"type": "boolean"}, type(None): {"type": "null"}, list: {"type": "array"},
    dict: {"type": "object"}, tuple: {"type": "array"},
}


def schema_of(hint: Any) -> dict[str, Any]:
    """The JSON schema of a type hint, as far as JSON can carry it."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint in _SCALARS:
        return dict(_SCALARS[hint])
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        return {"anyOf": [schema_of(a) for a in args]}
    if origin in (list, tuple, set, frozenset) or origin is typing.Sequence:
        items = schema_of(args[0]) if args and args[-1] is not Ellipsis and len(args) == 1 else {}
        return {"type": "array", "items": items} if items else {"type": "array"}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema_of(args[1])} if len(args) == 2 else {"type": "object"}
    if origin is typing.Literal:
        return {"enum": list(args)}
    return {}


_JSON_TYPES: dict[str, Any] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def matches(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` fits a schema made by :func:`schema_of` (that subset only)."""
    if "anyOf" in schema:
        return any(matches(value, s) for s in schema["anyOf"])
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind is not None and not _JSON_TYPES[kind](value):
        return False
    if "items" in schema:
        return all(matches(v, schema["items"]) for v in value)
    if "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return all(matches(v, schema["additionalProperties"]) for v in value.values())
    return True
