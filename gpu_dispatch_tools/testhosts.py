"""Separate hosts on one machine, for the tests and the fault bench: Linux network namespaces on a bridge.

::

    root namespace                      gdha-h1 (10.77.0.11)      gdha-h2 (10.77.0.12)
    gdha0 10.77.0.1 (bridge) ──veth──── gdha-h1-ns          ──veth── gdha-h2-ns

Each namespace is a host of its own: its own loopback, one address on the
bridge's subnet and no other route, so what runs there reaches Redis and Nacos
only through the bridge address (they listen there too: the tooling allows
addresses of interfaces it created, :func:`gpu_dispatch_tools.servers.may_start_on`),
and a GPU worker there registers its own address (``GPU_DISPATCH_WORKER_IP``).
Cutting a host's link (:meth:`Host.cut`, ``ip link set ... down`` inside its
namespace) is a host cut off from the network while its processes live on.

Everything created is named ``gdha*`` and addressed from :data:`SUBNET`
only; :meth:`Hosts.remove` deletes it all, and runs at exit too, so an
interrupted run leaves nothing behind (the next :meth:`Hosts.create` also
clears leftovers of a killed one).  Needs root and ``ip netns``:
:func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
from dataclasses import dataclass

from gpu_dispatch_tools.servers import TOOLING_INTERFACE_PREFIX

PREFIX = TOOLING_INTERFACE_PREFIX
#: The only addresses used: the bridge is .1, host n is .10+n.
SUBNET = "10.77.0.0/24"
BRIDGE = f"{PREFIX}0"
BRIDGE_ADDRESS = "10.77.0.1"
_PROBE_NS = f"{PREFIX}-probe"


class HostsError(RuntimeError):
    """A namespace, bridge or link could not be created or changed; the message has ip's own words."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise HostsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (for a skip), or ``None`` when they can."""
    if not shutil.which("ip"):
        return "no `ip` command (Debian: apt-get install iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    _ip("netns", "del", _PROBE_NS, check=False)
    done = _ip("netns", "add", _PROBE_NS, check=False)
    if done.returncode != 0:
        return f"`ip netns add` is not permitted here: {done.stderr.strip()}"
    _ip("netns", "del", _PROBE_NS, check=False)
    done = _ip("link", "add", f"{PREFIX}-probe", "type", "bridge", check=False)
    if done.returncode != 0:
        return f"creating a bridge is not permitted here: {done.stderr.strip()}"
    _ip("link", "del", f"{PREFIX}-probe", check=False)
    return None


@dataclass(frozen=True)
class Host:
    """One namespace: a host with one address on the bridge."""

    name: str      # the namespace, e.g. gdha-h1
    address: str   # e.g. 10.77.0.11

    @property
    def outside(self) -> str:
        """The veth end on the bridge, in the root namespace."""
        return f"{self.name}-br"

    @property
    def inside(self) -> str:
        """The veth end in the namespace (the host's only link)."""
        return f"{self.name}-ns"

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """Take the host's link down, inside the host: it is cut off, its processes live on."""
        _ip("-n", self.name, "link", "set", self.inside, "down")

    def restore(self) -> None:
        """Bring the link back up (its address and route come back with it)."""
        _ip("-n", self.name, "link", "set", self.inside, "up")

    def link_up(self) -> bool:
        done = _ip("-n", self.name, "-o", "link", "show", self.inside, check=False)
        return done.returncode == 0 and ",UP" in done.stdout.split(">")[0] + ","


class Hosts:
    """``count`` hosts ``gdha-h1`` ... on bridge :data:`BRIDGE`; a context manager that removes them.

    :param adopt: use hosts that already exist with these names (created by another process, which
        removes them) instead of creating them afresh; :meth:`remove` then leaves them alone.
    """

    def __init__(self, count: int = 2, *, adopt: bool = False) -> None:
        if not 0 < count < 200:
            raise ValueError("1 to 199 hosts")
        self.hosts = [Host(f"{PREFIX}-h{n}", f"10.77.0.{10 + n}") for n in range(1, count + 1)]
        self.bridge, self.bridge_address = BRIDGE, BRIDGE_ADDRESS
        self.adopt = adopt
        self.created = False

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def exist(self) -> bool:
        """Whether the bridge (with its address) and every host namespace are there."""
        names = set(_ip("netns", "list", check=False).stdout.split())
        bridge = _ip("-o", "-4", "addr", "show", "dev", self.bridge, check=False)
        return bridge.returncode == 0 and f"{self.bridge_address}/" in bridge.stdout \
            and all(h.name in names for h in self.hosts)

    def create(self) -> "Hosts":
        """Create the bridge and the hosts (after clearing leftovers); on any failure, remove what was made."""
        if self.adopt and self.exist():
            return self
        self._clear()
        self.created = True
        atexit.register(self.remove)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for host in self.hosts:
                _ip("netns", "add", host.name)
                _ip("-n", host.name, "link", "set", "lo", "up")
                _ip("link", "add", host.outside, "type", "veth", "peer", "name", host.inside, "netns", host.name)
                _ip("link", "set", host.outside, "master", self.bridge)
                _ip("link", "set", host.outside, "up")
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.inside)
                _ip("-n", host.name, "link", "set", host.inside, "up")
        except Exception:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Delete the hosts and the bridge, if this object created them (idempotent)."""
        if not self.created:
            return
        self._clear()
        self.created = False

    def _clear(self) -> None:
        for host in self.hosts:
            _ip("netns", "del", host.name, check=False)  # takes its veth pair with it
            _ip("link", "del", host.outside, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> "Hosts":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()
