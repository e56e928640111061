"""Seed 003's server on RabbitMQ with offload's default result backend there:
a slow echo behind JSON-RPC, served by as many web processes as run this.

    python -c "from testapp.seed003 import main; main(PORT)"   # one web process on PORT
    python -m celery -A testapp.seed003 worker

No result backend is set: RabbitMQ's default is offload's (the embedded
store under OFFLOAD_DATA_DIR), which every process of the machine reads.
"""

from __future__ import annotations

import time

from offload import Offload
from offload.web import TaskAPI
from testapp import settings


def config() -> dict:
    base = settings("rabbitmq")
    base.pop("CELERY_RESULT_BACKEND")
    base["CELERY_TASK_DEFAULT_QUEUE"] += "-seed003"
    base["CELERY_CONTROL_EXCHANGE"] += "-seed003"
    base["OFFLOAD_DATA_DIR"] += "-seed003"
    return base


off = Offload(config())
celery = off.celery


@off.task(expose=True)
def echo(message: str, delay: float = 0.5) -> str:
    """The seed's echo: answer after a delay."""
    time.sleep(delay)
    return message


api = TaskAPI(off, prefix="/offload", cors_origins=["http://127.0.0.1:8000"])


def main(port: int) -> None:
    from wsgiref.simple_server import make_server

    from testapp.webservers import QuietHandler, ThreadingWSGIServer

    server = make_server("127.0.0.1", port, api.wsgi, server_class=ThreadingWSGIServer,
                         handler_class=QuietHandler)
    print(f"serving on {port}", flush=True)
    server.serve_forever()

