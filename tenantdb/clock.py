"""The clocks and the fresh randomness tenantdb reads, behind one seam.

A process reads the system's clocks and the OS's randomness. The deterministic simulation
(tests/simulation) assigns these names a virtual clock and a seeded generator, so that one
seed makes one run; code calls them through the module (``clock.monotonic()``) for that.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["boottime", "monotonic", "now", "token_hex", "wall"]

monotonic: Callable[[], float] = time.monotonic
# Counts the time a suspended kernel slept, which the monotonic clock does not (Linux).
boottime: Callable[[], float] = (
    functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
    if hasattr(time, "CLOCK_BOOTTIME")
    else time.monotonic
)
wall: Callable[[], float] = time.time
token_hex: Callable[[int], str] = secrets.token_hex


def now() -> datetime:
    """The wall clock as an aware UTC datetime."""
    return datetime.fromtimestamp(wall(), UTC)
