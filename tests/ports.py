"""Tests only: free torchrun --master_port ranges, so simultaneous jobs never share a port."""

from __future__ import annotations

import random
import socket

from qwen3vl_sft.fl.job import ephemeral_ports

LOWEST = 30000  # job.py's own runs here use 29500+


def free_port_base(count: int) -> int:
    """A torchrun --master_port base with ``count`` free ports, below the ephemeral range.

    NVFlare's simulator and PoC listen on ports the OS picks (bind to port 0) from that range, after
    job.py checked the sites' ports are free; a site port taken from it could be picked again by them.
    """
    top = ephemeral_ports()[0] - count
    low = max(1024, min(LOWEST, top - 1000))  # a machine whose ephemeral range starts low: below it still
    for _ in range(100):
        base = random.randrange(low, top)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")
