"""When to look for garbage in a tenant's bucket prefix, and its collection.

A merge or a snapshot replaces objects, a fenced holder leaves uploads no restore reads:
``History.expendable`` decides what goes. An idle tenant costs no LIST: a collection is
scheduled only once garbage is known to exist, for when the retention is past it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from tenantdb import clock
from tenantdb.errors import LeaseLostError, TenantDBError
from tenantdb.protocol.lease import Lease
from tenantdb.replication.history import SegmentEntry, SnapshotEntry, read_history

__all__ = ["GC_INTERVAL", "GarbageCollector"]

log = logging.getLogger("tenantdb.replication")

# The shortest pause between two looks (a LIST) for log objects no restore can use.
GC_INTERVAL = 600.0


class GarbageCollector:
    """Deletes what no restore within the retention needs, when some is known to exist."""

    def __init__(
        self,
        lease: Lease,
        *,
        prefix: str,
        retention: float,
        snapshot_retention: int,
        lock: asyncio.Lock,
        uploading: Callable[[str], bool],
    ) -> None:
        """``lock`` is held while deciding (the shipper's: an object uploaded but not yet
        named is not garbage); ``uploading`` says whether a key is still being uploaded."""
        self.lease = lease
        self.prefix = prefix
        self.retention = retention
        self.snapshot_retention = snapshot_retention
        self._lock = lock
        self._uploading = uploading
        # When to look next (monotonic); None: no garbage is known to exist. A new holding
        # looks once: its predecessor may have left some.
        self.next_collection: float | None = clock.monotonic()

    async def run_when_due(self, interval: float) -> None:
        """Look every ``interval`` seconds whether garbage is due, collect it, until fenced.

        A loop of its own, apart from shipping: deleting is safe to retry, so its failure
        restarts it (see supervisor.py) while shipping goes on.
        """
        while self.lease.status == "held":
            await asyncio.sleep(interval)
            if self.next_collection is None or clock.monotonic() < self.next_collection:
                continue
            try:
                await self.collect()
            except LeaseLostError:
                return
            except (TenantDBError, OSError) as exc:
                log.warning(
                    "tenant %s: garbage collection failed, will retry: %s", self.lease.tenant, exc
                )

    async def collect(self) -> list[str]:
        """Delete the objects no restore within the retention needs; return their keys.

        ``History.expendable`` keeps whatever a point-in-time restore to any moment within
        ``retention`` uses and everything lock.json names.
        """
        async with self._lock:
            garbage = await self._find()
        # Deleting takes a request per object: outside the lock, writes keep shipping.
        for key in garbage:
            await self.lease.bucket.delete(key)
        return garbage

    async def _find(self) -> list[str]:
        if self.lease.record is None or self.lease.status != "held":
            return []
        history = await read_history(self.lease.bucket, self.lease.tenant, prefix=self.prefix)
        if unlisted := history.unlisted():
            raise history.behind(unlisted[0])  # it may hide what keeps older objects needed
        cutoff = clock.now() - timedelta(seconds=self.retention)
        # Planning is linear in the objects listed, which may be many: off the event loop.
        expendable = await asyncio.to_thread(
            history.expendable, cutoff, keep_snapshots=self.snapshot_retention
        )
        garbage = [key for key in expendable if not self._uploading(key)]
        self.next_collection = None
        settled = history.named() | set(garbage)
        objects: list[SnapshotEntry | SegmentEntry] = [*history.snapshots, *history.segments]
        waiting = [o.last_modified for o in objects if o.key not in settled]
        if waiting:  # look again once the oldest of them is past the retention
            due = (min(waiting) - cutoff).total_seconds()
            self.next_collection = clock.monotonic() + max(due, GC_INTERVAL)
        return garbage

    def garbage_made(self) -> None:
        """A merge or a snapshot replaced objects: collect them once the retention is past."""
        due = clock.monotonic() + max(self.retention, GC_INTERVAL)
        if self.next_collection is None or due < self.next_collection:
            self.next_collection = due
