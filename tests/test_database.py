"""TenantDB: startup, migrations, checkpoints and shutdown on real files and buckets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from tenantdb.config import Settings
from tenantdb.connections.pool import ConnectionPool
from tenantdb.errors import (
    ConfigurationError,
    DataDirLockedError,
    LeaseHeldError,
    LocalDiskError,
    TenantDBError,
    TransientStorageError,
)
from tenantdb.machine.database import TenantDB, apply_migrations
from tenantdb.machine.migrations import schema_of
from tenantdb.protocol.lease import Lease
from tenantdb.replication.pitr import restore_at
from tenantdb.storage.base import Bucket, ObjectInfo
from tenantdb.storage.local import LocalBucket

MIGRATIONS = [
    "CREATE TABLE hits (id INTEGER PRIMARY KEY);",
    "ALTER TABLE hits ADD COLUMN note TEXT; CREATE INDEX hits_note ON hits (note);",
]


def settings(tmp_path: Path, machine: str, **kwargs: Any) -> Settings:
    return Settings(
        tenant="acme",
        machine_id=machine,
        data_dir=tmp_path / machine,
        local_bucket_dir=tmp_path / "bucket",
        lease_ttl=3,
        checkpoint_interval=0,
        **kwargs,
    )


async def hits(tdb: TenantDB) -> int:
    async with tdb.connection() as db, db.execute("SELECT count(*) FROM hits") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def add_hits(tdb: TenantDB, n: int) -> None:
    async with tdb.connection() as db:
        await db.executemany("INSERT INTO hits (note) VALUES ('x')", [()] * n)
        await db.commit()


def migrate_note(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE hits ADD COLUMN note TEXT")


def test_a_migration_lists_schema_is_its_length_and_a_hash_of_its_items() -> None:
    schema = schema_of(MIGRATIONS)
    assert schema.version == 2
    assert schema_of(MIGRATIONS) == schema
    assert schema_of(MIGRATIONS[:1]).hash != schema.hash
    # An item edited in place, or text moved between items, is another list.
    assert schema_of([MIGRATIONS[0], MIGRATIONS[1] + " "]).hash != schema.hash
    assert schema_of(["a", "bc"]).hash != schema_of(["ab", "c"]).hash
    # A callable counts by its module-qualified name.
    assert schema_of([MIGRATIONS[0], migrate_note]) == schema_of([MIGRATIONS[0], migrate_note])
    assert schema_of([MIGRATIONS[0], migrate_note]).hash != schema.hash


async def test_lock_json_carries_the_schema_from_the_start_and_through_the_release(
    tmp_path: Path,
) -> None:
    async with LocalBucket(tmp_path / "bucket") as bucket:

        async def lock() -> dict[str, Any]:
            return dict(json.loads((await bucket.get("tenants/acme/lock.json")).body))

        async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS[:1], bucket=bucket):
            assert (await lock())["schema"] == asdict(schema_of(MIGRATIONS[:1]))
        async with TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS, bucket=bucket):
            assert (await lock())["schema"] == {"version": 2, "hash": schema_of(MIGRATIONS).hash}
            # The migration's commit reached the bucket before lock.json said version 2.
            restored = tmp_path / "restored.sqlite3"
            await restore_at(bucket, "acme", restored, prefix="tenants/")
            with contextlib.closing(sqlite3.connect(restored)) as conn:
                assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        released = await lock()
        assert released["owner"] is None
        assert released["schema"]["version"] == 2


def test_migrations_run_once_each_by_user_version(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    assert apply_migrations(db, MIGRATIONS[:1]) == 1
    assert apply_migrations(db, MIGRATIONS) == 1
    assert apply_migrations(db, MIGRATIONS) == 0
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


def test_a_failing_migration_rolls_back_and_keeps_the_version(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    with pytest.raises(sqlite3.OperationalError):
        apply_migrations(db, [*MIGRATIONS, "CREATE TABLE t2 (a); INSERT INTO nowhere VALUES (1);"])
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "t2" not in tables
    conn.close()


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    apply_migrations(db, MIGRATIONS)
    with pytest.raises(ConfigurationError, match="schema version 2, but only 1 migrations"):
        apply_migrations(db, MIGRATIONS[:1])


def test_opening_a_database_without_migrations_says_to_pass_them(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    apply_migrations(db, MIGRATIONS)
    with pytest.raises(ConfigurationError) as raised:
        apply_migrations(db, [])
    assert "no migrations were given" in str(raised.value)
    assert "migrations=MIGRATIONS" in str(raised.value)
    assert "older release" not in str(raised.value)


async def test_a_data_directory_that_cannot_be_made_says_which_variable_moves_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "m1").write_text("a file where the data directory should be")
    with pytest.raises(LocalDiskError) as raised:
        async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS):
            pass
    assert str(tmp_path / "m1") in str(raised.value)
    assert "set TENANTDB_DATA_DIR to a writable directory" in str(raised.value)


async def test_data_survives_a_move_to_another_machine(tmp_path: Path) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS) as tdb:
        await add_hits(tdb, 42)
    async with TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS) as tdb:
        assert await hits(tdb) == 42
        assert tdb.lease.record is not None
        assert tdb.lease.record.generation == 2


async def test_a_second_process_on_the_same_data_dir_fails_clearly(tmp_path: Path) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS):
        with pytest.raises(DataDirLockedError, match="locked by another tenantdb process"):
            await TenantDB(settings(tmp_path, "m1")).start()


async def test_a_script_fails_while_another_machine_holds_the_lease(tmp_path: Path) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS):
        with pytest.raises(LeaseHeldError, match="held by machine m1"):
            await TenantDB(settings(tmp_path, "m2")).start(standby=False)


async def test_pooled_connections_keep_concurrent_transactions_apart(tmp_path: Path) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS) as tdb:

        async def writer(rollback: bool) -> None:
            async with tdb.connection() as db:
                await db.execute("INSERT INTO hits (note) VALUES ('w')")
                await asyncio.sleep(0.01)  # another request runs meanwhile
                if rollback:
                    await db.rollback()
                else:
                    await db.commit()

        await asyncio.gather(*(writer(rollback=i % 2 == 1) for i in range(20)))
        assert await hits(tdb) == 10

        async with tdb.connection() as db:
            await db.execute("INSERT INTO hits (note) VALUES ('forgotten')")  # never committed
        assert await hits(tdb) == 10


async def test_sync_ships_a_segment_only_when_the_database_changed(tmp_path: Path) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS) as tdb:
        await tdb.sync()  # the migrations: the new tenant's first segment
        log = tdb.lease.record.log if tdb.lease.record else None
        assert log is not None
        assert (log.base, log.tail) == (1, 1)
        await tdb.sync()
        assert tdb.lease.record is not None
        assert tdb.lease.record.log == log
        await add_hits(tdb, 1)
        await tdb.sync()
        assert tdb.lease.record.log is not None
        assert tdb.lease.record.log.tail == 2


class FailingGets:
    """A bucket whose reads of one key fail transiently, forever."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str, *, max_size: int | None = None) -> Any:
        self.calls += 1
        raise TransientStorageError("503 SlowDown (injected)", key=key, operation="get")


