"""Rollback: an earlier moment published as the tenant's newest state, history kept."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest

from tenantdb.config import Settings
from tenantdb.errors import LeaseHeldError, TransientStorageError
from tenantdb.machine.database import TenantDB
from tenantdb.machine.migrations import schema_of
from tenantdb.protocol.lease import read_lock
from tenantdb.protocol.lockfile import LockRecord, SnapshotName
from tenantdb.replication import rollback as rollback_module
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.rollback import rollback
from tenantdb.storage.base import Bucket, ObjectInfo
from tests.replication.test_pitr import MIGRATIONS, PREFIX, Recorder, machine, read_rows
from tests.replication.test_pitr_completeness import LogUploadsFail, count, insert
from tests.replication.test_pitr_completeness import machine as completeness_machine


def operator(tmp_path: Path) -> Settings:
    return Settings(tenant="acme", data_dir=tmp_path / "operator", lease_ttl=3)


async def rows_of(tdb: TenantDB) -> list[tuple[int, str]]:
    async with tdb.connection() as db, db.execute("SELECT id, note FROM items ORDER BY id") as c:
        return [tuple(row) for row in await c.fetchall()]  # type: ignore[misc]


async def test_rollback_refuses_a_live_holder_then_the_next_machine_starts_from_it(
    bucket: Bucket, tmp_path: Path
) -> None:
    recorder = Recorder(21)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 4)
        then, rows_then = datetime.now(UTC), list(recorder.rows)
        await recorder.changes(tdb, 4)
        later, rows_later = datetime.now(UTC), list(recorder.rows)
        with pytest.raises(LeaseHeldError):
            await rollback(operator(tmp_path), bucket, then, work_dir=tmp_path)
        generation = tdb.generation()
    result = await rollback(operator(tmp_path), bucket, then, work_dir=tmp_path)
    assert result.generation == generation + 1
    assert result.restored.at is not None
    assert result.restored.at <= then
    observed = await read_lock(bucket, "acme", f"{PREFIX}acme/lock.json")
    assert observed is not None
    assert observed.record.owner is None
    assert observed.record.last_owner == "m1"  # routing still names the tenant's machine
    # The rolled-back state's schema is not recorded anywhere: unknown, never the newer one.
    assert observed.record.schema is None
    async with machine(bucket, tmp_path, "m1") as tdb:
        assert await rows_of(tdb) == rows_then
        await recorder.changes(tdb, 1)  # writes go on from the rolled-back state
        observed = await read_lock(bucket, "acme", f"{PREFIX}acme/lock.json")
        assert observed is not None
        assert observed.record.schema == schema_of(MIGRATIONS)
    # The history past the moment rolled back to is kept.
    out = tmp_path / "later.sqlite3"
    await restore_at(bucket, "acme", out, prefix=PREFIX, at=later)
    assert read_rows(out) == rows_later
    assert rows_later != rows_then


async def test_rollback_with_wait_takes_over_once_the_holder_is_gone(
    bucket: Bucket, tmp_path: Path
) -> None:
    recorder = Recorder(22)
    tdb = machine(bucket, tmp_path, "m1")
    await tdb.start(standby=False)
    await recorder.changes(tdb, 1)
    then, rows_then = datetime.now(UTC), list(recorder.rows)
    await recorder.changes(tdb, 1)
    # The holder vanishes without releasing (its renewals stop): the lease expires.
    await tdb._close_resources()
    result = await rollback(operator(tmp_path), bucket, then, wait=True, work_dir=tmp_path)
    assert result.generation == 2
    out = tmp_path / "now.sqlite3"
    await restore_at(bucket, "acme", out, prefix=PREFIX)
    assert read_rows(out) == rows_then


async def test_rollback_stamps_bucket_time_not_operator_clock(
    local_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(5)
    async with machine(local_bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 2)
        then, rows_then = datetime.now(UTC), list(recorder.rows)
        await recorder.changes(tdb, 3)
    rows_before = list(recorder.rows)
    await asyncio.sleep(0.05)
    before_rollback = datetime.now(UTC)
    await asyncio.sleep(0.05)
    # The operator's laptop runs 5 s behind the bucket and the machines.
    behind = lambda: int(time.time() * 1000) - 5000  # noqa: E731
    monkeypatch.setattr("tenantdb.replication.rollback.now_ms", behind, raising=False)
    monkeypatch.setattr("tenantdb.protocol.lockfile.now_ms", behind)
    await rollback(operator(tmp_path), local_bucket, then, work_dir=tmp_path)
    monkeypatch.undo()
    out = tmp_path / "before.sqlite3"
    await restore_at(local_bucket, "acme", out, prefix=PREFIX, at=before_rollback)
    assert read_rows(out) == rows_before  # not the rolled-back rows_then
    assert rows_before != rows_then
    after = tmp_path / "after.sqlite3"
    await restore_at(local_bucket, "acme", after, prefix=PREFIX, at=datetime.now(UTC))
    assert read_rows(after) == rows_then


class _ListingLags:
    """A bucket whose LIST does not show the newest keys yet (a cross-region LIST of a
    Tigris Global bucket is eventually consistent): here, none of them."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def list(self, prefix: str) -> list[object]:
        return []


