"""The fleet API (create, fork, export, purge, query) on tenants a real TenantDB wrote."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Settings
from tenantdb.errors import (
    InvalidTenantError,
    LeaseHeldError,
    PointInTimeError,
    PreconditionFailedError,
)
from tenantdb.fleet import (
    FleetError,
    TenantExistsError,
    UnknownTenantError,
    create_tenant,
    export_tenant,
    purge_tenant,
    query_tenants,
)
from tenantdb.fleet import query as fleet_query
from tenantdb.fleet.purge import is_purge_mark
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lease import read_lock
from tenantdb.replication import carrier, compaction
from tenantdb.replication.history import read_history
from tenantdb.replication.pitr import restore_at
from tenantdb.storage import Bucket, ObjectInfo

PREFIX = "tenants/"
MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)"]


def machine(tmp_path: Path, bucket: Bucket, name: str, node: str = "m1") -> TenantDB:
    """A TenantDB serving ``name`` on ``bucket``, not started."""
    settings = Settings(
        tenant=name,
        machine_id=node,
        fly_region="ams",
        data_dir=tmp_path / f"{name}-{node}",
        lease_ttl=3,
        checkpoint_interval=0,
    )
    return TenantDB(settings, migrations=MIGRATIONS, bucket=bucket)


async def write(tdb: TenantDB, notes: list[str]) -> None:
    """One commit per note, each shipped as its own segment."""
    for note in notes:
        async with tdb.connection() as db:
            await db.execute("INSERT INTO hits (note) VALUES (?)", [note])
            await db.commit()
        await tdb.sync()


async def served(tmp_path: Path, bucket: Bucket, name: str, node: str) -> list[str]:
    """The notes a machine that starts now on ``name`` serves."""
    async with (
        machine(tmp_path, bucket, name, node) as tdb,
        tdb.connection() as db,
        db.execute("SELECT note FROM hits ORDER BY id") as cursor,
    ):
        return [str(row[0]) for row in await cursor.fetchall()]


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


async def restored(bucket: Bucket, tenant: str, tmp_path: Path, **options: Any) -> list[str]:
    dest = tmp_path / f"restored-{tenant}-{datetime.now(UTC).timestamp()}.sqlite3"
    await restore_at(bucket, tenant, dest, prefix=PREFIX, **options)
    return dump(dest)


async def keys(bucket: Bucket, tenant: str) -> list[str]:
    return [info.key for info in await bucket.list(f"{PREFIX}{tenant}/")]


async def objects(bucket: Bucket, prefix: str = "") -> list[tuple[str, str]]:
    """Every object's key and ETag: equal before and after means nothing was written."""
    return [(info.key, info.etag) for info in await bucket.list(prefix)]


@pytest.fixture
async def source(bucket: Bucket, tmp_path: Path) -> datetime:
    """Tenant ``src``: a snapshot (a first machine's stop) and a log on top of it; the
    moment between its two batches of notes is returned."""
    async with machine(tmp_path, bucket, "src") as tdb:
        await write(tdb, ["a", "b"])
        assert await tdb.checkpoint()
    await asyncio.sleep(0.05)
    between = datetime.now(UTC)
    await asyncio.sleep(0.05)
    async with machine(tmp_path, bucket, "src", "m2") as tdb:
        await write(tdb, ["c", "d", "e"])
    return between


# --- create ---


async def test_create_makes_an_empty_tenant_a_machine_serves(
    bucket: Bucket, tmp_path: Path
) -> None:
    created = await create_tenant(bucket, "fresh", prefix=PREFIX, lease_ttl=3)
    assert (created.snapshot, created.db_pages, created.copied) == (None, 0, 0)
    observed = await read_lock(bucket, "fresh", f"{PREFIX}fresh/lock.json")
    assert observed is not None
    assert (observed.record.owner, observed.record.generation) == (None, 1)
    async with machine(tmp_path, bucket, "fresh") as tdb:
        await write(tdb, ["x"])
    assert await served(tmp_path, bucket, "fresh", "m2") == ["x"]