async def test_transient_errors_reading_the_lock_never_create_an_empty_database(
    tmp_path: Path,
) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS) as tdb:
        await add_hits(tdb, 7)
    async with LocalBucket(tmp_path / "bucket") as real:
        lock_before = (await real.get("tenants/acme/lock.json")).body
        failing = FailingGets(real)
        tdb2 = TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS, bucket=failing)  # type: ignore[arg-type]
        with pytest.raises(TransientStorageError):
            await tdb2.start()
        assert failing.calls >= 1
        assert not (tmp_path / "m2" / "acme.sqlite3").exists()
        assert (await real.get("tenants/acme/lock.json")).body == lock_before


class FailingUploads:
    """A bucket whose snapshot uploads fail (the lock stays writable)."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def upload_file(self, key: str, src: Path, **conditions: Any) -> ObjectInfo:
        raise TransientStorageError("500 (injected)", key=key, operation="upload")


async def test_failed_final_publish_keeps_the_lease_and_the_local_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS) as tdb:
        await add_hits(tdb, 5)
    async with LocalBucket(tmp_path / "bucket") as real:
        broken = TenantDB(
            settings(tmp_path, "m1", kill_timeout=2),
            migrations=MIGRATIONS,
            bucket=FailingUploads(real),  # type: ignore[arg-type]
        )
        await broken.start()
        await add_hits(broken, 3)
        await broken.stop()
        assert "FINAL PUBLISH FAILED" in caplog.text
        lock = json.loads((await real.get("tenants/acme/lock.json")).body)
        assert lock["owner"] == "m1"  # not released: nobody may start from older data
    # The same machine restarts: it continues from its local file, then publishes it.
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS) as tdb:
        assert await hits(tdb) == 8
    async with TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS) as tdb:
        assert await hits(tdb) == 8


async def test_requests_waiting_for_a_connection_are_told_when_the_pool_closes(
    tmp_path: Path,
) -> None:
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=1)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await pool.close()
    with pytest.raises(TenantDBError, match="closed"):
        await waiter
    with pytest.raises(TenantDBError, match="closed"):
        await pool.acquire()
    await pool.release(held)  # a late release after close is harmless


async def test_the_pool_lends_one_connection_grows_behind_a_long_holder_then_shrinks(
    tmp_path: Path,
) -> None:
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=3, grow_after=0.05)
    first = await pool.acquire()
    await pool.release(first)
    assert await pool.acquire() is first  # quick requests keep reusing one connection

    # `first` is held (a websocket, say): the next request waits grow_after, then gets another.
    started = asyncio.get_running_loop().time()
    second = await pool.acquire()
    assert second is not first
    assert asyncio.get_running_loop().time() - started >= 0.04
    await pool.release(second)
    await pool.release(first)  # nobody waits and `second` is idle: `first` is closed
    assert await pool.acquire() is second
    third = await asyncio.wait_for(pool.acquire(), timeout=5)  # grows again behind `second`
    assert third not in (first, second)
    await pool.close()


async def test_a_long_queue_of_quick_borrowers_takes_turns_on_one_connection(
    tmp_path: Path,
) -> None:
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=8, grow_after=0.1)
    async with pool.connection():
        pass  # opened beforehand: opening one must not count as holding a turn long
    seen: set[aiosqlite.Connection] = set()

    async def borrower() -> None:
        async with pool.connection() as conn:
            seen.add(conn)
            await asyncio.sleep(0.005)  # each holds its turn far less than grow_after

    # 60 borrowers wait 0.3 s in all: waiting that long never lets one go beside another.
    await asyncio.gather(*(borrower() for _ in range(60)))
    assert len(seen) <= 2, f"{len(seen)} connections"  # 1, or 2 if the machine stalled
    await pool.close()


# A process that dies (SIGKILL) in the middle of a big rollback-journal transaction, leaving
# a hot journal beside its database, as a migration cut short by a crash does.
HOT_JOURNAL = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=DELETE")
conn.execute("CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)")
conn.executemany("INSERT INTO hits (note) VALUES (?)", [("old" * 300,)] * 300)
conn.execute("PRAGMA cache_size=2")
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE hits SET note = 'changed' || note")
conn.execute("INSERT INTO hits (note) SELECT note FROM hits")
os.kill(os.getpid(), signal.SIGKILL)
"""


