"""Cross-origin rules of the task API: one policy, applied by the WSGI and ASGI adapters.

Written here rather than taken from a library: Starlette's ``CORSMiddleware``
speaks only ASGI (and wraps ``send`` for every answer, which at thousands of
long-polls ending together cost a fifth of the event loop's time), and the
WSGI CORS packages are either tied to one framework (flask-cors) or no
longer kept. The rules are few: a preflight, and the headers of an answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from ..exceptions import ConfigurationError

__all__ = ["CorsConfig"]

#: What the API's routes answer to.
METHODS = ("GET", "POST", "DELETE", "OPTIONS")
#: Response headers a page may read besides the safelisted ones.
EXPOSE = ("Location", "Retry-After")
_PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_problem(origin: object) -> str | None:
    """Why ``origin`` can never equal a browser's ``Origin`` header, or None when it can.

    A browser sends ``scheme://host[:port]``: scheme and host in lower
    case, no path, no trailing slash, no default port. The API compares
    origins exactly (a pattern would be easy to get wrong), so anything
    else would silently match no one.
    """
    if not isinstance(origin, str):
        return "it is not a string"
    parts = urlsplit(origin)
    if (not _SCHEME.fullmatch(parts.scheme) or not parts.netloc or parts.path or parts.query
            or parts.fragment or "@" in parts.netloc or origin.endswith(("?", "#"))):
        return "an origin is 'scheme://host[:port]', with no path (not even a trailing slash)"
    if origin != origin.lower():
        return f"browsers send the scheme and host in lower case: use {origin.lower()!r}"
    try:
        port = parts.port
    except ValueError:
        return "its port is not a number from 0 to 65535"
    if port is not None and _DEFAULT_PORTS.get(parts.scheme) == port:
        return (f"browsers leave the default port out of an origin: use "
                f"{parts.scheme}://{parts.hostname!s}")
    return None


class CorsConfig:
    """Which origins may call the API from a browser, and how.

    Raises:
        ConfigurationError: ``"*"`` together with credentials (a browser
            refuses it, and it would hand every site the user's cookies), or
            an origin no browser ever sends (see :func:`origin_problem`).
    """

    def __init__(self, origins: Sequence[str], *, credentials: bool = False, max_age: int = 600) -> None:
        if isinstance(origins, str):
            raise ConfigurationError(f"cors_origins is a list of origins, got the string {origins!r}")
        origins = tuple(origins)
        for origin in origins:
            problem = None if origin == "*" else origin_problem(origin)
            if problem is not None:
                raise ConfigurationError(f"cors_origins: {origin!r} would never match a browser's origin: {problem}")
        self.allow_all = "*" in origins
        if self.allow_all and credentials:
            raise ConfigurationError(
                "cors_origins=['*'] with cors_credentials=True would let any site act with the user's "
                "cookies; list the origins instead.")
        if not isinstance(max_age, int) or max_age < 0:
            raise ConfigurationError(f"cors_max_age is a number of seconds >= 0, got {max_age!r}")
        self.origins = frozenset(o for o in origins if o != "*")
        self.credentials = bool(credentials)
        self.max_age = max_age
        # Where CORS is on, every answer varies by Origin, also one to a
        # request without it: else a shared cache could hand a page of an
        # allowed origin the copy made for no origin (no Allow-Origin).
        self._no_origin = [("Vary", "Origin")] if origins else []

    def is_allowed(self, origin: str) -> bool:
        return self.allow_all or origin in self.origins

    def preflight(self, origin: str, headers: Mapping[str, str]) -> tuple[int, list[tuple[str, str]]]:
        """Status and headers answering an ``OPTIONS`` preflight."""
        out = [("Vary", _PREFLIGHT_VARY), ("Access-Control-Allow-Methods", ", ".join(METHODS)),
               ("Access-Control-Max-Age", str(self.max_age))]
        requested = headers.get("access-control-request-headers")
        if requested:
            out.append(("Access-Control-Allow-Headers", requested))
        if self.credentials:
            out.append(("Access-Control-Allow-Credentials", "true"))
        method_ok = headers.get("access-control-request-method", "") in METHODS
        if not self.is_allowed(origin) or not method_ok:
            # No Access-Control-Allow-Origin: the browser refuses the call.
            return 400, out
        out.append(("Access-Control-Allow-Origin", "*" if self.allow_all and not self.credentials else origin))
        return 200, out

    def simple(self, origin: str | None) -> list[tuple[str, str]]:
        """Headers added to an actual answer (never an allow for a disallowed origin)."""
        if origin is None:
            return self._no_origin
        out = [("Vary", "Origin")]
        if self.is_allowed(origin):
            out.append(("Access-Control-Allow-Origin",
                        "*" if self.allow_all and not self.credentials else origin))
            out.append(("Access-Control-Expose-Headers", ", ".join(EXPOSE)))
            if self.credentials:
                out.append(("Access-Control-Allow-Credentials", "true"))
        return out
