"""Separate hosts on one machine: Linux network namespaces on a bridge (iproute2; needs root).

Each host is a network namespace with its own address, joined to the root namespace's bridge by a veth pair;
the control plane listens on the bridge's address in the root namespace. Taking a host's veth down cuts it off
from everything (the bus, the store, its peers) as a pulled cable would; bringing it up restores it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def available() -> str:
    """Why network namespaces cannot be used here ("" when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return ""


class Host:
    """One namespace: its name, address, the root side of its link, and the processes started in it."""

    def __init__(self, ns: str, address: str, link: str) -> None:
        self.ns = ns
        self.address = address
        self.link = link
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str], log: Path,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host's namespace (its own session), output to ``log``."""
        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def cut(self) -> None:
        """Pull the cable: nothing reaches this host or leaves it until ``restore``."""
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        """Plug it back in."""
        _ip("link", "set", self.link, "up")

    def stop(self) -> None:
        """SIGTERM what was started here (its process group), SIGKILL what is left after a while."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


class Network:
    """A bridge with the control plane's address and ``n`` hosts on it."""

    def __init__(self, bridge: str, control: str, hosts: list[Host]) -> None:
        self.bridge = bridge
        self.control = control
        self.hosts = hosts


@contextlib.contextmanager
def virtual_hosts(n: int) -> Iterator[Network]:
    """``n`` hosts on a private /24; everything is removed at the end (processes first)."""
    tag = f"{random.randrange(16 ** 4):04x}"
    subnet = f"10.{random.randrange(100, 200)}.{random.randrange(1, 250)}"
    bridge = f"kb{tag}"
    hosts = [Host(f"kiln-{tag}-{i}", f"{subnet}.{10 + i}", f"kv{tag}{i}") for i in range(n)]
    made: list[tuple[str, ...]] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(("link", "del", bridge))
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for h in hosts:
            _ip("netns", "add", h.ns)
            made.append(("netns", "del", h.ns))
            peer = f"kp{tag}{hosts.index(h)}"
            _ip("link", "add", h.link, "type", "veth", "peer", "name", peer)
            made.append(("link", "del", h.link))
            _ip("link", "set", h.link, "master", bridge)
            _ip("link", "set", h.link, "up")
            _ip("link", "set", peer, "netns", h.ns)
            _ip("-n", h.ns, "addr", "add", f"{h.address}/24", "dev", peer)
            _ip("-n", h.ns, "link", "set", peer, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
        yield Network(bridge, f"{subnet}.1", hosts)
    finally:
        for h in hosts:
            h.stop()
        for args in reversed(made):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip(*args)
