"""The allow-list: what submit() accepts and what a worker agrees to run."""

from __future__ import annotations

import os
import sys

import pytest

from offload import ConfigurationError, NotAllowedError, Offload
from offload.exceptions import RejectedMessage
from offload.dispatch import AllowList, default_allow, reference, refusal
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
    assert allow.resolve("testapp:add") is add
    with pytest.raises(NotAllowedError):
        allow.resolve("os:getcwd")
    with pytest.raises(NotAllowedError):
        allow.resolve(["not", "a", "string"])
    with pytest.raises(NotAllowedError, match="module:qualname"):
        allow.resolve("testapp:add.<locals>.inner")
    # An allowed module importing os must not open os's functions...
    with pytest.raises(NotAllowedError, match="a module, not a class"):
        allow.resolve("testapp:os.getcwd")
    # ...nor a function it imported from elsewhere.
    with pytest.raises(NotAllowedError, match="outside the allow-list"):
        allow.resolve("testapp:progress")


def test_the_worker_resolves_static_and_class_methods_to_the_function():
    allow = AllowList(["testapp"])
    assert allow.resolve("testapp:Shapes.square") is Shapes.square
    assert allow.resolve("testapp:Shapes.name")() == "Shapes"
    with pytest.raises(NotAllowedError, match="not a function"):
        allow.resolve("testapp:Shapes")


def test_registering_accepts_the_function_and_the_task_in_its_place():
    import types

    allow = AllowList([])
    module = types.ModuleType("elsewhere_jobs")
    sys.modules["elsewhere_jobs"] = module
    try:
        def job():
            return "ran"

        job.__module__, job.__qualname__ = "elsewhere_jobs", "job"

        class FakeTask:  # what @off.task leaves in the function's place
            run = staticmethod(job)

        task = FakeTask()
        allow.register(job, task)
        module.job = lambda: "impostor"
        with pytest.raises(NotAllowedError, match="no longer names"):
            allow.resolve("elsewhere_jobs:job")
        module.job = task
        assert allow.resolve("elsewhere_jobs:job")() == "ran"
    finally:
        del sys.modules["elsewhere_jobs"]


def test_reference_refuses_what_a_worker_would_not_run():
    from testapp.allowed import cached_square

    with pytest.raises(TypeError, match="only plain functions"):
        reference(cached_square)


@pytest.mark.parametrize("package, reason", [
    ("", "empty"),
    ("builtins", "standard library"),
    ("os", "standard library"),
    ("json.decoder", "standard library"),
    ("offload", "offload itself"),
    ("offload._boot", "offload itself"),
    ("__main__", "script being run"),
    ("my-app", "dotted module name"),
])
def test_refused_allow_list_entries(package, reason, tmp_path):
    assert reason in refusal(package)
    # One check, one message, whether the settings or the allow-list meet it first.
    messages = []
    for make in (lambda: AllowList([package]),
                 lambda: Offload({"OFFLOAD_ALLOW": [package], "OFFLOAD_DATA_DIR": str(tmp_path)})):
        with pytest.raises(ConfigurationError, match=reason) as caught:
            make()
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "List the packages of your own functions" in messages[0]


def test_one_rule_decides_what_may_run_before_and_after_the_worker_looks():
    """refusal_of is what resolve raises, before importing and with what it found."""
    allow = AllowList(["testapp"])
    assert allow.refusal_of("testapp:add") is None and allow.is_allowed("testapp:add")
    for ref in ("os:system", "testapplication:add"):
        assert "add its package to OFFLOAD_ALLOW" in allow.refusal_of(ref)
        with pytest.raises(NotAllowedError, match="add its package to OFFLOAD_ALLOW"):
            allow.resolve(ref)
    main = "testapp.__main__:x"
    assert "entry point" in allow.refusal_of(main) and not allow.is_allowed(main)
    with pytest.raises(NotAllowedError, match="entry point"):
        allow.resolve(main)
    # Named inside the package, defined outside it: known only once found.
    assert allow.refusal_of("testapp:progress") is None
    assert "outside the allow-list" in allow.refusal_of("testapp:progress", "offload.context")
    with pytest.raises(NotAllowedError, match="defined in 'offload.context', which is outside"):
        allow.resolve("testapp:progress")


def test_default_allow_list_is_never_the_stdlib_nor_offload(monkeypatch):
    assert default_allow("myapp.tasks") == ("myapp",)
    # The demo is offload's own: exactly its app module, never all of offload.
    assert default_allow("offload.demo.app") == ("offload.demo.app",)
    assert default_allow("offload.demo") == ()
    assert default_allow("json.tool") == ()
    # `python -m myapp.cli`: __main__ has an importable name; a script has none.
    main = type(sys)("__main__")
    main.__spec__ = type("Spec", (), {"name": "myapp.cli"})()
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert default_allow("__main__") == ("myapp",)
    main.__spec__ = None
    assert default_allow("__main__") == ()


def test_an_app_made_in_the_standard_library_or_offload_allows_nothing_by_default():
    made_in = {}
    for module in ("json.fake", "offload.fake", "offload.demo.app"):
        scope = {"__name__": module}
        exec("from offload import Offload\noff = Offload({'CELERY_ALWAYS_EAGER': True})", scope)
        made_in[module] = scope["off"].settings.allow
    assert made_in == {"json.fake": [], "offload.fake": [], "offload.demo.app": ["offload.demo.app"]}


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
    # Refused by the worker's consumer before Celery reads it (offload.intake).
    result = off.celery.send_task("offload.dispatch", args=["testapp:add", "1,2", {}])
    with pytest.raises(RejectedMessage, match="list of args"):
        result.get(timeout=30)


