"""Free loopback ports for the local machines, outside the range outgoing connections use.

A port found free by binding port 0 comes from the kernel's ephemeral range, the range it
also gives the local end of every outgoing connection: between the pick and a child
process's bind, a connection made meanwhile (an S3 request, a replay) may take it, and the
machine fails to start. A port below that range is only ever taken by a listener.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

_LOOPBACK = "127.0.0.1"
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LINUX_DEFAULT = (32768, 60999)
_LOWEST = 20000  # above the ports services commonly use
_TRIES = 64


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = (int(value) for value in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return _LINUX_DEFAULT
    return low, high


def free_port() -> int:
    """A loopback TCP port nothing listens on now, outside the kernel's ephemeral range."""
    low, high = _ephemeral()
    start, stop = (_LOWEST, low) if low - _LOWEST >= 1000 else (high + 1, 65536)
    for _ in range(_TRIES):
        port = random.randrange(start, stop)
        with socket.socket() as sock:
            try:
                sock.bind((_LOOPBACK, port))
            except OSError:
                continue  # taken, or lingering: another
            return port
    with socket.socket() as sock:  # a crowded range: the kernel's choice after all
        sock.bind((_LOOPBACK, 0))
        chosen: int = sock.getsockname()[1]
        return chosen