def leave_hot_journal(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", HOT_JOURNAL, str(path)], check=False)
    assert done.returncode == -signal.SIGKILL
    assert Path(f"{path}-journal").stat().st_size > 0


async def test_a_leftover_journal_never_rolls_back_into_a_restored_database(
    tmp_path: Path,
) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS) as tdb:
        await add_hits(tdb, 5)
    leave_hot_journal(tmp_path / "m2" / "acme.sqlite3")
    async with TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS) as tdb:
        assert await hits(tdb) == 5
        async with tdb.connection() as db, db.execute("PRAGMA integrity_check") as cursor:
            assert await cursor.fetchall() == [("ok",)]
    assert not Path(tmp_path / "m2" / "acme.sqlite3-journal").exists()


async def test_a_second_process_with_the_same_machine_id_never_takes_a_live_lease(
    tmp_path: Path,
) -> None:
    first = TenantDB(settings(tmp_path, "local-host"), migrations=MIGRATIONS)
    await first.start(standby=False)
    await add_hits(first, 1)
    beside = settings(tmp_path, "local-host").with_overrides(data_dir=tmp_path / "script")
    with pytest.raises(LeaseHeldError):
        async with TenantDB(beside, migrations=MIGRATIONS):
            pass
    standby = TenantDB(beside, migrations=MIGRATIONS)
    await standby.start()
    assert standby.state == "standby"
    assert first.serving
    await add_hits(first, 1)
    await first.stop()
    await standby.stop()
    async with TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS) as tdb:
        assert await hits(tdb) == 2


