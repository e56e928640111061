"""Standard JSON in and out of the web task API, with bounds on what is parsed.

Python's ``json`` module reads and writes more than JSON: ``NaN`` and
``Infinity``, and numbers such as ``1e999999`` that become ``inf``. A browser's
``JSON.parse`` refuses those, so the API neither sends them nor starts a task
with them. It also parses without bounds: a body of 100,000 nested brackets
ends in ``RecursionError``, a 5,000-digit integer in an error naming a Python
setting. Here every body is parsed with explicit limits, each said in the
error a client gets:

- :data:`MAX_DEPTH` levels of nested arrays and objects;
- integers of at most :data:`MAX_INT_DIGITS` digits (send larger numbers as
  strings);
- finite numbers only in a task's arguments (:func:`non_finite`).

The body's size is bounded before this, by ``TaskAPI(max_body=...)``.
"""

from __future__ import annotations

import json
import json.encoder
import math
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "JSONError", "dumps", "loads", "non_finite"]

#: The deepest nesting of arrays and objects a request may hold.
MAX_DEPTH = 64
#: The most digits an integer in a request may have.
MAX_INT_DIGITS = 100


class JSONError(ValueError):
    """A body that is not JSON the API accepts; the message says why, for the client."""


class _IntTooLong(ValueError):
    pass


def _parse_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise _IntTooLong(
            f"an integer of {digits} digits: the API accepts integers of at most {MAX_INT_DIGITS} "
            "digits (send a larger number as a string)")
    return int(text)


_DECODER = json.JSONDecoder(parse_int=_parse_int)
_TOO_DEEP = (f"nested deeper than {MAX_DEPTH} levels of arrays and objects: the API accepts at most "
             f"{MAX_DEPTH}")


def loads(body: bytes) -> Any:
    """The JSON document in ``body`` (UTF-8), within the limits above.

    Raises:
        JSONError: not UTF-8, not JSON, too deep, or an integer too long.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONError(f"the body is not UTF-8 text: {exc}") from None
    try:
        document = _DECODER.decode(text)
    except RecursionError:
        # The C scanner recurses per level: far past MAX_DEPTH anyway.
        raise JSONError(f"the body is {_TOO_DEEP}") from None
    except _IntTooLong as exc:
        raise JSONError(f"the body holds {exc}") from None
    except ValueError as exc:
        raise JSONError(f"the body is not valid JSON: {exc}") from None
    if _deeper_than(document, MAX_DEPTH):
        raise JSONError(f"the body is {_TOO_DEEP}")
    return document


def _deeper_than(document: Any, limit: int) -> bool:
    # Iterative: the check itself must not recurse.
    stack = [(document, 1)] if isinstance(document, (list, dict)) else []
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        for child in (value.values() if isinstance(value, dict) else value):
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
    return False


def non_finite(value: Any, name: str) -> str | None:
    """Where ``value`` (called ``name``) holds NaN or an infinity (``args[0]``), or None."""
    stack: list[tuple[Any, str]] = [(value, name)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return where
        elif isinstance(item, dict):
            stack.extend((child, f"{where}[{json.dumps(key)}]") for key, child in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{where}[{index}]") for index, child in enumerate(item))
    return None


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False)
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)


def _c_dumps(data: Any) -> str:
    # What _ENCODER.encode(data) does, without the Python around the C
    # encoder (a closure and the encoder's options, made again on every
    # call): half the time of a small answer. Fresh markers each time: a
    # failed encoding (NaN) leaves its entries behind.
    return "".join(_make_encoder({}, str, encode_basestring_ascii, None, ":", ",", False, False, False)(data, 0))


def _fast_dumps_works() -> bool:
    probe = {"id": "é\n", "state": [1, 2.5, None, True], "x": {"y": object}}
    try:
        if _c_dumps(probe) != _ENCODER.encode(probe):
            return False
        _c_dumps(math.nan)
    except ValueError:
        return True
    except Exception:  # another signature on this Python
        return False
    return False


#: Compact standard JSON; raises ValueError for NaN or an infinity. A value
#: JSON has no type for (a datetime from a custom serializer) is shown as
#: text. One encoder for every answer: json.dumps with options makes a new
#: one per call (and the C encoder straight, where this Python has it).
dumps: Callable[[Any], str] = _c_dumps if _make_encoder is not None and _fast_dumps_works() else _ENCODER.encode
