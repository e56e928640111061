"""The task API mounted inside Flask, Pyramid and a Starlette app, served for real."""

from __future__ import annotations

import httpx
import pytest

from offload.web import TaskAPI
from testapp.webservers import serve_asgi, serve_wsgi

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def api(_workers):
    return TaskAPI(_workers("web_embedded")[0], prefix="/offload", cors_origins=["http://app.example"])


def exercise(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        answer = c.post("/offload/tasks/add", json={"args": [40, 2]})
        assert answer.status_code == 202
        assert "/offload/tasks/" in answer.headers["location"]  # Pyramid makes it absolute
        assert c.get(answer.headers["location"], params={"wait": 20}).json()["result"] == 42
        assert c.get("/offload/openapi.json").json()["paths"]["/offload/tasks/add"]
        rpc = c.post("/offload/rpc", json={"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 1})
        assert isinstance(rpc.json()["result"], str)
        preflight = c.options("/offload/rpc", headers={"Origin": "http://app.example",
                                                        "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert c.get("/").text == "the app itself"


def test_flask_with_dispatcher_middleware(api):
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    app = Flask(__name__)
    app.add_url_rule("/", "home", lambda: "the app itself")
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {api.prefix: api.wsgi})
    with serve_wsgi(app) as url:
        exercise(url)


def test_pyramid_with_config_include(api):
    from pyramid.config import Configurator
    from pyramid.response import Response

    with Configurator() as config:
        config.include(api.includeme, route_prefix=api.prefix)
        config.add_route("home", "/")
        config.add_view(lambda request: Response("the app itself"), route_name="home")
        app = config.make_wsgi_app()
    with serve_wsgi(app) as url:
        exercise(url)


def test_starlette_mount(api):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    app = Starlette(routes=[
        Route("/", lambda request: PlainTextResponse("the app itself")),
        Mount(api.prefix, app=api.asgi),
    ])
    with serve_asgi(app) as url:
        exercise(url)