async def test_a_connection_being_opened_when_the_pool_closes_is_never_lent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = aiosqlite.connect

    async def slow_connect(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
        await asyncio.sleep(0.3)
        return await connect(*args, **kwargs)

    monkeypatch.setattr(aiosqlite, "connect", slow_connect)
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=2)
    late = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    await pool.close()
    with pytest.raises(TenantDBError, match="closed"):
        await late
    assert pool._opened == []


class FlakyDownloads:
    """A bucket whose first ``failures`` downloads fail, or that downloads slowly."""

    def __init__(self, inner: Bucket, *, failures: int = 0, delay: float = 0.0) -> None:
        self.inner = inner
        self.failures = failures
        self.delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def download_file(
        self, key: str, dest: Path, *, max_size: int | None = None
    ) -> ObjectInfo:
        await asyncio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise TransientStorageError("503 (injected)", key=key, operation="download")
        return await self.inner.download_file(key, dest, max_size=max_size)


async def test_a_standby_whose_restore_fails_keeps_the_lease_and_retries_until_it_serves(
    tmp_path: Path,
) -> None:
    async with TenantDB(settings(tmp_path, "m0"), migrations=MIGRATIONS) as tdb:
        await add_hits(tdb, 3)
    async with LocalBucket(tmp_path / "bucket") as real:
        crashed = Lease(real, "acme", machine_id="m1", region="local", ttl=3)
        await crashed.acquire()  # and never renews
        standby = TenantDB(
            settings(tmp_path, "m2"),
            migrations=MIGRATIONS,
            bucket=FlakyDownloads(real, failures=2),  # type: ignore[arg-type]
        )
        await standby.start()
        states: set[str] = set()
        for _ in range(200):
            states.add(standby.state)
            if standby.state == "restoring" and standby.problem:
                assert standby.lease.valid_for > 0  # held and renewed while it retries
            if standby.serving:
                break
            await asyncio.sleep(0.1)
        assert standby.serving, (standby.state, standby.problem)
        assert "fenced" not in states
        assert await hits(standby) == 3
        await standby.stop()


async def test_a_restore_longer_than_the_ttl_keeps_the_lease_it_started_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with TenantDB(settings(tmp_path, "m0"), migrations=MIGRATIONS) as tdb:
        await add_hits(tdb, 3)
    async with LocalBucket(tmp_path / "bucket") as real:
        tdb = TenantDB(
            settings(tmp_path, "m1"),
            migrations=MIGRATIONS,
            bucket=FlakyDownloads(real, delay=4.5),  # type: ignore[arg-type]
        )
        await tdb.start(standby=False)
        await asyncio.sleep(1.5)  # past the first renewal after opening
        assert tdb.serving
        assert tdb.lease.record is not None
        assert tdb.lease.record.generation == 2
        assert "stepping down" not in caplog.text
        await tdb.stop()


async def test_temporary_files_a_killed_process_left_are_removed_at_start(
    tmp_path: Path,
) -> None:
    data = tmp_path / "m1"
    data.mkdir()
    stray = [data / ".snapshot-0123.sqlite3", data / ".acme.sqlite3.restore-4567"]
    for path in stray:
        path.write_bytes(b"x" * 1000)
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS):
        assert [path for path in stray if path.exists()] == []