async def test_rollback_whose_history_listing_lags_is_stamped_on_the_bucket_clock(
    local_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulation seed 162: a LIST that showed no history made the stamp max() of one int."""
    recorder = Recorder(3)
    async with machine(local_bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 2)
        then = datetime.now(UTC)
        await recorder.changes(tdb, 1)
    read_history = rollback_module.read_history

    async def lagging(bucket: Bucket, tenant: str, *, prefix: str) -> object:
        return await read_history(_ListingLags(bucket), tenant, prefix=prefix)  # type: ignore[arg-type]

    monkeypatch.setattr(rollback_module, "read_history", lagging)
    before = datetime.now(UTC)
    await rollback(operator(tmp_path), local_bucket, then, work_dir=tmp_path)
    observed = await read_lock(local_bucket, "acme", f"{PREFIX}acme/lock.json")
    assert observed is not None
    assert observed.record.snapshot is not None
    name = SnapshotName.parse(observed.record.snapshot.key.rsplit("/", 1)[-1])
    assert name is not None
    assert name.taken_ms is not None
    assert name.taken_ms >= before.timestamp() * 1000


async def test_rollback_uploads_carried_segments_before_dropping_them(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    bucket = LogUploadsFail(local_bucket)
    async with completeness_machine(bucket, tmp_path) as tdb:  # type: ignore[arg-type]
        await insert(tdb, 1, 2)
        then = datetime.now(UTC)
        await asyncio.sleep(0.02)
        await insert(tdb, 3, 3)
        bucket.failing = True
        await insert(tdb, 4, 6)  # published by lock.json alone: carried inline
        moment = datetime.now(UTC)
        await asyncio.sleep(0.02)
    # The machine stopped and released the lease with the segments still carried.
    await rollback(operator(tmp_path), local_bucket, then, work_dir=tmp_path)
    out = tmp_path / "moment.sqlite3"
    await restore_at(local_bucket, "acme", out, prefix=PREFIX, at=moment)
    assert count(out) == 6
    rolled = tmp_path / "rolled.sqlite3"
    await restore_at(local_bucket, "acme", rolled, prefix=PREFIX)
    assert count(rolled) == 2


async def test_a_rollback_that_fails_after_taking_the_lease_gives_it_back_at_once(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(23)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 2)
    then = datetime.now(UTC)

    async def restore_fails(*args: object, **kwargs: object) -> None:
        raise OSError("the operator's disk is full")

    monkeypatch.setattr(rollback_module, "restore_at", restore_fails)
    with pytest.raises(OSError, match="disk is full"):
        await rollback(operator(tmp_path), bucket, then, work_dir=tmp_path)
    # Nothing was published: the lease is free now, not after its TTL, and routing still
    # names the tenant's machine.
    observed = await read_lock(bucket, "acme", f"{PREFIX}acme/lock.json")
    assert observed is not None
    assert observed.record.owner is None
    assert observed.record.last_owner == "m1"


class LockWritesFail:
    """A bucket whose lock.json writes of one kind fail: ``"publish"`` (a snapshot of the
    writer's own generation) lands and then loses its answer, once; ``"release"`` (owner
    null) never lands."""

    def __init__(self, inner: Bucket, kind: Literal["publish", "release"]) -> None:
        self.inner = inner
        self.kind = kind
        self.failed = 0

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
        record = (
            LockRecord.parse(body, tenant="acme", key=key) if key.endswith("lock.json") else None
        )
        if record is not None and self.kind == "release" and record.owner is None:
            self.failed += 1
            raise TransientStorageError("injected: 503", key=key, operation="put")
        info = await self.inner.put(key, body, if_match=if_match, if_none_match=if_none_match)
        name = SnapshotName.parse(record.snapshot.key) if record and record.snapshot else None
        publish = record is not None and name is not None and name.generation == record.generation
        if self.kind == "publish" and publish and not self.failed:
            self.failed += 1
            raise TransientStorageError("injected: reset after it landed", key=key, operation="put")
        return info


@pytest.mark.parametrize("kind", ["publish", "release"])
async def test_a_rollback_reports_what_landed_when_its_publish_or_release_loses_its_answer(
    local_bucket: Bucket, tmp_path: Path, kind: Literal["publish", "release"]
) -> None:
    """Simulation seed 353938: the rollback's publish landed with its answer lost, then its
    release failed: the command said it failed while the tenant was rolled back."""
    recorder = Recorder(24)
    async with machine(local_bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 2)
        then, rows_then = datetime.now(UTC), list(recorder.rows)
        await recorder.changes(tdb, 2)
    bucket = LockWritesFail(local_bucket, kind)
    result = await rollback(operator(tmp_path), bucket, then, work_dir=tmp_path)  # type: ignore[arg-type]
    assert bucket.failed
    observed = await read_lock(local_bucket, "acme", f"{PREFIX}acme/lock.json")
    assert observed is not None
    assert observed.record.snapshot is not None
    assert observed.record.snapshot.key == result.snapshot
    # Released at once after a lost publish answer; left to expire when releases fail.
    assert (observed.record.owner is None) == (kind == "publish")
    out = tmp_path / "rolled.sqlite3"
    await restore_at(local_bucket, "acme", out, prefix=PREFIX)
    assert read_rows(out) == rows_then
