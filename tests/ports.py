"""Tests only: free torchrun --master_port ranges, so simultaneous jobs never share a port."""

from __future__ import annotations

import random
import socket


def free_port_base(count: int) -> int:
    """A torchrun --master_port base with ``count`` free ports (other runs here use 29500+)."""
    for _ in range(100):
        base = random.randrange(30000, 60000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")
