"""Usage records: what one machine's requests to the bucket cost, kept in the bucket itself.

Each machine of a tenant writes, once an hour and when it stops, an empty object whose key
holds its billed requests and bytes since its previous record:
``<tenant>/usage/<end ms>-a<class A>-b<class B>-i<bytes in>-o<bytes out>-<nonce>``. The
numbers are in the key, so ``tenantdb status`` sums a tenant's last day from the LIST it
makes anyway, without a GET per record. The nonce makes every key new (``If-None-Match:
*``); the record is a meter's reading, never data a restore depends on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tenantdb.parsing import MAX_TIME_MS

__all__ = ["USAGE_DIR", "Usage", "UsageRecord", "parse_usage_key", "usage_key"]

USAGE_DIR = "usage/"
# Counts are decimal in the key: 15 digits are past any day of any tenant.
_KEY = re.compile(
    r"usage/(\d{13,15})-a(\d{1,15})-b(\d{1,15})-i(\d{1,15})-o(\d{1,15})-([0-9a-f]{12})"
)


@dataclass(frozen=True)
class Usage:
    """Billed bucket requests (Tigris's classes A and B) and object bytes in and out."""

    class_a: int = 0
    class_b: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.class_a + other.class_a,
            self.class_b + other.class_b,
            self.bytes_in + other.bytes_in,
            self.bytes_out + other.bytes_out,
        )

    def __bool__(self) -> bool:
        return any((self.class_a, self.class_b, self.bytes_in, self.bytes_out))


@dataclass(frozen=True)
class UsageRecord:
    """A machine's usage up to ``ended_ms`` (Unix ms) since its previous record."""

    ended_ms: int
    usage: Usage


def usage_key(prefix: str, tenant: str, record: UsageRecord, nonce: str) -> str:
    """The key that holds ``record`` (``nonce``: 12 hex digits, new for every record)."""
    u = record.usage
    return (
        f"{prefix}{tenant}/usage/{record.ended_ms:013d}-a{u.class_a}-b{u.class_b}"
        f"-i{u.bytes_in}-o{u.bytes_out}-{nonce}"
    )


def parse_usage_key(rest: str) -> UsageRecord | None:
    """The record a key below the tenant's prefix holds; None if it is not one tenantdb
    writes (any other name under ``usage/`` is left alone)."""
    match = _KEY.fullmatch(rest)
    if match is None or int(match[1]) > MAX_TIME_MS:
        return None
    a, b, bytes_in, bytes_out = (int(match[i]) for i in range(2, 6))
    return UsageRecord(int(match[1]), Usage(a, b, bytes_in, bytes_out))
