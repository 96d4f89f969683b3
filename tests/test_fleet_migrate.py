"""Migrating stopped tenants in the bucket (``tenantdb.fleet.migrate``), both buckets."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Settings
from tenantdb.fleet import migrate_tenant
from tenantdb.fleet.migrate import list_changed_in_place
from tenantdb.machine.database import TenantDB
from tenantdb.machine.migrations import schema_of
from tenantdb.protocol.lease import read_lock
from tenantdb.replication.pitr import restore_at
from tenantdb.storage import Bucket

PREFIX = "tenants/"
V1 = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)"]
V2 = [*V1, "ALTER TABLE hits ADD COLUMN at TEXT DEFAULT 'then'"]
SETTINGS = Settings(lease_ttl=3)


def machine(tmp_path: Path, bucket: Bucket, node: str, migrations: list[str]) -> TenantDB:
    settings = Settings(
        tenant="acme",
        machine_id=node,
        fly_region="local",
        data_dir=tmp_path / node,
        lease_ttl=3,
        checkpoint_interval=0,
    )
    return TenantDB(settings, migrations=migrations, bucket=bucket)


@pytest.fixture
async def acme(bucket: Bucket, tmp_path: Path) -> None:
    """Tenant acme at version 1 with two rows, its machine stopped."""
    async with machine(tmp_path, bucket, "m1", V1) as tdb:
        for note in ("a", "b"):
            async with tdb.connection() as db:
                await db.execute("INSERT INTO hits (note) VALUES (?)", [note])
                await db.commit()
            await tdb.sync()


async def objects(bucket: Bucket) -> list[tuple[str, str]]:
    return [(info.key, info.etag) for info in await bucket.list("")]


def rows(path: Path) -> tuple[int, list[tuple[object, ...]]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        return version, conn.execute("SELECT * FROM hits ORDER BY id").fetchall()


async def test_a_stopped_tenant_is_migrated_published_and_released(
    bucket: Bucket, acme: None, tmp_path: Path
) -> None:
    result = await migrate_tenant(SETTINGS, bucket, "acme", V2)
    assert (result.outcome, result.before, result.after) == ("migrated", 1, 2), result.detail
    dest = tmp_path / "now.sqlite3"
    await restore_at(bucket, "acme", dest, prefix=PREFIX)
    assert rows(dest) == (2, [(1, "a", "then"), (2, "b", "then")])
    observed = await read_lock(bucket, "acme", f"{PREFIX}acme/lock.json")
    assert observed is not None
    assert (observed.record.owner, observed.record.last_owner) == (None, "m1")
    # A machine of the new code starts on it with nothing left to migrate.
    async with (
        machine(tmp_path, bucket, "m2", V2) as tdb,
        tdb.connection() as db,
        db.execute("SELECT count(*) FROM hits WHERE at = 'then'") as cursor,
    ):
        assert await cursor.fetchone() == (2,)
    # Run again (resumed): nothing to do, nothing written.
    before = await objects(bucket)
    again = await migrate_tenant(SETTINGS, bucket, "acme", V2)
    assert (again.outcome, again.before) == ("current", 2)
    assert await objects(bucket) == before


async def test_a_tenant_held_by_a_machine_is_never_touched(
    bucket: Bucket, acme: None, tmp_path: Path
) -> None:
    async with machine(tmp_path, bucket, "m3", V1) as tdb:
        before = await objects(bucket)
        result = await migrate_tenant(SETTINGS, bucket, "acme", V2)
        assert result.outcome == "held"
        assert "held by machine m3" in (result.detail or "")
        assert await objects(bucket) == before
        assert tdb.serving


async def test_a_dry_run_and_a_failing_migration_publish_nothing(
    bucket: Bucket, acme: None
) -> None:
    before = await objects(bucket)
    checked = await migrate_tenant(SETTINGS, bucket, "acme", V2, dry_run=True)
    assert (checked.outcome, checked.before, checked.after) == ("checked", 1, 2)
    assert await objects(bucket) == before
    dry_broken = await migrate_tenant(
        SETTINGS, bucket, "acme", [*V1, "INSERT INTO nope VALUES (1)"], dry_run=True
    )
    assert dry_broken.outcome == "failed"
    assert "no such table: nope" in (dry_broken.detail or "")
    assert await objects(bucket) == before
    broken = await migrate_tenant(SETTINGS, bucket, "acme", [*V1, "INSERT INTO nope VALUES (1)"])
    assert broken.outcome == "failed"
    # The lease was taken (a takeover record) and given back at once; no state published.
    observed = await read_lock(bucket, "acme", f"{PREFIX}acme/lock.json")
    assert observed is not None
    assert observed.record.owner is None
    assert observed.record.snapshot is None
    result = await migrate_tenant(SETTINGS, bucket, "acme", V2)
    assert result.outcome == "migrated"


async def test_a_tenant_ahead_of_the_code_fails_and_is_left_alone(
    bucket: Bucket, acme: None
) -> None:
    before = await objects(bucket)
    result = await migrate_tenant(SETTINGS, bucket, "acme", [])
    assert result.outcome == "failed"
    assert "at schema version 1" in (result.detail or "")
    observed = await read_lock(bucket, "acme", f"{PREFIX}acme/lock.json")
    assert observed is not None
    assert observed.record.owner is None
    assert len(await objects(bucket)) >= len(before)


async def test_with_wait_a_held_tenant_is_migrated_once_its_machine_stops(
    bucket: Bucket, acme: None, tmp_path: Path
) -> None:
    tdb = machine(tmp_path, bucket, "m4", V1)
    await tdb.start()
    try:
        waiting = asyncio.ensure_future(migrate_tenant(SETTINGS, bucket, "acme", V2, wait=True))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # the machine still holds it
    finally:
        await tdb.stop()
    result = await asyncio.wait_for(waiting, timeout=30)
    assert (result.outcome, result.before, result.after) == ("migrated", 1, 2), result.detail


class CountingBucket:
    """``bucket`` that records the key of every read: GETs and downloads."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._bucket, name)

    async def get(self, key: str, **kwargs: Any) -> object:
        self.reads.append(key)
        return await self._bucket.get(key, **kwargs)

    async def download_file(self, key: str, *args: Any, **kwargs: Any) -> object:
        self.reads.append(key)
        return await self._bucket.download_file(key, *args, **kwargs)


