"""What a task id is: the one rule every entry point that takes one checks.

An id offload or Celery makes is a UUID (``c7f6a7c5-897b-4c01-89b4-e1cc3f2a30d5``),
but a caller may choose its own (``off.options(task_id="report-2024-05")``,
Celery's ``apply_async(task_id=...)``). Whatever its source, a task id is

* 1 to 255 characters,
* each an ASCII letter or digit or one of ``- . _ ~ ! $ & ' ( ) * + , ; = : @``,
* and neither ``.`` nor ``..``.

Those are the characters a URL path segment carries as they are (RFC 3986's
``pchar`` without percent-escapes), so an id is safe in
``{prefix}/tasks/{id}``, in a Redis key and in a log line; the two
dot segments are left out because a browser or proxy would resolve them as
paths. What breaks the rule (a space, a ``/``, a control character, anything
outside ASCII, a whole request body) is refused before it reaches a result
backend, where it could only read as PENDING.

``off.get``, ``off.options(task_id=...)``, Pyramid's
``request.get_task_result`` (:class:`InvalidTaskId`, a ``ValueError``), the
web task API (400 ``BadTaskId``), a worker's intake (which dead-letters a
message whose id breaks it) and Django's ``TaskBackend.get_result`` check it
with :func:`check_task_id` or :func:`is_task_id`.

>>> check_task_id("c7f6a7c5-897b-4c01-89b4-e1cc3f2a30d5")
'c7f6a7c5-897b-4c01-89b4-e1cc3f2a30d5'
>>> is_task_id("report:2024-05"), is_task_id("a b"), is_task_id("../etc")
(True, False, False)
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

from .exceptions import InvalidTaskId

__all__ = ["MAX_TASK_ID", "PATTERN", "RULE", "TASK_ID", "InvalidTaskId", "check_task_id", "is_task_id"]

MAX_TASK_ID = 255
"""The longest task id (Celery's are 36 characters; one chosen by the app
may be longer, but not a whole request body)."""

PATTERN = r"^(?!\.\.?$)[A-Za-z0-9._~!$&'()*+,;=:@-]{1,%d}$" % MAX_TASK_ID
"""The rule as a regular expression, in the syntax Python and JSON Schema
(ECMAScript) share: the web task API's OpenAPI document shows it as the
pattern of a task id in a path."""

TASK_ID = re.compile(PATTERN)
""":data:`PATTERN` compiled; a task id matches it whole (``TASK_ID.fullmatch``)."""

RULE = (f"a task id is 1 to {MAX_TASK_ID} characters, each an ASCII letter or digit or one of "
        "- . _ ~ ! $ & ' ( ) * + , ; = : @ (and not '.' or '..')")
"""The rule in words, as the errors say it."""


def is_task_id(value: Any) -> TypeGuard[str]:
    """Whether ``value`` can be a task id (a str that keeps the rule above)."""
    return isinstance(value, str) and TASK_ID.fullmatch(value) is not None


def check_task_id(value: Any) -> str:
    """``value`` if it can be a task id, else :class:`InvalidTaskId` saying the rule.

    >>> check_task_id("no such id")
    Traceback (most recent call last):
      ...
    offload.exceptions.InvalidTaskId: 'no such id' is not a task id: a task id is 1 to 255 characters, ...
    """
    if is_task_id(value):
        return value
    shown = value if not isinstance(value, str) or len(value) <= 60 else value[:60] + "..."
    raise InvalidTaskId(f"{shown!r} is not a task id: {RULE}")
