"""Wake-ups between processes on one machine: unix datagram sockets.

A consumer that waits for messages sleeps on its own :class:`Waker` socket
(whose address it publishes in the broker file); a producer, after each
commit, sends one byte to every published address (:class:`Poker`). The
socket is also the readable file descriptor kombu's event loop watches.

Only the standard library; nothing here knows about sqlite or kombu.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import tempfile
import uuid

__all__ = ["Poker", "Waker", "WakeTarget"]

#: ``(consumer id, address)``: whom to poke, and where.
WakeTarget = tuple[str, str]


def _socket_address(stored: str) -> str:
    # Linux abstract socket names start with a NUL byte; the file keeps '@'.
    return "\0" + stored[1:] if stored.startswith("@") else stored


class Waker:
    """The socket one process sleeps on until a producer pokes it.

    It belongs to the process that made it: :attr:`pid` tells a forked child
    that it must make its own (the parent's would steal its wake-ups).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"offload-{uuid.uuid4().hex[:16]}"
        if sys.platform.startswith("linux"):
            # An abstract address: no file to clean up, no path length limit.
            self.address = "@" + name
        else:
            self.address = os.path.join(tempfile.gettempdir(), name)
        self.sock.bind(_socket_address(self.address))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        """Readable when poked: what an event loop watches."""
        return self.sock.fileno()

    def drain(self) -> None:
        """Read every pending poke (they carry nothing but "look again")."""
        try:
            while self.sock.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def wait(self, timeout: float) -> bool:
        """Sleep until poked or ``timeout`` seconds pass; whether it was poked."""
        readable, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if readable:
            self.drain()
        return bool(readable)

    def poke(self) -> None:
        """Wake this process's own sleeper (an ack freed room for more)."""
        try:
            self.sock.sendto(b"!", _socket_address(self.address))
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket; only its own process removes a socket file."""
        self.sock.close()
        if self.pid == os.getpid() and not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except OSError:
                pass


class Poker:
    """Sends the wake-ups (one unbound socket per process)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._pid = 0

    def poke(self, targets: list[WakeTarget]) -> list[WakeTarget]:
        """Poke every target; those nobody listens at any more (gone processes)."""
        if not targets:
            return []
        if self._sock is None or self._pid != os.getpid():
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
            self._pid = os.getpid()
        gone = []
        for consumer, address in targets:
            try:
                self._sock.sendto(b"!", _socket_address(address))
            except BlockingIOError:
                pass  # its buffer is full of wake-ups already
            except (ConnectionRefusedError, FileNotFoundError):
                gone.append((consumer, address))
            except OSError:
                pass  # a wake-up is a hint; the consumer's fallback poll covers it
        return gone
