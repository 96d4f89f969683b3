"""What a tenant costs: its machines' usage records of the last day, and a month's estimate.

The records (``protocol.usage``) come with the LIST ``tenantdb status`` makes anyway; each
machine writes one an hour, so the last hour's requests of a running machine are not in
them yet. The estimate is a day's requests times 30, plus what the tenant's objects weigh,
at the prices of ``Prices`` (Tigris's list prices unless settings say otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from tenantdb.config import Settings
from tenantdb.protocol.usage import Usage
from tenantdb.replication.history import History

__all__ = ["Prices", "TenantCost", "cost_of"]

_DAY = timedelta(days=1)
_DAYS_A_MONTH = 30
_GB = 1e9


@dataclass(frozen=True)
class Prices:
    """USD per 1,000 class A and class B requests, and per GB stored a month."""

    class_a: float
    class_b: float
    storage: float

    @classmethod
    def of(cls, settings: Settings) -> Prices:
        """The prices ``settings`` name (TENANTDB_PRICE_CLASS_A, _CLASS_B, _STORAGE)."""
        return cls(settings.price_class_a, settings.price_class_b, settings.price_storage)


@dataclass(frozen=True)
class TenantCost:
    """A tenant's usage in the day before ``now``, and the bytes its objects hold."""

    last_day: Usage
    stored_bytes: int

    def monthly(self, prices: Prices) -> float:
        """The month's estimate in USD: the last day's requests 30 times, and the storage."""
        day = self.last_day
        requests = (day.class_a * prices.class_a + day.class_b * prices.class_b) / 1000
        return requests * _DAYS_A_MONTH + self.stored_bytes / _GB * prices.storage


def cost_of(history: History, now: datetime) -> TenantCost:
    """The cost ``history``'s LIST shows as of ``now`` (the bucket's clock)."""
    since = (now - _DAY).timestamp() * 1000
    last_day = sum((u.usage for _, u in history.usage if u.ended_ms > since), Usage())
    stored = sum(s.size for s in history.snapshots) + sum(s.size for s in history.segments)
    if history.lock is not None:
        stored += history.lock.info.size
    return TenantCost(last_day, stored)
