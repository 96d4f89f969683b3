"""Ports for local machines come from outside the range outgoing connections draw from."""

from __future__ import annotations

import socket
from pathlib import Path

from tenantdb.dev.ports import free_port


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_listened_on() -> None:
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {free_port() for _ in range(20)}
    assert all(not low <= port <= high for port in ports), (low, high, ports)
    assert len(ports) > 1  # picked at random, not one port for every caller
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
