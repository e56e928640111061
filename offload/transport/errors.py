"""The two error classes every part of offload shares, the transports included.

They live here, inside ``offload.transport``, so that the embedded transport
(a plain kombu plugin) raises offload's own :class:`ConfigurationError`
without importing anything of offload outside ``offload.transport``. Their
public home is :mod:`offload.exceptions`, which re-exports them: that is the
module their ``__module__`` names, in tracebacks, results and the reference.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "OffloadError"]


class OffloadError(Exception):
    """Base class of every error offload raises itself."""


class ConfigurationError(OffloadError, ValueError):
    """A setting has a value offload cannot use."""


# Named by their public module: `offload.exceptions.ConfigurationError: ...` in a traceback, and a
# result backend that stores an exception's module finds the class there.
OffloadError.__module__ = ConfigurationError.__module__ = "offload.exceptions"
