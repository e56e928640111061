"""Where reports go: a bug tracker (FogBugz's BugzScout), a webhook, a logger.

A sink is any object with ``name`` and ``send(report)``. ``send`` returns when
the report is accepted and raises :class:`SinkUnavailable` for a failure worth
retrying (a timeout, a refused connection, a 5xx) or :class:`SinkRefused` when
the receiver answered that it will not take the report (retrying would not
help). Sinks run on workers, inside the sending task, never in a request.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ..exceptions import OffloadError
from .capture import render_extra

logger = logging.getLogger("offload.errors")

__all__ = ["FogBugz", "Log", "Sink", "SinkRefused", "SinkUnavailable", "Webhook"]

#: Seconds for connecting to and hearing from a sink's server.
DEFAULT_TIMEOUT = 10.0
#: Characters of a FogBugz answer that are parsed.
MAX_ANSWER = 64 * 1024


class SinkUnavailable(OffloadError):
    """The sink could not take the report now; the sending task retries later."""


class SinkRefused(OffloadError):
    """The sink answered that it will not take the report; it is dropped (and logged)."""


@runtime_checkable
class Sink(Protocol):
    """What the sending task needs of a sink."""

    name: str

    def send(self, report: Mapping[str, Any]) -> None:
        """Deliver one report, or raise SinkUnavailable / SinkRefused."""


def _check_url(url: Any, what: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"{what} takes an http:// or https:// URL, got {url!r}")
    return url


def _post(url: str, timeout: float, **kwargs: Any) -> Any:
    import httpx  # the `errors` extra; imported where used so the request path never pays for it

    try:
        response = httpx.post(url, timeout=timeout, **kwargs)
    except httpx.HTTPError as exc:
        raise SinkUnavailable(f"POST {url} failed: {exc!r}") from exc
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise SinkUnavailable(f"POST {url} answered {response.status_code}")
    if response.status_code >= 400:
        raise SinkRefused(f"POST {url} answered {response.status_code}: {response.text[:200]}")
    return response


class FogBugz:
    """FogBugz's BugzScout: one form POST per report to ``scoutSubmit.asp``.

    FogBugz files reports with the same description under one case and counts
    them; ``force_new_bug`` opens a case for each. Its answer is an XML
    document, ``<Success>...</Success>`` or ``<Error>...</Error>``; an
    ``<Error>`` (unknown user, project or area) is a refusal, not a delivery.

    Examples:
        >>> FogBugz("https://example.fogbugz.com/scoutSubmit.asp", user="Bug Reporter",
        ...         project="Inbox", area="Undecided")
        <FogBugz https://example.fogbugz.com/scoutSubmit.asp project='Inbox' area='Undecided'>
    """

    name = "fogbugz"

    def __init__(self, url: str, user: str, project: str, area: str, *,
                 default_message: str | None = None, friendly_response: bool | None = None,
                 force_new_bug: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = _check_url(url, "FogBugz")
        for label, value in (("user", user), ("project", project), ("area", area)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"FogBugz needs a non-empty {label} (a string), got {value!r}")
        self.user, self.project, self.area = user, project, area
        self.default_message = default_message
        self.friendly_response = friendly_response
        self.force_new_bug = bool(force_new_bug)
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"<FogBugz {self.url} project={self.project!r} area={self.area!r}>"

    def form(self, report: Mapping[str, Any]) -> dict[str, str]:
        """The BugzScout form fields for one report."""
        fields = dict(report.get("fields") or {})
        form = {
            "ScoutUserName": str(fields.get("user", self.user)),
            "ScoutProject": str(fields.get("project", self.project)),
            "ScoutArea": str(fields.get("area", self.area)),
            "Description": str(report.get("description") or "error"),
            "Extra": render_extra(report),
        }
        default_message = fields.get("default_message", self.default_message)
        if default_message is not None:
            form["ScoutDefaultMessage"] = str(default_message)
        friendly = fields.get("friendly_response", self.friendly_response)
        if friendly is not None:
            form["FriendlyResponse"] = "1" if friendly else "0"
        if fields.get("force_new_bug", self.force_new_bug):
            form["ForceNewBug"] = "1"
        return form

    def send(self, report: Mapping[str, Any]) -> None:
        """Post BugzScout's form; SinkRefused for FogBugz's ``<Error>`` answer."""
        response = _post(self.url, self.timeout, data=self.form(report))
        parse_answer(response.text)


def parse_answer(text: str) -> str:
    """The message of a BugzScout answer; SinkRefused for ``<Error>``.

    Any other answer that came with a 2xx status (XML of another shape, a
    proxy's page, nothing) is taken as delivered, with a warning: the server
    had the form, and posting it again would file it again. Only a failed
    connection, a timeout or a 5xx is retried (see :func:`_post`).

    >>> parse_answer("<?xml version='1.0'?><Success>Case 42 updated</Success>")
    'Case 42 updated'
    """
    try:
        # BugzScout's answer is a line; a bigger one is not worth parsing.
        root = ET.fromstring(text.strip()[:MAX_ANSWER])
    except ET.ParseError:
        logger.warning("FogBugz answered something that is not BugzScout XML (not posted again): %r",
                       text[:200])
        return ""
    message = (root.text or "").strip()
    if root.tag == "Success":
        return message
    if root.tag == "Error":
        raise SinkRefused(f"FogBugz refused the report: {message}")
    for child in root.iter():
        if child.tag == "Error":
            raise SinkRefused(f"FogBugz refused the report: {(child.text or '').strip()}")
    logger.warning("FogBugz answered an unexpected <%s> document (not posted again): %r",
                   root.tag, text[:200])
    return message


class Webhook:
    """A JSON POST of the whole report to ``url`` (any 2xx is a delivery)."""

    name = "webhook"

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = _check_url(url, "Webhook")
        self.headers = dict(headers or {})
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"<Webhook {self.url}>"

    def send(self, report: Mapping[str, Any]) -> None:
        """Post the report as JSON; SinkRefused for a 4xx, SinkUnavailable for a 5xx or no answer."""
        _post(self.url, self.timeout, json=dict(report), headers=self.headers)


class Log:
    """Writes each report to a logger (``offload.errors`` unless given)."""

    name = "log"

    def __init__(self, logger: logging.Logger | str | None = None, level: int = logging.ERROR) -> None:
        if isinstance(logger, str) or logger is None:
            logger = logging.getLogger(logger or "offload.errors")
        self.logger = logger
        self.level = level

    def __repr__(self) -> str:
        return f"<Log {self.logger.name}>"

    def send(self, report: Mapping[str, Any]) -> None:
        """Log the report's description and details at ``level``."""
        self.logger.log(self.level, "%s\n%s", report.get("description"), render_extra(report))
