"""offload's web task API served by a Django view (the same routes, not a copy).

``path("offload/", include("offload.django.urls"))`` mounts
:class:`offload.web.TaskAPI` (and its dashboard, where this offload has
one) under ``/offload/``. The view hands Django's request to the API's WSGI
app, so that Django's middleware stays in charge: sessions and auth give
``request.user``, and CSRF is checked as for any view (a browser POST or
DELETE needs the ``X-CSRFToken`` header; reading states and following
events are safe methods and need none).

``authorize`` by default: a task may be started or cancelled by a signed-in
user, the dashboard is for staff only (``is_staff``). Build your own with
:func:`task_api_view` for other rules.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["default_authorize", "django_request", "task_api_view"]

#: Where the Django request travels in the WSGI environ the API sees
#: (``request_info.raw[REQUEST_KEY]`` in an ``authorize`` hook).
REQUEST_KEY = "offload.django.request"

#: What the dashboard's ``authorize`` calls are named (the API's other names are tasks').
_DASHBOARD_NAMES = ("dashboard", "offload.dashboard", "metrics")


def django_request(request_info: Any) -> Any:
    """The Django ``HttpRequest`` behind a :class:`offload.web.RequestInfo`, or None."""
    raw = getattr(request_info, "raw", None)
    return raw.get(REQUEST_KEY) if isinstance(raw, dict) else None


def default_authorize(request_info: Any, name: str) -> bool:
    """Signed-in users start and cancel tasks; staff alone reaches the dashboard."""
    request = django_request(request_info)
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    if name.startswith(_DASHBOARD_NAMES):
        return bool(user.is_staff)
    return True


def _make_api(off: Any, prefix: str, options: dict[str, Any]) -> Any:
    from ..web import TaskAPI

    try:
        return TaskAPI(off, prefix=prefix, dashboard=True, **options)
    except TypeError:  # an offload without the dashboard: the task API alone
        return TaskAPI(off, prefix=prefix, **options)


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
        environ = _environ(request, path)
        answer: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer["status"], answer["headers"] = int(status.split(" ", 1)[0]), headers

        body: Iterable[bytes] = api.wsgi(environ, start_response)
        if isinstance(body, list):
            response: Any = HttpResponse(b"".join(body), status=answer["status"])
        else:
            response = StreamingHttpResponse(body, status=answer["status"])
        for name, value in answer["headers"]:
            if name.lower() != "content-length" or isinstance(body, list):
                response[name] = value
        return response

    # Django's CSRF middleware checks POST and DELETE: nothing here exempts them.
    return view


def _environ(request: Any, path: str) -> dict[str, Any]:
    """A WSGI environ for the API from a Django request (WSGI or ASGI)."""
    environ = dict(getattr(request, "environ", None) or request.META)
    body = request.body if request.method in ("POST", "PUT", "PATCH") else b""
    environ.update({
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": request.META.get("QUERY_STRING", ""),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": request.scheme,
        REQUEST_KEY: request,
    })
    environ.pop("wsgi.input_terminated", None)
    return environ
