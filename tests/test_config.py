"""Setting spellings, coercion from ini strings, and warnings for typos."""

from __future__ import annotations

import sys
import warnings

import pytest

from offload import ConfigurationError, Offload
from offload.config import (
    AMQP_PUBLISH_RETRY_POLICY, AMQP_TRANSPORT_DEFAULTS, REDIS_TRANSPORT_DEFAULTS, celery_key, coerce, default_data_dir,
    read_settings, translate,
)


@pytest.mark.parametrize("spelling", [
    "CELERY_BROKER_URL", "celery.broker_url", "broker_url", "BROKER_URL",
])
def test_every_spelling_of_a_setting(spelling):
    settings = read_settings({spelling: "redis://127.0.0.1:6379/3"})
    assert settings.celery == {"broker_url": "redis://127.0.0.1:6379/3"}


def test_old_uppercase_aliases():
    assert celery_key("CELERY_ALWAYS_EAGER") == "task_always_eager"
    assert celery_key("CELERY_RESULT_BACKEND") == "result_backend"
    assert celery_key("CELERY_TASK_SERIALIZER") == "task_serializer"


def test_strings_from_ini_files_take_celerys_types():
    settings = read_settings({
        "celery.task_always_eager": "true",
        "celery.worker_prefetch_multiplier": "4",
        "celery.task_default_rate_limit": "10/m",
        "celery.broker_connection_timeout": "2.5",
        "celery.accept_content": "json, yaml",
        "celery.broker_transport_options": '{"visibility_timeout": 30}',
        "celery.worker_concurrency": "3",
    })
    assert settings.celery == {
        "task_always_eager": True,
        "worker_prefetch_multiplier": 4,
        "task_default_rate_limit": "10/m",
        "broker_connection_timeout": 2.5,
        "accept_content": ["json", "yaml"],
        "broker_transport_options": {"visibility_timeout": 30},
        "worker_concurrency": 3,
    }


def test_a_wrong_typed_string_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="worker_prefetch_multiplier.*int"):
        coerce("worker_prefetch_multiplier", "four")


def test_unknown_celery_key_warns_with_the_closest_valid_key():
    with pytest.warns(UserWarning, match="CELERY_BROKR_URL.*did you mean CELERY_BROKER_URL"):
        read_settings({"CELERY_BROKR_URL": "redis://"})


def test_framework_keys_are_ignored_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = read_settings({"DEBUG": True, "SECRET_KEY": "x", "SQLALCHEMY_DATABASE_URI": "y"})
    assert settings.celery == {}


def test_offloads_own_keys():
    settings = read_settings({
        "CELERY_START_LOCAL_WORKERS": "yes",
        "CELERY_WORKERS": "foo, bar",
        "CELERY_QUEUES": ["low-priority", "high-priority"],
        "CELERY_ROUTES": {"core.tasks.quick_task": {"queue": "quick_queue"}},
        "OFFLOAD_ALLOW": "billing reports",
    })
    assert settings.start_local_workers is True
    assert settings.workers == ["foo", "bar"]
    assert settings.queues == ["low-priority", "high-priority"]
    assert settings.routes == {"core.tasks.quick_task": {"queue": "quick_queue"}}
    assert settings.allow == ["billing", "reports"]
    assert read_settings({"CELERY_WORKERS": "2"}).workers == 2
    assert read_settings({"CELERY_WORKERS": {"foo": {"concurrency": 10}}}).workers == {
        "foo": {"concurrency": 10}}


@pytest.mark.parametrize("value", [-1, 2.5, True, object()])
def test_bad_workers_value(value):
    with pytest.raises(ConfigurationError, match="CELERY_WORKERS"):
        read_settings({"CELERY_WORKERS": value})


@pytest.mark.parametrize("key", ["S3_BUCKET", "REDIS_HOST", "CONTROL_EXCHANGE", "ENABLE_UTC",
                                 "CASSANDRA_SERVERS", "GCS_BUCKET"])
def test_a_web_apps_own_keys_never_become_celery_settings(key):
    # Celery's table of old names knows these bare; in a Flask config they are the app's.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_settings({key: "value"}).celery == {}
    assert celery_key(f"CELERY_{key}") is not None  # with a prefix they are Celery's


def test_translate_is_a_pure_function_of_its_arguments(tmp_path):
    mapping = {"CELERY_QUEUES": ["high"], "CELERY_ROUTES": {"a.b": {"queue": "high"}}}
    first = translate(mapping, default_data_dir=str(tmp_path), default_allow=["myapp"])
    second = translate(mapping, default_data_dir=str(tmp_path), default_allow=["myapp"])
    assert first.celery["broker_url"] == second.celery["broker_url"] == f"sqlite:///{tmp_path}/offload-broker.sqlite3"
    assert first.celery["task_routes"] == ({"a.b": {"queue": "high"}},)
    assert [q.name for q in first.celery["task_queues"]] == ["celery", "high"]
    assert first.celery["task_acks_late"] is True and first.allow == ["myapp"]
    assert mapping == {"CELERY_QUEUES": ["high"], "CELERY_ROUTES": {"a.b": {"queue": "high"}}}
    assert not list(tmp_path.iterdir())  # nothing created
    assert translate({"OFFLOAD_ALLOW": []}, default_allow=["myapp"]).allow == []