async def test_create_refuses_a_tenant_that_exists(bucket: Bucket, tmp_path: Path) -> None:
    async with machine(tmp_path, bucket, "taken") as tdb:
        await write(tdb, ["x"])
    before = await objects(bucket)
    with pytest.raises(TenantExistsError, match="tenant taken already exists"):
        await create_tenant(bucket, "taken", prefix=PREFIX, lease_ttl=3)
    await create_tenant(bucket, "other", prefix=PREFIX, lease_ttl=3)
    with pytest.raises(TenantExistsError, match="tenant other already exists"):
        await create_tenant(bucket, "other", prefix=PREFIX, lease_ttl=3, source="taken")
    assert [o for o in await objects(bucket) if not o[0].startswith(f"{PREFIX}other/")] == before


async def test_create_refuses_leftovers_of_an_interrupted_create(bucket: Bucket) -> None:
    await bucket.put(f"{PREFIX}half/history/00000001.json", b"{}", if_none_match="*")
    with pytest.raises(TenantExistsError, match=r"no lock\.json .*delete half --purge"):
        await create_tenant(bucket, "half", prefix=PREFIX, lease_ttl=3)


async def test_a_fork_of_an_unknown_tenant_is_refused_and_writes_nothing(
    bucket: Bucket,
) -> None:
    with pytest.raises(UnknownTenantError, match="no tenant ghost to fork from"):
        await create_tenant(bucket, "fork", prefix=PREFIX, lease_ttl=3, source="ghost")
    assert await keys(bucket, "fork") == []


