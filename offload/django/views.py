"""offload's web task API served by a Django view (the same routes, not a copy).

``path("offload/", include("offload.django.urls"))`` mounts
:class:`offload.web.TaskAPI` (and its dashboard, where this offload has
one) under ``/offload/``. The view hands Django's request to the API's WSGI
app, so that Django's middleware stays in charge: sessions and auth give
``request.user``, and CSRF is checked as for any view (a browser POST or
DELETE needs the ``X-CSRFToken`` header; reading states and following
events are safe methods and need none).

``authorize`` by default: a task may be started or cancelled by a signed-in
user, read by whoever holds its id, the dashboard (``/offload/dashboard``, ``/offload/metrics``) is for
staff only (``is_staff``). Build your own with :func:`task_api_view` for
other rules. The dashboard's forms carry a CSRF token of the dashboard's own
(a cookie it sets, sent back in the form), so :func:`urlpatterns` exempts
its routes from Django's CSRF check and no other.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["default_authorize", "django_request", "task_api_view", "urlpatterns_for"]

#: Where the Django request travels in the WSGI environ the API sees
#: (``request_info.raw[REQUEST_KEY]`` in an ``authorize`` hook).
REQUEST_KEY = "offload.django.request"

#: The dashboard's actions (``authorize(request_info, action)``); the API's
#: other names are tasks' full Celery names.
_DASHBOARD_ACTIONS = frozenset({"dashboard", "dashboard.revoke", "dashboard.retry", "dashboard.dismiss",
                                "metrics"})


def django_request(request_info: Any) -> Any:
    """The Django ``HttpRequest`` behind a :class:`offload.web.RequestInfo`, or None."""
    raw = getattr(request_info, "raw", None)
    return raw.get(REQUEST_KEY) if isinstance(raw, dict) else None


def default_authorize(request_info: Any, name: str) -> bool:
    """Signed-in users start and cancel tasks; staff alone reaches the dashboard.

    Reading a task (its state, result, events) is open to whoever holds its
    id, among the tasks marked for the web (``expose=True``): an id is a
    random UUID that the page which started the task was given.
    """
    request = django_request(request_info)
    user = getattr(request, "user", None)
    signed_in = bool(user is not None and user.is_authenticated and user.is_active)
    if name in _DASHBOARD_ACTIONS:
        return signed_in and bool(getattr(user, "is_staff", False))
    if name != "task.cancel" and getattr(request_info, "task_id", None) is not None:
        return True
    return bool(signed_in)


def _make_api(off: Any, prefix: str, options: dict[str, Any]) -> Any:
    from ..web import TaskAPI

    return TaskAPI(off, prefix=prefix, dashboard=True, **options)


def task_api_view(*, authorize: Callable[[Any, str], bool] | None = default_authorize,
                  offload: Any = None, **options: Any) -> Callable[..., Any]:
    """A Django view serving the task API; ``urls.py`` mounts it.

    Parameters:
        authorize: ``authorize(request_info, name) -> bool``
            (:func:`default_authorize`; :func:`django_request` gives the
            Django request from ``request_info``).
        offload: the Offload (default: :func:`offload.django.get_offload`).
        options: the rest of :class:`offload.web.TaskAPI`'s options
            (``cors_origins``, ``max_body``, ...).
    """
    apis: dict[str, Any] = {}

    def view(request: Any, subpath: str = "") -> Any:
        from django.http import HttpResponse, StreamingHttpResponse

        from . import get_offload

        path = request.path
        prefix = path[: len(path) - len(subpath)].rstrip("/") if subpath else path.rstrip("/")
        api = apis.get(prefix)
        if api is None:
            # One API per place it is mounted (a URLconf has few).
            api = apis[prefix] = _make_api(offload or get_offload(), prefix,
                                           {"authorize": authorize, **options})
        environ = _environ(request, path, api.max_body)
        answer: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer["status"], answer["headers"] = int(status.split(" ", 1)[0]), headers

        body: Iterable[bytes] = api.wsgi(environ, start_response)
        if isinstance(body, list):
            response: Any = HttpResponse(b"".join(body), status=answer["status"])
        else:
            response = StreamingHttpResponse(body, status=answer["status"])
        for name, value in answer["headers"]:
            if name.lower() == "set-cookie":
                # Into Django's cookie jar, where Django (and its test client) keeps cookies.
                response.cookies.load(value)
            elif name.lower() != "content-length" or isinstance(body, list):
                response[name] = value
        return response

    # Django's CSRF middleware checks POST and DELETE: nothing here exempts them.
    return view


def urlpatterns_for(view: Callable[..., Any]) -> list[Any]:
    """The URL patterns of a :func:`task_api_view` (``include()`` them under a prefix).

    The dashboard's routes check the dashboard's own CSRF token and are
    exempt from Django's; every other route goes through Django's CSRF check.
    """
    from django.urls import re_path
    from django.views.decorators.csrf import csrf_exempt

    return [
        re_path(r"^(?P<subpath>dashboard(?:/.*)?)$", csrf_exempt(view), name="dashboard"),
        re_path(r"^(?P<subpath>.*)$", view, name="api"),
    ]


def _environ(request: Any, path: str, max_body: int) -> dict[str, Any]:
    """A WSGI environ for the API from a Django request (WSGI or ASGI)."""
    environ = dict(getattr(request, "environ", None) or request.META)
    declared = request.META.get("CONTENT_LENGTH") or ""
    body = b""
    if request.method in ("POST", "PUT", "PATCH"):
        # Past the API's limit the body is not read at all: the API answers 413.
        too_large = declared.strip().isdigit() and int(declared) > max_body
        body = b"" if too_large else request.body
        length = declared if too_large else str(len(body))
    else:
        length = "0"
    environ.update({
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": request.META.get("QUERY_STRING", ""),
        "CONTENT_LENGTH": length,
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": request.scheme,
        REQUEST_KEY: request,
    })
    environ.pop("wsgi.input_terminated", None)
    return environ