@pytest.mark.parametrize("allow, reason", [
    (["builtins"], "standard library"),
    ("os", "standard library"),
    (["myapp", "subprocess"], "standard library"),
    (["offload"], "offload itself"),
    (["offload.workers"], "offload itself"),
    ([""], "empty"),
    (["__main__"], "script being run"),
])
def test_allow_list_is_checked_at_configuration(allow, reason, tmp_path):
    with pytest.raises(ConfigurationError, match=f"OFFLOAD_ALLOW: .*{reason}"):
        Offload({"OFFLOAD_ALLOW": allow, "OFFLOAD_DATA_DIR": str(tmp_path)})


def test_the_demo_allows_its_app_module_only():
    from offload.demo.app import off

    assert off.settings.allow == ["offload.demo.app"]


def test_default_data_dir_is_never_inside_site_packages(tmp_path, monkeypatch):
    import types

    monkeypatch.chdir(tmp_path)
    for folder in ("site-packages", "dist-packages"):
        installed = types.ModuleType("someapp.web")
        installed.__file__ = f"/usr/lib/python3/{folder}/someapp/web.py"
        monkeypatch.setitem(sys.modules, "someapp.web", installed)
        assert default_data_dir("someapp.web") == str(tmp_path / "instance")
    source = types.ModuleType("someapp.web")
    source.__file__ = str(tmp_path / "src" / "someapp" / "web.py")
    monkeypatch.setitem(sys.modules, "someapp.web", source)
    assert default_data_dir("someapp.web") == str(tmp_path / "src" / "instance")
    assert default_data_dir("never.imported") == str(tmp_path / "instance")


def test_config_must_be_a_mapping():
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        Offload(["broker_url"])


