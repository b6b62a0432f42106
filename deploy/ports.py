"""Finding free loopback ports, so test and benchmark stacks never collide with a running one."""

from __future__ import annotations

import random
import socket

# SeaweedFS puts gRPC ports at HTTP + 10000 (deploy.parts.weed_ports): keep bases low enough that
# those stay below the ephemeral range clients draw from (32768+).
_LOW, _HIGH = 20000, 22000
_GRPC_OFFSET = 10000


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """First of ``n`` consecutive free ports whose +10000 shadows are free too (weed's gRPC ports)."""
    rng = random.Random()
    for _ in range(500):
        start = rng.randrange(_LOW, _HIGH - n)
        block = range(start, start + n)
        if all(_free(host, p) and _free(host, p + _GRPC_OFFSET) for p in block):
            return start
    raise RuntimeError(f"no block of {n} free ports found on {host}")
