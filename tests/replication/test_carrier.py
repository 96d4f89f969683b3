"""Segments carried in lock.json reach the bucket in packs, and keep their own times."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lockfile import LockRecord, LogPointer
from tenantdb.replication import carrier as carrier_module
from tenantdb.replication.carrier import Carried, Carrier
from tenantdb.replication.history import read_history
from tenantdb.replication.packs import PACK_SEGMENTS, decode_pack
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.uploads import LogUploads
from tenantdb.storage.base import Bucket
from tests.replication.test_shipper import MIGRATIONS, add, settings


async def test_every_moment_across_packs_restores_exactly(bucket: Bucket, tmp_path: Path) -> None:
    """Segments in a pack keep their own times: a restore as of any moment between two of
    them gives the rows of that moment, not those of the pack's end."""
    moments: list[tuple[datetime, int]] = []
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        for n in range(PACK_SEGMENTS + 8):
            await add(tdb, 1, note=f"row {n}")
            await tdb.sync()
            await asyncio.sleep(0.003)  # segment times are rounded up to the millisecond
            moments.append((datetime.now(UTC), n + 1))
            await asyncio.sleep(0.003)
        record = tdb.lease.record
        assert record is not None
        assert record.log is not None
        assert record.log.packs, "no pack was made"
    history = await read_history(bucket, "acme", prefix="tenants/")
    assert any(s.packed and s.published for s in history.segments)
    for number, (moment, count) in enumerate(moments):
        out = tmp_path / f"at-{number}.sqlite3"
        await restore_at(bucket, "acme", out, prefix="tenants/", at=moment)
        with closing(sqlite3.connect(out)) as db:
            assert db.execute("SELECT count(*) FROM hits").fetchone()[0] == count, moment


async def test_a_new_holder_carries_what_it_took_over_then_packs_it_one_pack_per_generation(
    local_bucket: Bucket,
) -> None:
    bodies = [b"one", b"two", b"three", b"four"]
    pointer = LogPointer(1, 4, "0" * 16, 2, ((1, 1), (2, 3))).with_inline(bodies)
    record = LockRecord("acme", "m3", None, generation=3, seq=9, ttl_seconds=15, log=pointer)
    uploads = LogUploads(local_bucket, "acme")
    carrier = Carrier(uploads, prefix="tenants/", tenant="acme")
    # Its first CAS carries them on with its own segment: nothing is dropped unstored.
    stored = await carrier.prepare(record, [Carried(5, 3, b"five")])
    assert stored.ranges == []
    assert [c.body for c in stored.inline] == [*bodies, b"five"]
    carrier.published(stored)
    # Before a CAS that replaces the log (a snapshot): one pack per generation that wrote them.
    await carrier.store_all(record)
    keys = {
        "tenants/acme/log/00000001/000000000001-000000000002.pack": (1, 2, bodies[:2]),
        "tenants/acme/log/00000002/000000000003-000000000004.pack": (3, 4, bodies[2:]),
        "tenants/acme/log/00000003/000000000005-000000000005.pack": (5, 5, [b"five"]),
    }
    for key, (first, last, held) in keys.items():
        body = (await local_bucket.get(key)).body
        assert decode_pack(body, key=key, tenant="acme", first=first, last=last) == held


async def test_no_cas_drops_a_carried_segment_whose_pack_is_not_in_the_bucket(
    local_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A block of the new segment alone fits (15 bytes), with one carried one not (24).
    monkeypatch.setattr(carrier_module, "BLOCK_MAX_BYTES", 20)
    pointer = LogPointer(1, 2, "0" * 16, 2, ((1, 1),)).with_inline([b"12345", b"67890"])
    record = LockRecord("acme", "m1", None, generation=1, seq=3, ttl_seconds=15, log=pointer)

    class Refusing(LogUploads):
        def uploaded(self, key: str) -> bool:
            return False  # not answered yet, as far as the next CAS can tell

    uploads = Refusing(local_bucket, "acme")
    carrier = Carrier(uploads, prefix="tenants/", tenant="acme")
    # Over the (patched) cap with the new segment: the carried ones must leave first.
    stored = await carrier.prepare(record, [Carried(3, 1, b"abc")])
    # Over the (patched) cap: the pack of 1..2 was awaited, and exists, before it is dropped.
    assert stored.ranges == [(1, 2, 1)]
    assert await local_bucket.head("tenants/acme/log/00000001/000000000001-000000000002.pack")
    assert [c.index for c in stored.inline] == [3]


async def test_compressible_segments_start_a_pack_before_a_cas_has_to_wait_for_one(
    local_bucket: Bucket,
) -> None:
    # Small segments are stored uncompressed: 20 KiB of zeros each weighs almost nothing in
    # the carried block, but 256 KiB of them is the inflated cap. The pack must start in
    # the background once 2/3 of it is carried, so that no CAS waits for an upload (a
    # holder writing such rows stalled its CASes, then its renewal, past its lease).
    uploads = LogUploads(local_bucket, "acme")
    carrier = Carrier(uploads, prefix="tenants/", tenant="acme")
    record = LockRecord("acme", "m1", None, generation=1, seq=1, ttl_seconds=15)
    for index in range(1, 13):
        stored = await carrier.prepare(record, [Carried(index, 1, bytes(20 * 1024))])
        assert not stored.packs, f"the CAS of segment {index} waited for a pack"
        carrier.published(stored)
        if index == 9:  # 180 KiB carried, past 2/3 of the cap
            assert any(key.endswith(".pack") for key in uploads._tasks), "no pack started"
    await uploads.settled()
