"""Compaction costs what changed: a tenant grown through its log is never rewritten whole.

A tenant that grew through its log (no snapshot: the daily default) and then takes small
writes must upload objects the size of those writes, plus at most one snapshot when its
log outweighs it; and every moment of that history still restores exactly.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from tenantdb.errors import ObjectTooLargeError
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LogChunk, LogPointer
from tenantdb.replication import carrier, compaction, log_objects
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.shipper import Shipper
from tenantdb.storage.base import Bucket, ObjectInfo
from tests.replication.test_pitr import MIGRATIONS, PREFIX, Recorder, now, read_rows, settings

BLOB = 128 << 10  # one growth commit: 32 pages of random bytes, incompressible
GROWTH = 16  # commits: the database reaches about 2 MiB through its log


class CountingBucket:
    """A bucket that notes the key and size of every object written through it."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.written: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, key: str, body: bytes, **conditions: Any) -> ObjectInfo:
        info = await self.inner.put(key, body, **conditions)
        self.written.append((key, len(body)))
        return info

    async def upload_file(self, key: str, path: Path, **conditions: Any) -> ObjectInfo:
        info = await self.inner.upload_file(key, path, **conditions)
        self.written.append((key, path.stat().st_size))
        return info


async def step(shipper: Shipper) -> None:
    """What the shipper's loop does after a sync: a snapshot when due, then merges."""
    if shipper._snapshot_due(0):
        async with shipper._lock:
            await shipper._snapshot()
    await shipper._compact()


async def grow_then_write(tdb: TenantDB, recorder: Recorder, small_writes: int) -> int:
    """Grow the tenant through its log, then make small synced writes; return the index in
    ``bucket.written`` where the small writes began."""
    shipper = tdb._shipper
    assert shipper is not None
    async with tdb.connection() as db:
        await db.execute("CREATE TABLE bulk (body BLOB)")
        await db.commit()
    # Grow until every growth commit sits in a merged object, whatever the segments
    # before it (a migration's, say) did to the alignment of the merges.
    for grown in itertools.count(1):
        async with tdb.connection() as db:
            await db.execute("INSERT INTO bulk VALUES (randomblob(?))", (BLOB,))
            await db.commit()
        await tdb.sync()
        await step(shipper)
        log = tdb.lease.record.log if tdb.lease.record else None
        assert log is not None
        if grown >= GROWTH and log.first_single > log.tail:
            break
        assert grown < 2 * GROWTH
    bucket = tdb.lease.bucket
    assert isinstance(bucket, CountingBucket)
    started = len(bucket.written)
    for _ in range(small_writes):
        await recorder.changes(tdb, 1)
        await step(shipper)
    recorder.stop()
    return started


@pytest.fixture
def small_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Levels that fill within a test: 4 objects of singles a merge (packs of 2), 2 merged
    objects a level up."""
    monkeypatch.setattr(compaction, "MERGE_SINGLES", 4)
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 2)
    monkeypatch.setattr(compaction, "MERGE_FANOUT", 2)


@pytest.mark.usefixtures("small_levels")
async def test_small_writes_on_a_tenant_grown_through_its_log_never_rewrite_its_bulk(
    bucket: Bucket, tmp_path: Path
) -> None:
    counting = CountingBucket(bucket)
    recorder = Recorder(26)
    config = settings(tmp_path, "m1", sync_interval=3600)  # the test drives the loop
    async with TenantDB(config, migrations=MIGRATIONS, bucket=counting) as tdb:
        started = await grow_then_write(tdb, recorder, 40)
        async with tdb.connection() as db, db.execute("PRAGMA page_count") as cursor:
            db_bytes = (await cursor.fetchone() or (0,))[0] * 4096
    assert db_bytes >= GROWTH * BLOB
    written = counting.written[started:]
    log_objects = [size for key, size in written if "/log/" in key]
    snapshots = [size for key, size in written if "/snapshots/" in key]
    # A merge reaching the base would upload the bulk again (a large share of the
    # database); the small writes' own objects are a few pages each.
    assert max(log_objects) < db_bytes / 16, sorted(log_objects)[-3:]
    assert len(snapshots) <= 1  # only if the log outgrew the database meanwhile
    assert sum(log_objects) < db_bytes / 4


@pytest.mark.usefixtures("small_levels")
async def test_every_moment_of_a_tenant_grown_through_its_log_restores_exactly(
    bucket: Bucket, tmp_path: Path
) -> None:
    recorder = Recorder(62)
    config = settings(tmp_path, "m1", sync_interval=3600)
    async with TenantDB(
        config,
        migrations=MIGRATIONS,
        bucket=CountingBucket(bucket),
    ) as tdb:
        await grow_then_write(tdb, recorder, 24)
        record = tdb.lease.record
        assert record is not None
        assert record.log is not None
        assert record.log.merged, "the history should include merges"
    rng = random.Random(62)
    for number in range(6):
        stretch = rng.choice(recorder.quiet)
        moment = stretch.start + (stretch.end - stretch.start) * rng.random()
        out = tmp_path / f"restored-{number}.sqlite3"
        await restore_at(bucket, "acme", out, prefix=PREFIX, at=moment)
        assert read_rows(out) == stretch.rows, f"as of {moment.isoformat()}"
    out = tmp_path / "now.sqlite3"
    await restore_at(bucket, "acme", out, prefix=PREFIX, at=now())
    assert read_rows(out) == recorder.rows


def test_a_group_holding_a_sealed_object_is_not_merged_but_the_objects_above_it_are() -> None:
    log = LogPointer(
        base=1,
        tail=39,
        state="0" * 16,
        db_pages=10,
        runs=((1, 37),),
        merged=((1, 16, 1), (17, 20, 1), (21, 24, 1), (25, 28, 1), (29, 32, 1), (33, 36, 1)),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compaction, "MERGE_SINGLES", 4)
        patch.setattr(compaction, "MERGE_FANOUT", 2)
        # The newest two merged objects are of one level: merged, whatever lies below.
        assert compaction.next_merge(log, heavy=[1]) == (29, 36)
        assert compaction.next_merge(log, heavy=[29]) is None
        sealed_below = LogPointer(1, 32, "0" * 16, 10, (), merged=((1, 16, 1), (17, 32, 1)))
        assert compaction.next_merge(sealed_below) == (1, 32)
        assert compaction.next_merge(sealed_below, heavy=[1]) is None


async def test_a_merge_reads_another_holders_log_object_only_up_to_the_segment_cap(
    local_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulation seed 248: a new holder merging its predecessor's segments read each one
    whole with no cap, so a huge object at a log key set the holder's memory."""
    monkeypatch.setattr(log_objects, "SEGMENT_MAX_BYTES", 1024)
    key = f"{PREFIX}acme/log/00000001/000000000001.seg"
    await local_bucket.put(key, b"x" * 4096)
    lease = Lease(local_bucket, "acme", machine_id="m2", region="ams", ttl=3, prefix=PREFIX)
    chunk = LogChunk(first=1, last=1, generation=1, merged=False)
    objects = log_objects.LogObjects(local_bucket, "acme")
    with pytest.raises(ObjectTooLargeError):
        await compaction.Compactor(lease, prefix=PREFIX)._log_object(objects, key, chunk)
