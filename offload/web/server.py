"""uvicorn's HTTP protocols, sending each answer in one system call.

uvicorn writes an answer's head and its body with two ``transport.write``
calls, and the event loop sends each at once: two ``send`` system calls.
On loopback one costs about 17 us (bench/README.md), as much as the Python
that serves a long-poll answer: with thousands of waiters answered
together, sending once cuts the event loop's CPU by about a third. The
protocols here are uvicorn's own, given a transport that gathers what one
turn of the event loop writes to a connection and sends it in one call at
the end of the turn, so nothing is held back for longer than the turn: an
event stream's events leave as soon as they are written.

Give one to uvicorn as its HTTP implementation::

    uvicorn.run(api.asgi, http="offload.web.server:AutoHTTPProtocol")
    uvicorn app:api.asgi --http offload.web.server:AutoHTTPProtocol   # uvicorn >= 0.35

``AutoHTTPProtocol`` is uvicorn's httptools protocol when httptools is
installed (``uvicorn[standard]``), its h11 protocol otherwise, as uvicorn's
``auto`` chooses; ``HttpToolsProtocol`` and ``H11Protocol`` name one.

Written here because no server option does it: uvicorn has no setting that
joins the writes of one answer, and TCP_CORK would still cost a system call
per write.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterable
from typing import Any

# The three protocols are made on first use, by the module's __getattr__.
__all__ = ["AutoHTTPProtocol", "H11Protocol", "HttpToolsProtocol", "OneSendPerTurn"]  # noqa: F822


class OneSendPerTurn:
    """A transport that sends what one loop turn writes in one call.

    Wraps the server's transport; everything but writing and closing goes
    to it unchanged (flow control included: the wrapped transport still
    tells the protocol when its buffer fills). Closing sends what is
    gathered first; a write to a transport that is closing is dropped, as
    the wrapped transport would drop it.
    """

    __slots__ = ("transport", "_loop", "_gathered")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._gathered: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer before the turn ends
        gathered = self._gathered
        if gathered is None:
            self._gathered = [data]
            self._loop.call_soon(self.flush)
        else:
            gathered.append(data)

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what has been gathered (at the end of the turn, or before closing)."""
        gathered, self._gathered = self._gathered, None
        if gathered and not self.transport.is_closing():
            self.transport.write(gathered[0] if len(gathered) == 1 else b"".join(gathered))

    def is_closing(self) -> bool:  # asked after every answer: not through __getattr__
        return self.transport.is_closing()

    def get_write_buffer_size(self) -> int:
        gathered = self._gathered or ()
        return self.transport.get_write_buffer_size() + sum(len(chunk) for chunk in gathered)

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _one_send_per_turn(protocol_class: type[Any]) -> type[asyncio.Protocol]:
    class Protocol(protocol_class):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvicorn's protocols keep the transport they are given and write
            # only through it, so this is the one place to put the wrapper.
            super().connection_made(OneSendPerTurn(transport, self.loop))  # type: ignore[arg-type]

    Protocol.__name__ = Protocol.__qualname__ = protocol_class.__name__
    Protocol.__module__ = __name__
    Protocol.__doc__ = f"uvicorn's ``{protocol_class.__name__}``, each loop turn's writes sent in one call."
    return Protocol


def _httptools() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base

    return _one_send_per_turn(Base)


def _h11() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    return _one_send_per_turn(Base)


def _auto() -> type[asyncio.Protocol]:
    return __getattr__("HttpToolsProtocol" if importlib.util.find_spec("httptools") else "H11Protocol")


_MAKERS = {"HttpToolsProtocol": _httptools, "H11Protocol": _h11, "AutoHTTPProtocol": _auto}


def __getattr__(name: str) -> type[asyncio.Protocol]:
    # Made on first use: importing uvicorn's httptools protocol needs
    # httptools, which a plain ``pip install uvicorn`` does not bring.
    protocol = globals().get(name)
    if protocol is None:
        make = _MAKERS.get(name)
        if make is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        protocol = globals()[name] = make()
    return protocol
