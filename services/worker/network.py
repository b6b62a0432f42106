"""Which network interface holds an address: a trial spanning hosts must talk over the worker's own address.

Gloo (torch.distributed's CPU backend, and what ``kiln.core``'s collectives use) picks its interface from the
host name, which on a multi-homed host (or in a network namespace) can name an address the peers cannot reach.
The worker knows where its peers reach it (``KILN_ADDRESS``): the interface holding that address is the one.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux: an interface's (first) IPv4 address


def interface_of(address: str) -> str | None:
    """The name of the interface holding ``address`` (an IPv4 address or a host name); None when none does,
    when it is a loopback address, or when it cannot be resolved."""
    try:
        ip = socket.gethostbyname(address)
    except OSError:
        return None
    if ipaddress.ip_address(ip).is_loopback:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None
