"""What a report may not carry: the one scrubbing policy of ``offload.errors``.

Every value a report takes from outside (headers, the URL, a task's
arguments) goes through one :class:`Scrubber` before the report leaves the
process. It replaces with ``[Filtered]``:

* the value of any *name* that looks secret: a header, a query or form
  field, a keyword argument, a positional argument (named by the function's
  signature), a key of a nested dict. A name is secret when it contains one
  of :data:`SECRET_NAME_PARTS` (``password``, ``token``, ``key``, ...) or is
  one of :data:`SECRET_NAMES` (OAuth's ``code``, ``pass``, ``pin``, ...);
* the headers of :data:`SECRET_HEADERS` whatever their names say;
* inside anything that looks like a URL (the request's, a ``Referer``, an
  ``X-Original-URL``, an ``X-Forwarded-*`` header, a string argument): its
  ``user:password@``, the secret query parameters (separated by ``&`` or
  ``;``), a bare query token (``?abc123``), and path segments that look like
  tokens (:func:`looks_like_token`: a JWT, or 20+ characters mixing letters
  and digits, as reset links and API keys in paths are) or follow a secret
  name (``/token/abc``);
* strings that are credentials by their shape (``Bearer ...``, a JWT).

Walking a value is bounded (depth, items, text length) and never raises: an
unprintable object, a 5,000-digit integer or a structure nested a hundred
thousand deep becomes a short placeholder. Apps add names with
``offload.errors.setup(off, sinks, scrub_also=["pin", "iban"])``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote_plus

__all__ = ["FILTERED", "SECRET_HEADERS", "SECRET_NAMES", "SECRET_NAME_PARTS", "Scrubber",
           "looks_like_token"]

#: What a scrubbed value is replaced with.
FILTERED = "[Filtered]"
_FILTERED_QUERY = quote(FILTERED)

#: Headers that always carry credentials, whatever the name patterns say.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie",
                            "x-api-key", "x-amz-security-token"})
#: Parts of a name that mark its value as secret (Sentry's default deny-list,
#: as substrings: ``key`` covers api_key and private_key, ``session``
#: sessionid, ``signature`` a presigned URL's, ``pass`` passphrase).
SECRET_NAME_PARTS = ("password", "passwd", "pass", "pwd", "secret", "token", "key", "session",
                     "sessid", "auth", "credential", "csrf", "xsrf", "signature", "jwt", "cookie")
#: Whole names that are secret though no part says so: OAuth's ``code`` (an
#: authorization code), one-time codes, SAML's answer, short signature names.
SECRET_NAMES = frozenset({"code", "pin", "otp", "sig", "sid", "ticket", "nonce", "assertion",
                          "samlresponse", "samlrequest", "client_assertion", "pw", "cvv", "cvc",
                          "ssn", "card", "card_number", "cc"})

#: Bounds of one walk through a value.
MAX_DEPTH = 8
MAX_ITEMS = 50
MAX_TEXT = 2000
#: Digits an integer may have before it is shown by its size (Python refuses
#: str() past 4,300 digits; a report needs no more than a few).
MAX_INT_DIGITS = 100

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+|(?<![\w/])/[^\s\"'<>]*\?[^\s\"'<>]*")
_CREDENTIAL = re.compile(r"^\s*(bearer|basic|digest)\s+\S+|^eyJ[\w-]+\.[\w-]+\.[\w-]*$", re.I)
_TOKENISH = re.compile(r"^[A-Za-z0-9_\-.~+=%]{20,}$")
_JWT = re.compile(r"^eyJ[\w-]+\.[\w-]+")


def looks_like_token(segment: str) -> bool:
    """Whether one URL path segment looks like a secret rather than a route or an id.

    >>> looks_like_token("a8Fq3kZ0pL2mN7xW9vB4cD6e"), looks_like_token("orders"), looks_like_token("12345")
    (True, False, False)
    """
    if _JWT.match(segment):
        return True
    if not _TOKENISH.match(segment):
        return False
    return any(c.isdigit() for c in segment) and any(c.isalpha() for c in segment)


class Scrubber:
    """Replaces secret values with ``[Filtered]`` (see the module docstring for what is secret).

    Parameters:
        names: parts of a name that make it secret (case-insensitive
            substrings); default :data:`SECRET_NAME_PARTS`.
        headers: header names that are always secret; default :data:`SECRET_HEADERS`.
        exact: whole names that are secret; default :data:`SECRET_NAMES`.
        also: names added to ``names`` (what an app adds to the defaults).

    Examples:
        >>> Scrubber().query("q=shoes&api_key=abc;page=2")
        'q=shoes&api_key=%5BFiltered%5D;page=2'
        >>> Scrubber(also=["pin"]).headers({"X-Pin": "1234", "Referer": "https://x/?token=t", "Accept": "*/*"})
        {'X-Pin': '[Filtered]', 'Referer': 'https://x/?token=%5BFiltered%5D', 'Accept': '*/*'}
    """

    def __init__(self, names: Iterable[str] = SECRET_NAME_PARTS,
                 headers: Iterable[str] = SECRET_HEADERS, *, exact: Iterable[str] = SECRET_NAMES,
                 also: Iterable[str] = ()) -> None:
        for label, value in (("names", names), ("headers", headers), ("exact", exact), ("also", also)):
            if isinstance(value, (str, bytes)):
                raise TypeError(f"Scrubber takes lists of names, not a single string ({label}={value!r})")
        parts = [re.escape(str(name).lower()) for name in [*names, *also] if str(name)]
        self._pattern = re.compile("|".join(parts)) if parts else None
        self._headers = frozenset(str(name).lower() for name in headers)
        self._exact = frozenset(str(name).lower() for name in exact)

    def is_secret(self, name: Any) -> bool:
        """Whether a header, query, field or argument name holds a secret."""
        lowered = str(name).lower().strip()
        return lowered in self._headers or lowered in self._exact or (
            self._pattern is not None and self._pattern.search(lowered) is not None)

    # Requests -------------------------------------------------------------

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Secret headers replaced; URLs inside the others scrubbed (Referer, X-Original-URL, ...)."""
        return {name: FILTERED if self.is_secret(name) else self.text(_cut(value))
                for name, value in headers.items()}

    def query(self, query: str) -> str:
        """The query string with secret values replaced; the rest kept as sent.

        Both separators count: ``&``, and ``;`` (which many servers and
        frameworks also split on).
        """
        if not query:
            return ""
        out = []
        for part in re.split(r"([&;])", query):
            if part in ("&", ";", ""):
                out.append(part)
                continue
            name, sep, _value = part.partition("=")
            if not sep:
                # A bare token (``?abc123``) has no name saying it is harmless.
                out.append(_FILTERED_QUERY)
            elif self.is_secret(unquote_plus(name)):
                out.append(f"{name}={_FILTERED_QUERY}")
            else:
                out.append(part)
        return "".join(out)

    def path(self, path: str) -> str:
        """A URL path with token-like segments, and segments after a secret name, replaced."""
        original = path.split("/")
        segments = list(original)
        for i, segment in enumerate(original):
            if not segment:
                continue
            decoded = unquote_plus(segment)
            previous = unquote_plus(original[i - 1].partition(";")[0]) if i else ""
            if looks_like_token(decoded) or (previous and self.is_secret(previous)):
                segments[i] = _FILTERED_QUERY
            elif ";" in segment:  # path parameters: /a;jsessionid=...
                head, _, params = segment.partition(";")
                segments[i] = f"{head};{self.query(params)}"
        return "/".join(segments)

    def url(self, url: str) -> str:
        """A URL (absolute, or a path with a query) with its secrets replaced."""
        rest, hash_, fragment = url.partition("#")
        rest, question, query = rest.partition("?")
        scheme, sep, after = rest.partition("://")
        if sep:
            authority, slash, path = after.partition("/")
            if "@" in authority:
                authority = _FILTERED_QUERY + "@" + authority.rpartition("@")[2]
            rest = f"{scheme}://{authority}{slash}{self.path(path) if slash else ''}"
        else:
            rest = self.path(rest)
        out = rest + (question + self.query(query) if question else "")
        return out + (hash_ + self.query(fragment) if hash_ else "")

    def text(self, text: str) -> str:
        """A free text with any URL in it scrubbed; a credential-shaped text replaced."""
        if _CREDENTIAL.match(text):
            return FILTERED
        if text.startswith("/") and not any(c.isspace() for c in text):
            return self.url(text)  # a path header: X-Original-URL, X-Forwarded-Uri
        if "://" not in text and "?" not in text:
            return text
        return _URL.sub(lambda m: self.url(m.group(0)), text)

    # Values (task arguments) ------------------------------------------------

    def mapping(self, values: Mapping[Any, Any]) -> dict[str, Any]:
        """A mapping's secret-named values replaced, the others walked (see :meth:`value`)."""
        return self.value(values)  # type: ignore[return-value]

    def value(self, value: Any, depth: int = 0) -> Any:
        """A JSON-safe, bounded copy of ``value`` with its secrets replaced; never raises."""
        try:
            return self._value(value, depth)
        except Exception:  # noqa: BLE001 - a report is better than none
            return f"<unprintable {type(value).__name__}>"

    def _value(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, (bool, float)):
            return value
        if isinstance(value, int):
            if value.bit_length() > MAX_INT_DIGITS * 3.33:
                return f"<int of {value.bit_length()} bits>"
            return value
        if isinstance(value, str):
            return self.text(_cut(value))
        if isinstance(value, (bytes, bytearray)):
            return self.text(_cut(bytes(value[:MAX_TEXT]).decode("utf-8", "replace")))
        if depth >= MAX_DEPTH:
            return f"<{type(value).__name__} nested deeper than {MAX_DEPTH}>"
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for i, (key, item) in enumerate(value.items()):
                if i >= MAX_ITEMS:
                    out["..."] = f"{len(value) - MAX_ITEMS} more"
                    break
                name = key if isinstance(key, str) else _cut(repr_safe(key), 100)
                out[name] = FILTERED if self.is_secret(name) else self._value(item, depth + 1)
            return out
        if isinstance(value, (list, tuple, set, frozenset)):
            items = list(value)
            walked = [self._value(item, depth + 1) for item in items[:MAX_ITEMS]]
            if len(items) > MAX_ITEMS:
                walked.append(f"... {len(items) - MAX_ITEMS} more")
            return walked
        return self.text(_cut(repr_safe(value)))

    def arguments(self, args: Iterable[Any], kwargs: Mapping[str, Any],
                  names: list[str] | None = None) -> tuple[list[Any], dict[str, Any]]:
        """A call's arguments scrubbed: positional ones by their parameter ``names`` when known."""
        out = []
        for i, arg in enumerate(list(args)[:MAX_ITEMS]):
            name = names[i] if names is not None and i < len(names) else None
            out.append(FILTERED if name is not None and self.is_secret(name) else self.value(arg, 1))
        return out, self.value(dict(kwargs))


def repr_safe(value: Any) -> str:
    """``repr(value)``, or a placeholder when its ``__repr__`` fails."""
    try:
        return repr(value)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(value).__name__}>"


def _cut(text: Any, limit: int = MAX_TEXT) -> str:
    text = text if isinstance(text, str) else repr_safe(text)
    text = text if len(text) <= limit else text[:limit] + "..."
    # A lone surrogate (bytes a server decoded with surrogateescape) cannot
    # be sent as UTF-8 to a sink: it becomes "?".
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")
