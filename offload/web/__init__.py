"""``offload.web``: the HTTP task API of an Offload, as WSGI and ASGI.

Examples:
    >>> from offload import Offload
    >>> from offload.web import TaskAPI
    >>> off = Offload()
    >>> api = TaskAPI(off, prefix="/offload", cors_origins=["https://app.example"])
    >>> callable(api.wsgi), callable(api.asgi)
    (True, True)

The guide: docs/guide/web-api.md.
"""

from .app import RequestInfo, TaskAPI
from .waiting import TaskSnapshot

__all__ = ["RequestInfo", "TaskAPI", "TaskSnapshot"]
