"""The web task API's name for what it uses of an :class:`offload.Offload`: :mod:`offload.interface`'s Protocol.

The routes (:mod:`offload.web.app`, :mod:`offload.web.dashboard`), the table
of exposed tasks (:mod:`offload.web.names`) and the waiters
(:mod:`offload.web.waiting`) take an :class:`OffloadLike`. It is written once,
in :mod:`offload.interface`, for all of offload; this module only lets the
web's modules import it from inside their package.
"""

from __future__ import annotations

from ..interface import HubLike, OffloadLike

__all__ = ["HubLike", "OffloadLike"]
