"""One bucket request per sync: lock.json carries each segment, packs store them later.

These count the requests of a holder's steady writes (issue 26: at most 1.05 a sync in
``async`` durability, 1.1 a write for a lone ``bucket``-durability writer, at least 25
writes a request for 32 such writers).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tenantdb.machine.database import TenantDB
from tenantdb.storage.base import Bucket
from tests.replication.test_shipper import MIGRATIONS, add, restored_rows, rows, settings

# Segments shipped in a measured stretch: enough for a few packs to be made in it.
SYNCS = 68


class CountingRequests:
    """A bucket that counts every request made through it (any method that is awaited)."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.requests = 0
        self.packs = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.requests += 1
            if name == "put" and str(args[0]).endswith(".pack"):
                self.packs += 1
            return await attribute(*args, **kwargs)

        return counted


async def first_collection(tdb: TenantDB) -> None:
    """Wait for the garbage collection a new holder makes once (a LIST, not a sync's cost)."""
    shipper = tdb._shipper
    assert shipper is not None
    async with asyncio.timeout(10):
        while shipper.garbage.next_collection is not None:
            await asyncio.sleep(0.01)


def tail(tdb: TenantDB) -> int:
    record = tdb.lease.record
    assert record is not None
    assert record.log is not None
    return record.log.tail


async def test_async_syncs_make_at_most_1_05_requests_each(bucket: Bucket, tmp_path: Path) -> None:
    counting = CountingRequests(bucket)
    config = settings(tmp_path, "m1", durability="async", sync_interval=0.02, lease_ttl=15)
    async with TenantDB(config, migrations=MIGRATIONS, bucket=counting) as tdb:  # type: ignore[arg-type]
        await add(tdb, 1)
        await tdb.sync()
        await first_collection(tdb)
        start, before = tail(tdb), counting.requests
        for n in range(SYNCS):
            await add(tdb, 1, note=f"row {n}")
            async with asyncio.timeout(10):
                while tail(tdb) < start + n + 1:  # the loop shipped it
                    await asyncio.sleep(0.005)
        syncs, made = tail(tdb) - start, counting.requests - before
        assert syncs == SYNCS
        assert made <= 1.05 * syncs, f"{made} requests for {syncs} syncs"
        assert counting.packs >= 1, "the carried segments never reached the bucket"
        expected = await rows(tdb)
    assert await restored_rows(bucket, tmp_path) == expected


async def test_a_lone_bucket_durability_writer_makes_at_most_1_1_requests_a_write(
    bucket: Bucket, tmp_path: Path
) -> None:
    counting = CountingRequests(bucket)
    config = settings(tmp_path, "m1", durability="bucket", lease_ttl=15)
    async with TenantDB(config, migrations=MIGRATIONS, bucket=counting) as tdb:  # type: ignore[arg-type]
        await add(tdb, 1)
        await tdb.sync()
        before = counting.requests
        for n in range(SYNCS):
            await add(tdb, 1, note=f"row {n}")
            await tdb.sync()  # what the output gate waits for before answering
        made = counting.requests - before
        assert made <= 1.1 * SYNCS, f"{made} requests for {SYNCS} writes"
        assert counting.packs >= 1, "the carried segments never reached the bucket"
        expected = await rows(tdb)
    assert await restored_rows(bucket, tmp_path) == expected


# Writers at once and the writes each makes in the many-writers test; the requests are
# counted from the FROM-th write answered to the TO-th: not while the groups grow from
# one caller at the start, nor while the writers finish one by one.
WRITERS = 32
WRITES_EACH = 64
FROM, TO = 512, 1792


async def test_32_bucket_durability_writers_share_each_request_at_least_25_ways(
    s3_bucket: Bucket, tmp_path: Path
) -> None:
    # On moto, whose round trip (~8 ms) is shorter than 32 commits one after the other:
    # the case where a publication left with half the writers (issue 26: goal >= 25). The
    # local bucket answers within a millisecond, so its groups depend on the timing alone.
    counting = CountingRequests(s3_bucket)
    config = settings(tmp_path, "m1", durability="bucket", lease_ttl=15)
    async with TenantDB(config, migrations=MIGRATIONS, bucket=counting) as tdb:  # type: ignore[arg-type]
        await add(tdb, 1)
        await tdb.sync()
        answered = 0
        counted: dict[int, int] = {}  # requests made when the FROM-th and TO-th were answered

        async def writer(name: int) -> None:
            nonlocal answered
            for n in range(WRITES_EACH):
                await add(tdb, 1, note=f"writer {name} row {n}")
                await tdb.sync()  # what the output gate waits for before answering
                answered += 1
                if answered in (FROM, TO):
                    counted[answered] = counting.requests

        async with asyncio.timeout(60):
            await asyncio.gather(*(writer(name) for name in range(WRITERS)))
        made, writes = counted[TO] - counted[FROM], TO - FROM
        assert writes >= 25 * made, f"{writes} writes in {made} requests"
        expected = await rows(tdb)
    assert len(expected) == 1 + WRITERS * WRITES_EACH
    assert await restored_rows(s3_bucket, tmp_path) == expected
