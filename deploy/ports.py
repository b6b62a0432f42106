"""Finding free loopback ports, so test and benchmark stacks never collide with a running one."""

from __future__ import annotations

import random
import socket


def _block_free(host: str, start: int, n: int) -> bool:
    for port in range(start, start + n):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """First port of ``n`` consecutive free ports, below the ephemeral range so clients never take them."""
    rng = random.Random()
    for _ in range(500):
        start = rng.randrange(20000, 32000 - n)
        if _block_free(host, start, n):
            return start
    raise RuntimeError(f"no block of {n} free ports found on {host}")
