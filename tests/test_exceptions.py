"""offload's errors: one error for a dead broker whichever way a task is sent,
and broker URLs shown with a password mask only where there is a password."""

from __future__ import annotations

import pytest
from kombu.exceptions import OperationalError

from conftest import dead_broker_url
from offload import BrokerUnavailable, Offload


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_delay_apply_async_and_submit_raise_the_same_error_on_a_dead_broker(scheme, tmp_path):
    url = dead_broker_url(scheme)
    off = Offload({"CELERY_BROKER_URL": url, "OFFLOAD_DATA_DIR": str(tmp_path)})

    @off.task
    def add(x, y):
        return x + y

    for send in (lambda: add.delay(1, 2), lambda: add.apply_async((1, 2)), lambda: off.submit(add, 1, 2),
                 lambda: add.submit(1, 2)):
        with pytest.raises(BrokerUnavailable, match="is unreachable.*Is it running") as info:
            send()
        # Old `except OperationalError:` clauses written for Celery still catch it.
        assert isinstance(info.value, OperationalError) and isinstance(info.value, ConnectionError)
        assert str(info.value).count("unreachable") == 1  # said once, not wrapped twice
        assert "guest:guest" not in str(info.value)


@pytest.mark.parametrize("url, shown", [
    ("redis://127.0.0.1:6379/0", "offload-redis://127.0.0.1:6379/0"),
    ("redis://:s3cret@127.0.0.1:6379/0", "offload-redis://:**@127.0.0.1:6379/0"),
    ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:**@127.0.0.1:5672//"),
    ("amqp://127.0.0.1:5672//", "amqp://guest:**@127.0.0.1:5672//"),  # kombu: guest/guest by default
])
def test_a_password_mask_only_where_there_is_a_password(url, shown, tmp_path):
    off = Offload({"CELERY_BROKER_URL": url, "OFFLOAD_DATA_DIR": str(tmp_path)})
    # What a worker's banner ("Connected to ...") and Flower show.
    assert off.celery.connection_for_read().as_uri() == shown
    assert off.celery.connection_for_write().as_uri(include_password=True).endswith(url.split("://")[1])
