"""A bare kombu consumer for the lost-message tests: ``python -m testapp.redis_taker URL QUEUE DONE_KEY``.

Runs each message as a 1 ms task: adds its body to the Redis set ``DONE_KEY``
(on the same server and DB), then acknowledges it. Consumes until killed,
through the transport the URL names, in kombu's event loop (the Hub), as a
Celery worker does.
"""

from __future__ import annotations

import sys
import time

import kombu
from kombu.asynchronous import Hub, set_event_loop

import offload  # noqa: F401  (registers the offload-redis:// transport alias)

VISIBILITY_TIMEOUT = 3


def main(url: str, queue_name: str, done_key: str) -> None:
    hub = Hub()
    set_event_loop(hub)
    # A short visibility timeout, swept every second: what a killed
    # consumer held comes back within seconds.
    connection = kombu.Connection(url, transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT, "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1})
    queue = kombu.Queue(queue_name, kombu.Exchange(queue_name), queue_name)
    channel = connection.default_channel
    side = connection.channel()  # where the work is recorded, as a task's own client would

    def run(body: str, message: kombu.Message) -> None:
        time.sleep(0.001)
        with side.conn_or_acquire() as client:
            client.sadd(done_key, body)
        message.ack()

    consumer = kombu.Consumer(channel, [queue], callbacks=[run], accept=["json"])
    consumer.qos(prefetch_count=1)
    consumer.consume()
    connection.transport.register_with_event_loop(connection.connection, hub)
    print("consuming", flush=True)
    hub.run_forever()


if __name__ == "__main__":
    main(*sys.argv[1:4])
