"""Segments carried in lock.json reach the bucket in packs, and keep their own times."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from tenantdb.machine.database import TenantDB
from tenantdb.replication.history import read_history
from tenantdb.replication.packs import PACK_SEGMENTS
from tenantdb.replication.pitr import restore_at
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
