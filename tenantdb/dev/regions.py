"""The regions of ``tenantdb dev``: which region each machine is in, and the latency between two.

On Fly a request enters at the edge nearest the client ("Traffic sent to multi-region Fly.io
apps is automatically routed to the region nearest to the client",
https://fly.io/docs/networking/dynamic-request-routing/) and every hop between regions crosses
a real distance. Here every machine runs on 127.0.0.1, so the distance is injected: a hop
between two different regions waits ``RegionLatency.one_way`` each way.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tenantdb.errors import ConfigurationError

__all__ = [
    "EDGE_REGION_HEADER",
    "NO_LATENCY",
    "RegionLatency",
    "is_region",
    "region_of",
    "validate_regions",
]

# The dev-only request header naming the region a client's request enters in (where a real
# client's nearest edge would be); without it, requests enter in the first region.
EDGE_REGION_HEADER = "tenantdb-dev-region"
# Fly's region codes are short lowercase words (ams, fra, iad); dev allows any such label.
_REGION_RE = re.compile(r"[a-z][a-z0-9]{1,9}")


def validate_regions(regions: Sequence[str]) -> tuple[str, ...]:
    """``regions`` as a tuple, or a ConfigurationError naming what is wrong with them."""
    if not regions:
        raise ConfigurationError("at least one region is needed")
    for region in regions:
        if not _REGION_RE.fullmatch(region):
            raise ConfigurationError(
                f"region {region[:20]!r} is not a region code (2 to 10 lowercase letters and "
                "digits, such as ams)"
            )
    if len(set(regions)) != len(regions):
        raise ConfigurationError(f"regions repeat: {', '.join(regions)}")
    return tuple(regions)


def is_region(text: str) -> bool:
    """True when ``text`` is spelled like a region code."""
    return _REGION_RE.fullmatch(text) is not None


def region_of(regions: Sequence[str], index: int) -> str:
    """The region of a tenant's ``index``-th machine: its first in the first region, the
    others spread over all of them in turn (so that every region gets a replica)."""
    return regions[index % len(regions)]


@dataclass(frozen=True)
class RegionLatency:
    """The injected latency between two different regions, in seconds each way."""

    one_way: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.one_way <= 10:
            raise ConfigurationError(
                f"the latency between regions must be 0 to 10000 ms, not {self.one_way * 1000:g}"
            )

    def between(self, origin: str | None, destination: str | None) -> float:
        """One way's latency from ``origin`` to ``destination``: none within a region, or
        when a region is not known (None, as in a proxy without regions)."""
        if None in (origin, destination) or origin == destination:
            return 0.0
        return self.one_way

    async def cross(self, origin: str | None, destination: str | None) -> None:
        """Wait one way's latency from ``origin`` to ``destination`` (``between``)."""
        if leg := self.between(origin, destination):
            await asyncio.sleep(leg)


NO_LATENCY = RegionLatency()
