"""Fixtures of the web task API's tests, loaded for the whole suite (``pytest_plugins`` in conftest.py).

A test module uses the fixtures by name and imports the helpers
(``from web_fixtures import ALLOWED, make_api, start``); a fixture imported
by name would be redefined in that module (ruff's F811), so none is.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import require_service
from offload.web import TaskAPI
from testapp.webservers import serve

#: The one origin the APIs the fixtures make allow.
ALLOWED = "http://app.example:8080"


def make_api(off, **options) -> TaskAPI:
    """The API of ``off`` at ``/offload`` (CORS for :data:`ALLOWED`, waits up to 20 s)."""
    options.setdefault("cors_origins", [ALLOWED])
    options.setdefault("max_wait", 20)
    return TaskAPI(off, prefix="/offload", **options)


def start(client, name, *args, **kwargs) -> str:
    """POST a call of the exposed task ``name``; its task id (202 asserted)."""
    answer = client.post(f"/offload/tasks/{name}", json={"args": list(args), "kwargs": kwargs})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


@pytest.fixture(params=["embedded", "redis"])
def any_off(request, _workers):
    """The web test app's Offload on each broker, with its worker."""
    if request.param == "redis":
        require_service("redis")
    return _workers(f"web_{request.param}")[0]


@pytest.fixture
def web_off(_workers):
    """The web test app's Offload on the embedded broker, with its worker."""
    return _workers("web_embedded")[0]


@pytest.fixture(params=["wsgi", "asgi"])
def kind(request) -> str:
    """Each protocol the API is served over."""
    return request.param


@pytest.fixture
def client(web_off, kind):
    """An HTTP client of :func:`make_api` of ``web_off``, served over ``kind`` on loopback."""
    with serve(kind, make_api(web_off)) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c
