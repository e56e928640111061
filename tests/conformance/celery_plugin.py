"""pytest plugin (``-p celery_plugin``) for running Celery's own t/integration
suite, from the sdist of the installed celery, against offload's ``sqlite://``.

Celery's conftest builds its app from ``TEST_BROKER`` / ``TEST_BACKEND`` and
never imports offload, so this plugin does what an offload app would:

* imports :mod:`offload`, which registers the ``sqlite`` kombu transport alias
  (the ``sqlite`` result backend comes from offload's entry point);
* adds ``CONFORMANCE_CELERY_CONFIG`` (JSON) to the suite's ``celery_config``
  (``.ci/conformance`` runs each broker on Celery's defaults, and sqlite once
  more with offload's ``RELIABILITY_DEFAULTS``);
* points the suite's own Redis helper (``t.integration.tasks.
  get_redis_connection``, which canvas tests use as a side channel on the Redis
  backend) at DB 13 instead of DB 0, so that the Redis reference run touches
  only the DBs it owns. Tests using it skip themselves on a non-Redis backend.

Celery's fixtures come from ``-p celery.contrib.pytest`` (pytest-celery would
register them; it is not needed for this). Set ``CELERY_SDIST`` to the extracted sdist root (``.ci/conformance`` does).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

_SDIST = os.environ.get("CELERY_SDIST")
if not _SDIST or not os.path.isfile(os.path.join(_SDIST, "t", "integration", "conftest.py")):
    raise pytest.UsageError(
        "set CELERY_SDIST to the extracted sdist of the installed celery (.ci/conformance does)")

# offload first: celery and kombu then come from the venv, never from the
# sdist's source tree, which is only appended to sys.path for its `t` package.
import offload  # noqa: E402,F401  (registers the sqlite:// kombu transport)

if _SDIST not in sys.path:
    sys.path.append(_SDIST)

import t.integration.tasks as _tasks  # noqa: E402

REDIS_SIDE_DB = int(os.environ.get("CONFORMANCE_REDIS_SIDE_DB", "13"))


def get_redis_connection():
    from redis import StrictRedis

    return StrictRedis(host=os.environ.get("REDIS_HOST", "127.0.0.1"),
                       port=int(os.environ.get("REDIS_PORT", 6379)),
                       db=REDIS_SIDE_DB, socket_timeout=None)


# Before Celery's conftest and test modules do `from .tasks import
# get_redis_connection`: they then bind this one.
_tasks.get_redis_connection = get_redis_connection


_EXTRA_CONFIG = json.loads(os.environ.get("CONFORMANCE_CELERY_CONFIG") or "{}")


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    result = yield
    if fixturedef.argname == "celery_config" and isinstance(result, dict):
        result.update(_EXTRA_CONFIG)
    return result