async def test_a_migrated_tenants_lock_records_its_schema_and_a_rerun_reads_only_that(
    bucket: Bucket, acme: None, tmp_path: Path
) -> None:
    lock_key = f"{PREFIX}acme/lock.json"
    observed = await read_lock(bucket, "acme", lock_key)
    assert observed is not None
    assert observed.record.schema == schema_of(V1)  # its machine recorded it
    result = await migrate_tenant(SETTINGS, bucket, "acme", V2)
    assert result.outcome == "migrated"
    observed = await read_lock(bucket, "acme", lock_key)
    assert observed is not None
    assert observed.record.schema == schema_of(V2)
    counting = CountingBucket(bucket)
    again = await migrate_tenant(SETTINGS, counting, "acme", V2)  # type: ignore[arg-type]
    assert (again.outcome, again.before, again.detail) == ("current", 2, None)
    assert counting.reads == [lock_key]


async def test_a_current_tenant_whose_migrations_changed_in_place_is_reported(
    bucket: Bucket, acme: None
) -> None:
    edited = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT, extra TEXT)"]
    before = await objects(bucket)
    result = await migrate_tenant(SETTINGS, bucket, "acme", edited)
    assert (result.outcome, result.before) == ("current", 1)
    assert "migration list changed in place" in (result.detail or "")
    assert list_changed_in_place(schema_of(V1), V2) is None
    assert list_changed_in_place(schema_of(V2), V1) is None  # ahead: not comparable
    assert await objects(bucket) == before


class CountingRestores:
    """``bucket`` counting the reads of lock.json (one per restore of the tenant)."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket
        self.lock_reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)

    async def get(self, key: str, **options: Any) -> Any:
        self.lock_reads += key.endswith("/lock.json")
        return await self._bucket.get(key, **options)


async def test_a_tenant_unchanged_since_its_first_look_is_restored_once(
    bucket: Bucket, acme: None, tmp_path: Path
) -> None:
    counting = CountingRestores(bucket)
    result = await migrate_tenant(SETTINGS, counting, "acme", V2)  # type: ignore[arg-type]
    assert result.outcome == "migrated", result.detail
    # The schema look, the first restore, taking the lease and the publish's look at the
    # history read lock.json; a second restore under the lease would read it a fifth time.
    assert counting.lock_reads == 4
    dest = tmp_path / "now.sqlite3"
    await restore_at(bucket, "acme", dest, prefix=PREFIX)
    assert rows(dest) == (2, [(1, "a", "then"), (2, "b", "then")])


async def test_a_tenant_written_between_the_first_look_and_the_lease_is_restored_again(
    bucket: Bucket, acme: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tenantdb.fleet import migrate as fleet_migrate

    take = fleet_migrate.acquire

    async def written_meanwhile(lease: Any, *, wait: bool) -> None:
        async with machine(tmp_path, bucket, "m3", V1) as tdb:
            async with tdb.connection() as db:
                await db.execute("INSERT INTO hits (note) VALUES ('meanwhile')")
                await db.commit()
            await tdb.sync()
        await take(lease, wait=wait)

    monkeypatch.setattr(fleet_migrate, "acquire", written_meanwhile)
    result = await migrate_tenant(SETTINGS, bucket, "acme", V2)
    assert result.outcome == "migrated", result.detail
    dest = tmp_path / "now.sqlite3"
    await restore_at(bucket, "acme", dest, prefix=PREFIX)
    assert rows(dest) == (2, [(1, "a", "then"), (2, "b", "then"), (3, "meanwhile", "then")])
