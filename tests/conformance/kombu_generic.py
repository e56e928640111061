"""kombu's own generic transport tests, run against offload's ``sqlite://``.

Not collected by the normal test run (the name is not test_*.py); run by
``.ci/conformance``, which downloads the sdist of the *installed* kombu and
sets ``KOMBU_SDIST`` to its extracted root. The tests themselves are kombu's
(``t/integration/common.py`` of that sdist, imported at run time, never copied
here); this module only wires their fixtures the way kombu's own
``t/integration/test_redis.py`` does for Redis.

``CONFORMANCE_BROKER=sqlite`` (the default) runs the generic classes against a
fresh ``sqlite:////<tmp>/broker.db`` per test. ``CONFORMANCE_BROKER=redis`` is
the reference: kombu's own Redis classes (the same generic tests, with the
overrides kombu ships for Redis, e.g. its reversed priority order) on
``redis://127.0.0.1:6379/12``. ``CONFORMANCE_BROKER=offload-redis`` runs the
same Redis classes on offload's own Redis transport
(``offload-redis://127.0.0.1:6379/10``, :mod:`offload.transport.redis`).
"""

from __future__ import annotations

import os
import sys

import pytest

_SDIST = os.environ.get("KOMBU_SDIST")
if not _SDIST or not os.path.isfile(os.path.join(_SDIST, "t", "integration", "common.py")):
    raise pytest.UsageError(
        "set KOMBU_SDIST to the extracted sdist of the installed kombu (.ci/conformance does)")

import kombu  # noqa: E402  (the installed one: the sdist only lends its `t` package)

sys.path.append(_SDIST)

BROKER = os.environ.get("CONFORMANCE_BROKER", "sqlite")

if BROKER == "sqlite":
    import offload  # noqa: F401,E402  (registers the sqlite:// transport alias)
    from t.integration.common import (BaseEventLoop, BaseExchangeTypes, BaseMessage,  # noqa: E402
                                      BasePriority, BasicFunctionality, BaseTimeToLive)

    @pytest.fixture()
    def connection(tmp_path):
        return kombu.Connection(f"sqlite:///{tmp_path}/broker.db")

    @pytest.fixture()
    def invalid_connection():
        # A file that cannot be created: what a refused TCP port is to Redis.
        return kombu.Connection("sqlite:////proc/offload-conformance-nope/broker.db")

    class test_SqliteBasicFunctionality(BasicFunctionality):
        pass

    class test_SqliteBaseExchangeTypes(BaseExchangeTypes):
        pass

    class test_SqlitePriority(BasePriority):
        pass  # AMQP's order (higher number first), as py-amqp's test runs it

    class test_SqliteMessage(BaseMessage):
        pass

    class test_SqliteTimeToLive(BaseTimeToLive):
        pass  # Redis has no per-message TTL; py-amqp and sqlite do

    # The transport is asynchronous: its wake-up socket on kombu's Hub.
    class test_SqliteEventLoop(BaseEventLoop):
        pass

    # Not run: BaseFailover. Its tests are about failing over between hosts
    # and ports of a network broker (it asserts the live and the dead URL
    # differ by port); a sqlite file has neither.

elif BROKER == "redis":
    from t.integration.test_redis import (test_RedisBaseExchangeTypes,  # noqa: E402,F401
                                          test_RedisBasicFunctionality, test_RedisEventLoop,
                                          test_RedisMessage, test_RedisPriority)

    @pytest.fixture(params=[None, {"global_keyprefix": "_prefixed_"}])
    def connection(request):
        return kombu.Connection("redis://127.0.0.1:6379/12", transport_options=request.param)

    @pytest.fixture()
    def invalid_connection():
        return kombu.Connection("redis://127.0.0.1:12345")

elif BROKER == "offload-redis":
    # offload's Redis transport (atomic take): kombu's own Redis classes, on
    # the Redis DB that OFFLOAD_CONFORMANCE_REDIS_DB names (10 by default).
    import offload  # noqa: F401,E402  (registers the offload-redis:// transport alias)
    from t.integration.test_redis import (test_RedisBaseExchangeTypes,  # noqa: E402,F401
                                          test_RedisBasicFunctionality, test_RedisEventLoop,
                                          test_RedisMessage, test_RedisPriority)

    _DB = os.environ.get("OFFLOAD_CONFORMANCE_REDIS_DB", "10")

    @pytest.fixture(params=[None, {"global_keyprefix": "_prefixed_"}])
    def connection(request):
        return kombu.Connection(f"offload-redis://127.0.0.1:6379/{_DB}",
                                transport_options=request.param)

    @pytest.fixture()
    def invalid_connection():
        return kombu.Connection("offload-redis://127.0.0.1:12345")

else:
    raise pytest.UsageError(f"CONFORMANCE_BROKER={BROKER!r}: sqlite, redis or offload-redis")