def test_pickle_is_refused_unless_opted_in(tmp_path):
    with pytest.raises(ConfigurationError, match="OFFLOAD_ALLOW_PICKLE"):
        Offload({"CELERY_TASK_SERIALIZER": "pickle", "OFFLOAD_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigurationError, match="OFFLOAD_ALLOW_PICKLE"):
        Offload({"celery.accept_content": "json,pickle", "OFFLOAD_DATA_DIR": str(tmp_path)})
    # The MIME spelling of pickle is pickle too.
    for key, value in [("CELERY_ACCEPT_CONTENT", ["application/x-python-serialize"]),
                       ("CELERY_RESULT_ACCEPT_CONTENT", ["json", "Application/X-Python-Serialize"]),
                       ("celery.accept_content", "application/json, application/x-python-serialize"),
                       ("CELERY_TASK_SERIALIZER", "application/x-python-serialize")]:
        with pytest.raises(ConfigurationError, match="OFFLOAD_ALLOW_PICKLE"):
            Offload({key: value, "OFFLOAD_DATA_DIR": str(tmp_path)})
    assert Offload({"CELERY_ACCEPT_CONTENT": ["application/json"],
                    "OFFLOAD_DATA_DIR": str(tmp_path)}).celery.conf.accept_content == ["application/json"]
    off = Offload({"CELERY_TASK_SERIALIZER": "pickle", "CELERY_ACCEPT_CONTENT": ["pickle", "json"],
                   "OFFLOAD_ALLOW_PICKLE": True, "OFFLOAD_DATA_DIR": str(tmp_path)})
    assert off.celery.conf.task_serializer == "pickle"


def test_json_and_reliability_defaults(tmp_path):
    off = Offload({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/9"})
    conf = off.celery.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.result_backend == "redis://127.0.0.1:6379/9"
    assert conf.broker_transport_options["visibility_timeout"] <= 30


def test_defaults_are_overridable():
    off = Offload({
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/9",
        "CELERY_TASK_ACKS_LATE": False,
        "CELERY_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": 3600},
    })
    assert off.celery.conf.task_acks_late is False
    assert off.celery.conf.broker_transport_options["visibility_timeout"] == 3600


def test_rabbitmq_publishes_with_bounded_confirms_by_default():
    off = Offload({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})
    conf = off.celery.conf
    assert conf.broker_transport_options == {"confirm_publish": True, "confirm_timeout": 1.0}
    assert conf.task_publish_retry_policy == AMQP_PUBLISH_RETRY_POLICY


def test_rabbitmq_confirms_can_be_turned_off():
    off = Offload({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
                   "CELERY_BROKER_TRANSPORT_OPTIONS": {"confirm_publish": False},
                   "CELERY_TASK_PUBLISH_RETRY_POLICY": {"max_retries": 3}})
    conf = off.celery.conf
    assert conf.broker_transport_options["confirm_publish"] is False
    assert conf.task_publish_retry_policy == {"max_retries": 3}


def test_no_global_celery_app_leaks():
    import celery

    before = celery.current_app._get_current_object()
    Offload({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/9"})
    assert celery.current_app._get_current_object() is before


def test_a_second_configuration_replaces_the_first(tmp_path):
    off = Offload({"OFFLOAD_DATA_DIR": str(tmp_path), "CELERY_TASK_DEFAULT_QUEUE": "first",
                   "CELERY_BROKER_TRANSPORT_OPTIONS": {"polling_interval": 9}})
    off.configure({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
                   "OFFLOAD_DATA_DIR": str(tmp_path)})
    conf = off.celery.conf
    assert conf.broker_url.startswith("amqp://")
    # RabbitMQ's result backend: the embedded store, which every process reads (not rpc://).
    assert conf.result_backend == f"sqlite:///{tmp_path}/offload-results.sqlite3"
    assert conf.task_default_queue == "celery"
    assert conf.broker_transport_options == AMQP_TRANSPORT_DEFAULTS


@pytest.mark.parametrize("value", ["two", "Three", " one "])
def test_a_count_in_words_is_refused_with_the_accepted_forms(value):
    with pytest.raises(ConfigurationError, match="count in words.*a count .*a list of names.*a dict"):
        read_settings({"CELERY_WORKERS": value})


def test_celery2_broker_settings_make_the_broker_url():
    # seed 003's celeryconfig.py: BROKER_HOST, BROKER_USER, ... (Celery 2's names).
    settings = translate({"BROKER_HOST": "127.0.0.1", "BROKER_PORT": 5672, "BROKER_USER": "guest",
                          "BROKER_PASSWORD": "guest", "BROKER_VHOST": "/"})
    assert settings.celery["broker_url"] == "amqp://guest:guest@127.0.0.1:5672//"
    assert "broker_password" not in settings.celery
    # Celery 2's defaults: RabbitMQ on localhost:5672, vhost "/"; ini strings coerced.
    assert translate({"BROKER_HOST": "rabbit", "BROKER_PORT": "5673"}).celery["broker_url"] == (
        "amqp://rabbit:5673//")
    redis = translate({"BROKER_BACKEND": "redis", "BROKER_HOST": "127.0.0.1", "BROKER_VHOST": "3"}).celery
    assert redis["broker_url"] == "redis://127.0.0.1/3" and redis["broker_transport"] == "offload-redis"
    assert translate({"BROKER_BACKEND": "amqplib", "BROKER_HOST": "h", "BROKER_VHOST": "my vhost"}).celery[
        "broker_url"] == "amqp://h:5672/my%20vhost"


def test_celery2_broker_settings_beside_a_url_are_named_as_ignored():
    with pytest.warns(UserWarning, match="BROKER_HOST, BROKER_PASSWORD ignored: the broker URL") as seen:
        settings = translate({"BROKER_URL": "redis://:pw@127.0.0.1:6379/0", "BROKER_HOST": "elsewhere",
                              "BROKER_PASSWORD": "hunter2"})
    assert settings.celery["broker_url"] == "redis://:pw@127.0.0.1:6379/0"
    assert "hunter2" not in str(seen[0].message) and ":pw@" not in str(seen[0].message)


def test_celery2_amqp_result_backend_is_replaced_with_a_warning():
    with pytest.warns(UserWarning, match="'amqp'.*removed in Celery 5: offload uses 'sqlite:"):
        settings = translate({"BROKER_HOST": "127.0.0.1", "CELERY_RESULT_BACKEND": "amqp"})
    # offload's default result store for RabbitMQ: the embedded one.
    assert settings.celery["result_backend"].startswith("sqlite:")


def test_offload_plus_redis_is_another_spelling_of_offload_redis():
    settings = translate({"CELERY_BROKER_URL": "offload+redis://127.0.0.1:6379/4"})
    assert settings.celery["broker_url"] == "redis://127.0.0.1:6379/4"
    assert settings.celery["broker_transport"] == "offload-redis"


@pytest.mark.parametrize("url", ["offload-redis://127.0.0.1:6379/4", "offload+redis://127.0.0.1:6379/4",
                                 "redis://127.0.0.1:6379/4"])
def test_an_offload_redis_url_gets_offloads_redis_defaults(url):
    # Without them kombu's defaults apply: a message a worker held when Redis went
    # away stayed leased for an hour (visibility_timeout 3600), swept back
    # every 100 s at best.
    settings = translate({"CELERY_BROKER_URL": url,
                          "CELERY_BROKER_TRANSPORT_OPTIONS": {"unacked_restore_interval": 1}})
    celery = settings.celery
    assert (celery["broker_url"], celery["broker_transport"]) == ("redis://127.0.0.1:6379/4", "offload-redis")
    assert celery["broker_transport_options"] == {**REDIS_TRANSPORT_DEFAULTS, "unacked_restore_interval": 1}
    assert celery["result_backend"] == "redis://127.0.0.1:6379/4"
