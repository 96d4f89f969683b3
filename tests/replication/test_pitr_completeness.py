"""A point-in-time restore proves it has every segment it needs, or fails naming the lost one."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest

from tenantdb.config import Settings
from tenantdb.errors import PointInTimeError, StorageError
from tenantdb.machine.database import TenantDB
from tenantdb.replication import carrier
from tenantdb.replication.history import read_history
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.shipper import Shipper
from tenantdb.storage.base import Bucket, ObjectInfo

MIGRATIONS = ["CREATE TABLE items (id INTEGER PRIMARY KEY)"]
PREFIX = "tenants/"


class LogUploadsFail:
    """A bucket whose log object uploads fail while ``failing`` (lock.json still works)."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        if self.failing and "/log/" in key:
            raise StorageError(f"injected: PUT {key} failed", key=key, operation="put")
        return await self.inner.put(key, body, if_match=if_match, if_none_match=if_none_match)


def machine(bucket: Any, tmp_path: Path) -> TenantDB:
    settings = Settings(
        tenant="acme",
        machine_id="m1",
        data_dir=tmp_path / "m1",
        lease_ttl=3,
        checkpoint_interval=0,
        sync_interval=3600,  # the test ships by hand
    )
    return TenantDB(settings, migrations=MIGRATIONS, bucket=bucket)


async def insert(tdb: TenantDB, first: int, last: int) -> None:
    for row in range(first, last + 1):
        async with tdb.connection() as db:
            await db.execute("INSERT INTO items (id) VALUES (?)", (row,))
            await db.commit()
        await tdb.sync()


async def moment_after_commits() -> datetime:
    """Now, once past the millisecond of the last commit (segment times are rounded up)."""
    await asyncio.sleep(0.002)
    return datetime.now(UTC)


def count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])
    finally:
        conn.close()


async def test_pitr_inside_carried_segments_after_snapshot_is_exact_or_error(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    bucket = LogUploadsFail(local_bucket)
    async with machine(bucket, tmp_path) as tdb:  # type: ignore[arg-type]
        await insert(tdb, 1, 3)
        bucket.failing = True
        await insert(tdb, 4, 6)  # published by lock.json alone: carried inline
        moment = await moment_after_commits()
        await asyncio.sleep(0.02)
        # A snapshot would drop the carried segments from lock.json: it must not while
        # their objects cannot be written.
        with contextlib.suppress(StorageError):
            await tdb.checkpoint()
        bucket.failing = False
        await tdb.checkpoint()
    dest = tmp_path / "restored.sqlite3"
    # The carried segments reached their objects before the snapshot dropped them: exact,
    # never the 3 rows of before them.
    await restore_at(local_bucket, "acme", dest, prefix=PREFIX, at=moment)
    assert count(dest) == 6


async def test_snapshot_waits_for_carried_segments_to_reach_their_objects(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    bucket = LogUploadsFail(local_bucket)
    async with machine(bucket, tmp_path) as tdb:  # type: ignore[arg-type]
        await insert(tdb, 1, 2)
        bucket.failing = True
        await insert(tdb, 3, 4)
        with pytest.raises(StorageError):
            await tdb.checkpoint()
        record = tdb.lease.record
        assert record is not None
        assert record.log is not None
        assert record.log.inline
        bucket.failing = False
        assert await tdb.checkpoint()
        moment = await moment_after_commits()
    history = await read_history(local_bucket, "acme", prefix=PREFIX)
    present = {(e.first, e.last) for e in history.segments if e.published}
    assert all((i, i) in present or any(a <= i <= b for a, b in present) for i in range(1, 5))
    dest = tmp_path / "restored.sqlite3"
    await restore_at(local_bucket, "acme", dest, prefix=PREFIX, at=moment)
    assert count(dest) == 4


async def test_pitr_refuses_a_lost_segment_before_a_later_snapshot_naming_its_index(
    local_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 1)  # each segment in an object of its own
    async with machine(local_bucket, tmp_path) as tdb:
        await insert(tdb, 1, 3)
        await tdb.checkpoint()
        await insert(tdb, 4, 6)
        moment = await moment_after_commits()
        await asyncio.sleep(0.02)
        await insert(tdb, 7, 7)
        await tdb.checkpoint()
    history = await read_history(local_bucket, "acme", prefix=PREFIX)
    newest = max(e.last for e in history.segments if e.published)
    # The log's last segments go missing (as a dropped carried segment would be).
    lost = [e for e in history.segments if e.published and e.last >= newest - 1]
    for entry in lost:
        await local_bucket.delete(entry.key)
    dest = tmp_path / "restored.sqlite3"
    with pytest.raises(PointInTimeError) as raised:
        await restore_at(local_bucket, "acme", dest, prefix=PREFIX, at=moment)
    assert f"{newest - 1:012d}" in str(raised.value)
    assert not dest.exists()


class LockWritesFail(LogUploadsFail):
    """Log object uploads fail while ``failing``; so do the next ``failures`` lock.json writes."""

    def __init__(self, inner: Bucket) -> None:
        super().__init__(inner)
        self.failures = 0

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        if self.failures and key.endswith("/lock.json"):
            self.failures -= 1
            raise StorageError(f"injected: PUT {key} failed", key=key, operation="put")
        return await super().put(key, body, if_match=if_match, if_none_match=if_none_match)


async def test_a_scheduled_snapshot_publishes_a_pending_segment_instead_of_skipping_it(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    bucket = LockWritesFail(local_bucket)
    async with machine(bucket, tmp_path) as tdb:  # type: ignore[arg-type]
        await insert(tdb, 1, 2)
        bucket.failing, bucket.failures = True, 1
        with pytest.raises(StorageError):
            await insert(tdb, 3, 3)  # made into a segment: its object and its CAS failed
        bucket.failing = False
        moment = await moment_after_commits()
        await asyncio.sleep(0.02)
        shipper = tdb._shipper
        assert isinstance(shipper, Shipper)
        async with shipper._lock:  # the run loop's scheduled snapshot
            await shipper._snapshot()
    dest = tmp_path / "restored.sqlite3"
    # Had the snapshot skipped segment 3's index, no record could tell it from a lost one.
    await restore_at(local_bucket, "acme", dest, prefix=PREFIX, at=moment)
    assert count(dest) == 3