# A worker whose allow-list is one subpackage: what a forged message can reach.

@pytest.fixture(scope="module")
def guarded(data_root):
    from conftest import WorkerProcess
    from testapp import test_id
    from testapp.allowed import Jobs
    from testapp.guarded import off

    # One pool process: what one task imported, the next task sees.
    worker = WorkerProcess("testapp.guarded", f"guarded-{test_id()}@%h", data_root / "guarded.log",
                           concurrency=1)
    try:
        try:
            assert off.submit(Jobs.double, 1).result(timeout=60) == 2
        except Exception as exc:
            raise RuntimeError(f"the guarded worker did not start: {exc!r}\n{worker.log_tail()}") from exc
        yield off
    finally:
        worker.stop()


def forge(off, ref, *args):
    """Send a dispatch message straight through Celery, as an attacker on the broker would."""
    return off.celery.send_task("offload.dispatch", args=(ref, list(args), {}))


def test_a_class_in_an_allowed_package_is_not_constructed(guarded, tmp_path):
    created = tmp_path / "constructed"
    with pytest.raises(NotAllowedError, match="a class, not a function"):
        forge(guarded, "testapp.allowed:Runner", str(created)).get(timeout=30)
    assert not created.exists()


@pytest.mark.parametrize("ref, marker", [
    ("testapp.allowed.magic:anything", "anything"),  # module __getattr__
    ("testapp.allowed.magic:config.secret", "property"),  # a property of an instance
])
def test_resolving_runs_no_attribute_code(guarded, data_root, ref, marker):
    from testapp.allowed.magic import marker as marker_path

    with pytest.raises(NotAllowedError):
        forge(guarded, ref).get(timeout=30)
    assert not os.path.exists(marker_path(marker))


def test_a_module_outside_the_allow_list_is_not_imported(guarded, data_root):
    from testapp.allowed import loaded

    with pytest.raises(NotAllowedError, match="OFFLOAD_ALLOW"):
        forge(guarded, "testapp.side_effect:fn").get(timeout=30)
    assert guarded.submit(loaded, ["testapp.side_effect"]).result(timeout=30) == {
        "testapp.side_effect": False}
    assert not (data_root / "side-effect-imported").exists()


@pytest.mark.parametrize("ref", [
    "builtins:eval", "__main__:main", "offload._boot:load_default", "os:system",
    "testapp.allowed:getcwd",  # os.getcwd, reachable from an allowed module
    "testapp.allowed:os.getcwd", "testapp.allowed:Jobs", "testapp.allowed:Jobs.__init__",
    "testapp.allowed:cached_square", "testapp.allowed.nope:fn",
])
def test_forged_references_outside_plain_allowed_functions_are_refused(guarded, ref):
    with pytest.raises(NotAllowedError):
        forge(guarded, ref, "print(1)").get(timeout=30)


@pytest.mark.parametrize("ref", ["testapp.allowed:Runner.__init__", "testapp.allowed:Jobs.plain"])
def test_a_method_that_needs_an_instance_is_not_run(guarded, tmp_path, ref):
    # With a forged `self`: Runner.__init__(self, path) and Jobs.plain(self, path) write to path.
    ran = tmp_path / "ran"
    with pytest.raises(NotAllowedError, match="needs an instance"):
        forge(guarded, ref, "forged self", str(ran)).get(timeout=30)
    assert not ran.exists()


@pytest.mark.parametrize("ref", ["testapp.allowed.__main__:x", "testapp.allowed.__main__.sub:x"])
def test_a_main_module_is_never_imported(guarded, ref):
    # Importing testapp/allowed/__main__.py would leave a marker and sys.exit() the pool process.
    from testapp.allowed import loaded
    from testapp.allowed.magic import marker

    with pytest.raises(NotAllowedError, match="entry point"):
        forge(guarded, ref).get(timeout=30)
    assert not os.path.exists(marker("main"))
    assert guarded.submit(loaded, ["testapp.allowed.__main__"]).result(timeout=30) == {
        "testapp.allowed.__main__": False}


def test_a_plain_method_and_a_coroutine_object_are_refused_at_submit(redis_off):
    from testapp.allowed import Jobs
    from testapp.coroutines import add_later

    with pytest.raises(TypeError, match="needs an instance"):
        redis_off.submit(Jobs.plain, "x")
    coroutine = add_later(1, 2)
    with pytest.raises(TypeError, match=r"coroutine object: pass the async function and its arguments"):
        redis_off.submit(coroutine)
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning
    with pytest.raises(TypeError, match="coroutine object"):
        redis_off.map(add_later(1, 2), [[1, 2]])


def test_a_function_of_an_allowed_package_not_yet_imported_runs(guarded):
    from testapp.allowed import Jobs, loaded
    from testapp.allowed.lazy import triple

    assert guarded.submit(triple, 2).result(timeout=30) == 6
    assert guarded.submit(loaded, ["testapp.allowed.lazy"]).result(timeout=30) == {
        "testapp.allowed.lazy": True}
    assert guarded.submit(Jobs.name).result(timeout=30) == "Jobs"


def test_a_decorated_task_outside_the_allowed_packages_is_registered(guarded):
    # @off.task put a task where the function was; a message naming the
    # function by reference still reaches it (and only it).
    assert forge(guarded, "testapp.guarded:decorated", 4).get(timeout=30) == 40
    with pytest.raises(NotAllowedError):
        forge(guarded, "testapp.guarded:settings", "embedded").get(timeout=30)
