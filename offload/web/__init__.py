"""``offload.web``: the HTTP task API of an Offload, as WSGI and ASGI.

>>> from offload.web import TaskAPI                          # doctest: +SKIP
>>> api = TaskAPI(off, prefix="/offload", cors_origins=["https://app.example"])  # doctest: +SKIP

See README.md, "The web task API".
"""

from .app import RequestInfo, TaskAPI
from .waiting import TaskSnapshot

__all__ = ["RequestInfo", "TaskAPI", "TaskSnapshot"]
