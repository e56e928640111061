"""The allow-list: what submit() accepts and what a worker agrees to run."""

from __future__ import annotations

import os

import pytest

from offload import NotAllowedError
from offload.dispatch import AllowList, reference
from testapp import Shapes, add


def test_reference_of_module_functions_and_static_and_class_methods():
    assert reference(add) == "testapp:add"
    assert reference(Shapes.square) == "testapp:Shapes.square"
    assert reference(Shapes.name) == "testapp:Shapes.name"


def test_lambda_is_refused_at_submit(redis_off):
    with pytest.raises(TypeError, match="lambda"):
        redis_off.submit(lambda: 1)


def test_closure_is_refused_at_submit(redis_off):
    def inner():
        return 1

    with pytest.raises(TypeError, match="closure"):
        redis_off.submit(inner)


def test_bound_method_of_an_object_is_refused(redis_off):
    class Local:
        def method(self):
            return 1

    with pytest.raises(TypeError, match="bound to an object"):
        redis_off.submit(Local().method)


def test_main_module_function_is_refused(monkeypatch):
    def fake():
        return 1

    fake.__module__ = "__main__"
    fake.__qualname__ = "fake"
    monkeypatch.setattr("sys.modules", {**__import__("sys").modules,
                                        "__main__": type(os)("__main__")})
    with pytest.raises(TypeError, match="__main__"):
        reference(fake)


def test_non_function_is_refused(redis_off):
    with pytest.raises(TypeError, match="takes a function"):
        redis_off.submit("testapp:add")
    with pytest.raises(TypeError, match="takes a function"):
        redis_off.submit(Shapes)


def test_unserializable_arguments_are_a_clear_error(redis_off):
    with pytest.raises(TypeError, match="JSON-serializable"):
        redis_off.submit(add, object(), 1)


def test_allow_list_rules():
    allow = AllowList(["testapp"])
    assert allow.is_allowed("testapp:add")
    assert allow.is_allowed("testapp.sub:thing")
    assert not allow.is_allowed("testapplication:add")
    assert not allow.is_allowed("os:system")
    with pytest.raises(NotAllowedError):
        allow.resolve("os:getcwd")
    with pytest.raises(NotAllowedError):
        allow.resolve(["not", "a", "string"])
    # An allowed module importing os must not open os's functions.
    with pytest.raises(NotAllowedError, match="outside the allow-list"):
        allow.resolve("testapp:os.getcwd")
    allow.register(os.getcwd)
    assert allow.resolve("posix:getcwd") is os.getcwd


def test_forged_message_is_refused_by_the_worker(off, tmp_path):
    marker = tmp_path / "ran"
    # Straight through Celery, bypassing submit(): os:getcwd and os:mkdir.
    result = off.celery.send_task("offload.dispatch", args=["os:mkdir", [str(marker)], {}])
    with pytest.raises(NotAllowedError, match="not allowed"):
        result.get(timeout=30)
    assert not marker.exists()
    result = off.celery.send_task("offload.dispatch", args=["os:getcwd", [], {}])
    with pytest.raises(NotAllowedError):
        result.get(timeout=30)


def test_forged_malformed_message_is_refused(off):
    result = off.celery.send_task("offload.dispatch", args=["testapp:add", "1,2", {}])
    with pytest.raises(TypeError, match="list of args"):
        result.get(timeout=30)
