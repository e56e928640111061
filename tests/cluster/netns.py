"""Hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

Each :class:`Host` is a namespace with one address on a private /24 whose
other end is a veth plugged into a bridge in the root namespace; the bridge
holds the ``.1`` address, so the test process (in the root namespace) reaches
every host and the hosts reach each other, and nothing else: no route out,
no address outside the namespaces this module creates (and loopback).
Cutting a host's cable is ``ip link set <its bridge-side veth> down``: its
processes keep running and its TCP connections stay open, silent, as on a
real network partition.

Needs root and iproute2. :func:`unavailable` says why not, when not.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

__all__ = ["Cluster", "Host", "unavailable"]


def _ip(*args: str, netns: str | None = None) -> str:
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"ofl-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("netns", "del", probe)
    except RuntimeError:
        pass
    return None


@dataclass
class Host:
    """One namespace: its name, its address, and the bridge side of its cable."""

    name: str
    netns: str
    address: str
    cable: str  # the veth end plugged into the bridge (root namespace)

    def cut(self) -> None:
        """Unplug the host: packets to and from it are dropped from now on."""
        _ip("link", "set", self.cable, "down")

    def restore(self) -> None:
        """Plug it back in."""
        _ip("link", "set", self.cable, "up")

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class Cluster:
    """A bridge and the hosts plugged into it; :meth:`close` removes them all."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000:04d}{random.randrange(100):02d}")
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bridge = f"oflb{self.tag}"
        self.subnet = self._free_subnet()
        self.gateway = str(self.subnet.network_address + 1)

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = [ipaddress.ip_network(word, strict=False)
                for line in _ip("-4", "-o", "addr", "show").splitlines()
                for word in line.split() if "/" in word and word[0].isdigit()]
        for _ in range(200):
            candidate = ipaddress.ip_network(f"10.{random.randrange(200, 250)}.{random.randrange(256)}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                return candidate
        raise RuntimeError("no free 10.x.y.0/24 for the test network")

    def start(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        index = len(self.hosts) + 2
        netns = f"ofl-{self.tag}-{name}"
        cable, inside = f"oflc{self.tag}{index}", f"ofli{self.tag}{index}"
        address = str(self.subnet.network_address + index)
        _ip("netns", "add", netns)
        host = Host(name, netns, address, cable)
        self.hosts[name] = host  # registered before anything else can fail: close() removes it
        _ip("link", "add", cable, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", cable, "master", self.bridge)
        _ip("link", "set", cable, "up")
        _ip("link", "set", "lo", "up", netns=netns)
        _ip("addr", "add", f"{address}/24", "dev", inside, netns=netns)
        _ip("link", "set", inside, "up", netns=netns)
        return host

    def close(self) -> None:
        """Remove every namespace, cable and the bridge (errors ignored: best effort).

        Processes still inside a namespace (a daemon a server forked, such as
        Erlang's epmd) are killed first: a namespace outlives its deletion
        while a process holds it.
        """
        for host in self.hosts.values():
            try:
                pids = _ip("netns", "pids", host.netns).split()
            except RuntimeError:
                pids = []
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for host in self.hosts.values():
            for args in (("link", "del", host.cable), ("netns", "del", host.netns)):
                try:
                    _ip(*args)
                except RuntimeError:
                    pass
        try:
            _ip("link", "del", self.bridge)
        except RuntimeError:
            pass
        self.hosts.clear()
