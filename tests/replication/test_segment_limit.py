"""A transaction whose pages could make a segment larger than readers accept ships in a
snapshot instead: every segment object stays under SEGMENT_MAX_BYTES, and nothing is lost."""

from __future__ import annotations

from pathlib import Path

from tenantdb.config import Settings
from tenantdb.machine.database import TenantDB
from tenantdb.replication.segment import SEGMENT_MAX_BYTES
from tenantdb.storage import LocalBucket

MIGRATIONS = ["CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)"]
PAGE = 4096


def settings(tmp_path: Path, machine: str) -> Settings:
    return Settings(
        tenant="acme",
        machine_id=machine,
        data_dir=tmp_path / machine,
        local_bucket_dir=tmp_path / "bucket",
        lease_ttl=3,
        checkpoint_interval=0,
        sync_interval=3600,  # the test calls sync() itself
    )


async def test_a_transaction_too_large_for_one_segment_ships_as_a_snapshot(tmp_path: Path) -> None:
    rows = SEGMENT_MAX_BYTES // PAGE + 256  # one page each: more pages than a segment may carry
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS) as tdb:
        async with tdb.connection() as db:
            await db.execute("INSERT INTO blobs (data) VALUES (x'00')")
            await db.commit()
        await tdb.sync()
        before = tdb.lease.record.snapshot if tdb.lease.record else None
        async with tdb.connection() as db:
            await db.execute(
                "INSERT INTO blobs (data) SELECT randomblob(3900) FROM "
                f"(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                f"WHERE i < {rows}) SELECT i FROM n)"
            )
            await db.commit()
        await tdb.sync()
        after = tdb.lease.record.snapshot if tdb.lease.record else None
        assert after is not None
        assert after != before  # the big transaction went out in a snapshot
        async with LocalBucket(tmp_path / "bucket") as bucket:
            segments = await bucket.list("tenants/acme/log/")
        assert all(info.size <= SEGMENT_MAX_BYTES for info in segments), [
            (info.key, info.size) for info in segments if info.size > SEGMENT_MAX_BYTES
        ]
    # Another machine restores all of it.
    async with TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS) as other:
        async with other.connection() as db, db.execute("SELECT count(*) FROM blobs") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        assert row[0] == rows + 1