async def test_a_fork_equals_its_source_now_and_copies_the_snapshot_in_the_bucket(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    lock = await read_lock(bucket, "src", f"{PREFIX}src/lock.json")
    assert lock is not None
    assert lock.record.snapshot is not None
    assert lock.record.log is not None
    assert lock.record.log.tail >= lock.record.log.base
    created = await create_tenant(bucket, "fork", prefix=PREFIX, lease_ttl=3, source="src")
    assert created.copied == 1  # the snapshot, copied inside the bucket
    assert created.state == lock.record.log.state
    assert await restored(bucket, "fork", tmp_path) == await restored(bucket, "src", tmp_path)
    history = await read_history(bucket, "fork", prefix=PREFIX)
    assert [t.generation for t in history.takeovers] == [1]
    # The fork's history starts at its creation: nothing of the source's past is its own.
    with pytest.raises(PointInTimeError, match="cannot be restored as of"):
        await restored(bucket, "fork", tmp_path, at=source)


async def test_a_fork_at_a_past_moment_holds_what_the_source_held_then(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    created = await create_tenant(
        bucket, "past", prefix=PREFIX, lease_ttl=3, source="src", at=source
    )
    assert created.uploaded_bytes > 0
    assert await served(tmp_path, bucket, "past", "m9") == ["a", "b"]


async def test_writes_to_a_fork_leave_the_source_as_it_was(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    before = await objects(bucket, f"{PREFIX}src/")
    await create_tenant(bucket, "fork", prefix=PREFIX, lease_ttl=3, source="src")
    assert await objects(bucket, f"{PREFIX}src/") == before  # forking only reads the source
    async with machine(tmp_path, bucket, "fork", "m3") as tdb:
        await write(tdb, ["fork only"])
    assert await served(tmp_path, bucket, "fork", "m4") == ["a", "b", "c", "d", "e", "fork only"]
    assert await served(tmp_path, bucket, "src", "m5") == ["a", "b", "c", "d", "e"]


async def test_the_sources_garbage_collection_and_purge_lose_nothing_of_the_fork(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    expected = await restored(bucket, "src", tmp_path)
    await create_tenant(bucket, "fork", prefix=PREFIX, lease_ttl=3, source="src")
    # Retention as a holder runs it, with every object past the window: all it may go.
    history = await read_history(bucket, "src", prefix=PREFIX)
    gone = history.expendable(datetime.now(UTC) + timedelta(days=1), keep_snapshots=0)
    assert gone  # the first machine's snapshot and segments, at least
    for key in gone:
        await bucket.delete(key)
    await purge_tenant(bucket, "src", prefix=PREFIX)
    assert await keys(bucket, "src") == []
    assert await restored(bucket, "fork", tmp_path) == expected


# --- export ---


@pytest.mark.parametrize("fmt", ["sqlite", "sql"])
async def test_an_export_equals_a_restore(
    bucket: Bucket, tmp_path: Path, source: datetime, fmt: str
) -> None:
    dest = tmp_path / f"out.{fmt}"
    result = await export_tenant(bucket, "src", dest, prefix=PREFIX, format=fmt)  # type: ignore[arg-type]
    assert result.size == dest.stat().st_size
    expected = await restored(bucket, "src", tmp_path)
    if fmt == "sqlite":
        assert dump(dest) == expected
        return
    text = dest.read_text()
    assert text.startswith("PRAGMA user_version = 1;\n")
    replay = tmp_path / "replay.sqlite3"
    with sqlite3.connect(replay, isolation_level=None) as conn:
        conn.executescript(text)
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    assert dump(replay) == expected


async def test_an_export_at_a_past_moment(bucket: Bucket, tmp_path: Path, source: datetime) -> None:
    dest = tmp_path / "then.sqlite3"
    await export_tenant(bucket, "src", dest, prefix=PREFIX, at=source)
    with sqlite3.connect(dest) as conn:
        assert conn.execute("SELECT note FROM hits ORDER BY id").fetchall() == [("a",), ("b",)]


# --- purge ---


async def test_a_purge_deletes_everything_and_a_new_tenant_of_that_id_starts_clean(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    listed = await bucket.list(f"{PREFIX}src/")
    await create_tenant(bucket, "keep", prefix=PREFIX, lease_ttl=3)
    receipt = await purge_tenant(bucket, "src", prefix=PREFIX)
    assert (receipt.keys, receipt.resumed) == (len(listed), False)
    # lock.json was rewritten (the purge mark) before it went: counted as the mark.
    lock = f"{PREFIX}src/lock.json"
    assert receipt.bytes > sum(i.size for i in listed if i.key != lock)
    assert await keys(bucket, "src") == []
    assert await keys(bucket, "keep") != []
    await create_tenant(bucket, "src", prefix=PREFIX, lease_ttl=3)
    assert await served(tmp_path, bucket, "src", "m7") == []


async def test_a_purge_is_refused_while_a_machine_holds_the_lease(
    bucket: Bucket, tmp_path: Path
) -> None:
    async with machine(tmp_path, bucket, "live", "m8") as tdb:
        await write(tdb, ["x"])
        before = await objects(bucket)
        with pytest.raises(LeaseHeldError, match="held by machine m8") as held:
            await purge_tenant(bucket, "live", prefix=PREFIX)
        assert 0 < held.value.expires_in <= 4
        assert await objects(bucket) == before
        assert tdb.serving


async def test_a_purge_of_an_unknown_tenant_is_refused(bucket: Bucket) -> None:
    with pytest.raises(UnknownTenantError, match="nothing under tenants/ghost/"):
        await purge_tenant(bucket, "ghost", prefix=PREFIX)
    assert await keys(bucket, "ghost") == []


async def test_a_purge_clears_what_an_interrupted_create_left(bucket: Bucket) -> None:
    await bucket.put(f"{PREFIX}half/snapshots/x.sqlite3", b"data", if_none_match="*")
    receipt = await purge_tenant(bucket, "half", prefix=PREFIX)
    assert receipt.keys == 2  # the object and the purge mark
    assert await keys(bucket, "half") == []


class Interrupted(Exception):
    pass


class DiesAfterDeletes:
    """``bucket`` whose process 'dies' after deleting ``deletes`` keys: the purge stops there."""

    def __init__(self, bucket: Bucket, deletes: int) -> None:
        self._bucket = bucket
        self._left = deletes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)

    async def delete_many(self, keys: list[str]) -> None:
        now, self._left = keys[: self._left], max(0, self._left - len(keys))
        await self._bucket.delete_many(now)
        if len(now) < len(keys):
            raise Interrupted(keys[len(now)])


async def test_an_interrupted_purge_leaves_no_live_tenant_and_resumes(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    count = len(await keys(bucket, "src"))
    assert count > 4
    with pytest.raises(Interrupted):
        await purge_tenant(DiesAfterDeletes(bucket, 3), "src", prefix=PREFIX)  # type: ignore[arg-type]
    left = await keys(bucket, "src")
    assert 0 < len(left) < count
    observed = await read_lock(bucket, "src", f"{PREFIX}src/lock.json")
    assert observed is not None
    assert is_purge_mark(observed.record)
    # No machine takes a tenant being purged.
    with pytest.raises(LeaseHeldError, match="held by machine purge@"):
        async with machine(tmp_path, bucket, "src", "m6"):
            pass
    receipt = await purge_tenant(bucket, "src", prefix=PREFIX)
    assert receipt.resumed
    assert receipt.keys == len(left)
    assert await keys(bucket, "src") == []


# --- query ---


async def collect(bucket: Bucket, tenants: list[str], sql: str, cache: Path) -> dict[str, Any]:
    results = query_tenants(bucket, tenants, sql, prefix=PREFIX, cache_dir=cache, parallel=2)
    return {r.tenant: (r.error or r.rows) async for r in results}


async def test_a_query_runs_on_every_tenant_and_one_failure_stops_none(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    await create_tenant(bucket, "fork", prefix=PREFIX, lease_ttl=3, source="src")
    async with machine(tmp_path, bucket, "fork", "m3") as tdb:
        await write(tdb, ["f"])
    found = await collect(
        bucket, ["src", "fork", "ghost"], "SELECT count(*) FROM hits", tmp_path / "cache"
    )
    assert found["src"] == ((5,),)
    assert found["fork"] == ((6,),)
    assert "no tenant ghost" in found["ghost"]


class CountingBucket:
    """``bucket`` counting the objects downloaded whole (snapshots) and read (segments)."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket
        self.downloads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)

    async def download_file(self, key: str, dest: Path, **options: Any) -> Any:
        self.downloads.append(key)
        return await self._bucket.download_file(key, dest, **options)


async def test_a_later_query_applies_only_the_new_log_to_its_cached_copy(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    cache = tmp_path / "cache"
    counting = CountingBucket(bucket)
    sql = "SELECT count(*) FROM hits"
    assert await collect(counting, ["src"], sql, cache) == {"src": ((5,),)}  # type: ignore[arg-type]
    assert len(counting.downloads) == 1  # the snapshot
    async with machine(tmp_path, bucket, "src", "m4") as tdb:
        await write(tdb, ["f", "g"])
    # The machine's stop publishes no snapshot (checkpoint_interval 0): the log grew.
    assert await collect(counting, ["src"], sql, cache) == {"src": ((7,),)}  # type: ignore[arg-type]
    assert len(counting.downloads) == 1
    # A copy changed behind the cache's back is not trusted: restored whole again.
    with contextlib.closing(sqlite3.connect(cache / "src.sqlite3")) as conn, conn:
        conn.execute("DELETE FROM hits")
    assert await collect(counting, ["src"], sql, cache) == {"src": ((7,),)}  # type: ignore[arg-type]
    assert len(counting.downloads) == 2


class CallsBucket:
    """``bucket`` noting the name of every method called on it."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._bucket, name)
        if callable(found):
            self.calls.append(name)
        return found


async def test_a_warm_query_of_an_unchanged_tenant_reads_lock_json_alone_and_hashes_nothing(
    bucket: Bucket, tmp_path: Path, source: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    sql = "SELECT count(*) FROM hits"
    assert await collect(bucket, ["src"], sql, cache) == {"src": ((5,),)}
    calls = CallsBucket(bucket)

    def hash_file(path: Path) -> Any:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(fleet_query, "hash_file", hash_file)
    assert await collect(calls, ["src"], sql, cache) == {"src": ((5,),)}  # type: ignore[arg-type]
    assert calls.calls == ["get"]  # lock.json


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO hits (note) VALUES ('no')",
        "DELETE FROM hits",
        "CREATE TABLE t (x)",
        "PRAGMA query_only = OFF",
        "ATTACH DATABASE 'other.sqlite3' AS other",
        "VACUUM INTO 'copy.sqlite3'",
        "PRAGMA user_version = 7",
    ],
)
async def test_a_query_cannot_write(
    bucket: Bucket, tmp_path: Path, sql: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with machine(tmp_path, bucket, "ro") as tdb:
        await write(tdb, ["x"])
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    await collect(bucket, ["ro"], "SELECT 1", cache)
    copy = (cache / "ro.sqlite3").read_bytes()
    found = await collect(bucket, ["ro"], sql, cache)
    assert isinstance(found["ro"], str), found
    assert (cache / "ro.sqlite3").read_bytes() == copy
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".sqlite3") == []
    assert await collect(bucket, ["ro"], "SELECT note FROM hits", cache) == {"ro": (("x",),)}


class LosesAnswers:
    """``bucket`` whose every PUT lands but answers 412, as a retry after a lost answer does."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)

    async def put(self, key: str, body: bytes, **conditions: Any) -> Any:
        await self._bucket.put(key, body, **conditions)
        raise PreconditionFailedError(f"{key!r} already exists (a retry)", key=key)


async def test_a_create_whose_answers_were_lost_recognises_its_own_writes(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    lossy: Any = LosesAnswers(bucket)
    await create_tenant(lossy, "fresh", prefix=PREFIX, lease_ttl=3)
    await create_tenant(lossy, "fork", prefix=PREFIX, lease_ttl=3, source="src")
    assert await served(tmp_path, bucket, "fork", "m9") == ["a", "b", "c", "d", "e"]
    assert await served(tmp_path, bucket, "fresh", "m9") == []


class ListsAStranger:
    """``bucket`` whose listings also name a key of another tenant."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        found = await self._bucket.list(prefix)
        stranger = await self._bucket.head(f"{PREFIX}other/lock.json")
        return [*found, stranger]


async def test_a_purge_deletes_nothing_a_listing_names_outside_the_tenant(
    bucket: Bucket, source: datetime
) -> None:
    await create_tenant(bucket, "other", prefix=PREFIX, lease_ttl=3)
    before = await objects(bucket)
    with pytest.raises(FleetError, match="outside it: deleting nothing"):
        await purge_tenant(ListsAStranger(bucket), "src", prefix=PREFIX)  # type: ignore[arg-type]
    # Only the purge mark was written; every object of both tenants is there.
    assert [key for key, _ in await objects(bucket)] == [key for key, _ in before]
    assert await keys(bucket, "other") != []


@pytest.mark.parametrize("bad", ["../x", "UPPER", "a/b", ""])
async def test_the_api_refuses_a_tenant_id_that_is_not_one(bucket: Bucket, bad: str) -> None:
    with pytest.raises(InvalidTenantError):
        await create_tenant(bucket, bad, prefix=PREFIX, lease_ttl=3)
    with pytest.raises(InvalidTenantError):
        await purge_tenant(bucket, bad, prefix=PREFIX)
    assert await bucket.list("") == []


async def test_a_query_at_a_past_moment_reads_each_tenant_as_it_was(
    bucket: Bucket, tmp_path: Path, source: datetime
) -> None:
    results = query_tenants(
        bucket,
        ["src"],
        "SELECT group_concat(note) FROM hits",
        prefix=PREFIX,
        cache_dir=tmp_path / "cache",
        at=source,
    )
    assert [(r.tenant, r.rows, r.error) async for r in results] == [("src", (("a,b",),), None)]
    # A moment restores into a scratch file: the cache keeps no copy of it.
    assert not (tmp_path / "cache" / "src.sqlite3").exists()


async def test_a_fork_of_a_log_without_snapshot_and_with_merged_segments_equals_it(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No snapshot replaces the log however slowly the merges come (a loaded machine).
    monkeypatch.setattr(compaction, "REBASE_MIN_BYTES", 1 << 40)
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 2)  # packs, and merges of them, soon
    notes = [f"n{i}" for i in range(40)]
    async with machine(tmp_path, bucket, "long") as tdb:
        await write(tdb, notes)
        # Merges run beside shipping: wait (bounded) until one is published.
        for _ in range(50):
            lock = await read_lock(bucket, "long", f"{PREFIX}long/lock.json")
            assert lock is not None
            assert lock.record.log is not None
            if lock.record.log.merged:
                break
            notes.append(f"n{len(notes)}")
            await write(tdb, notes[-1:])
            await asyncio.sleep(0.1)  # the shipper's loop merges between its intervals
        assert lock.record.log.merged  # compaction merged the oldest segments (from packs)
    assert lock.record.snapshot is None  # the log starts from an empty database
    created = await create_tenant(bucket, "copy", prefix=PREFIX, lease_ttl=3, source="long")
    assert (created.snapshot, created.copied) == (None, 0)
    assert await restored(bucket, "copy", tmp_path) == await restored(bucket, "long", tmp_path)
    assert await served(tmp_path, bucket, "copy", "m2") == notes
