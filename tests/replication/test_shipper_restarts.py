"""The shipper on a real database: a WAL it cannot follow costs a snapshot, never a commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from tenantdb.config import Settings
from tenantdb.machine.database import TenantDB
from tenantdb.replication import checkpoint
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.shipper import Shipper
from tenantdb.replication.wal import wal_start
from tenantdb.storage.base import Bucket

MIGRATIONS = [
    "CREATE TABLE items (id INTEGER PRIMARY KEY)",
    "CREATE TABLE others (id INTEGER PRIMARY KEY)",
]
PREFIX = "tenants/"


def machine(bucket: Bucket, tmp_path: Path) -> TenantDB:
    settings = Settings(
        tenant="acme",
        machine_id="m1",
        data_dir=tmp_path / "m1",
        lease_ttl=3,
        checkpoint_interval=0,
        sync_interval=3600,  # the test ships by hand
    )
    return TenantDB(settings, migrations=MIGRATIONS, bucket=bucket)


async def test_two_wal_restarts_take_a_snapshot_not_skip_a_commit(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    async with machine(local_bucket, tmp_path) as tdb:
        async with tdb.connection() as db:
            await db.execute("INSERT INTO items (id) VALUES (1)")
            await db.commit()
        await tdb.sync()
        shipper = tdb._shipper
        assert isinstance(shipper, Shipper)
        async with shipper._lock:  # the shipper's own checkpoint of everything shipped
            await asyncio.to_thread(shipper._checkpoint)
        async with tdb.connection() as db:
            # A commit restarts the WAL; another connection's checkpoint and the next
            # commit restart it again. Each commit changes its own table's page.
            await db.execute("INSERT INTO others (id) VALUES (2)")
            await db.commit()
            await db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            await db.execute("INSERT INTO items (id) VALUES (3)")
            await db.commit()
        await tdb.sync()  # answered: the bucket must have both commits now
        dest = tmp_path / "restored.sqlite3"
        await restore_at(local_bucket, "acme", dest, prefix=PREFIX)
    conn = sqlite3.connect(dest)
    try:
        assert conn.execute("SELECT id FROM others").fetchall() == [(2,)]
        assert conn.execute("SELECT id FROM items ORDER BY id").fetchall() == [(1,), (3,)]
    finally:
        conn.close()


async def test_a_wal_restart_after_unread_commits_takes_a_snapshot_not_skip_them(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    async with machine(local_bucket, tmp_path) as tdb:
        async with tdb.connection() as db:
            await db.execute("INSERT INTO items (id) VALUES (1)")
            await db.commit()
        await tdb.sync()
        shipper = tdb._shipper
        assert isinstance(shipper, Shipper)
        reader = sqlite3.connect(tdb.path, isolation_level=None)
        try:
            # A reader of the WAL as it is: it lets the checkpoint take every frame, and
            # holds off the restart that the next commit would make.
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM items").fetchone()
            async with shipper._lock:  # the shipper's own checkpoint of everything shipped
                await asyncio.to_thread(shipper._checkpoint)
            assert shipper._restart_expected
            async with tdb.connection() as db:
                # This commit goes on in the old WAL, after the shipped position.
                await db.execute("INSERT INTO others (id) VALUES (2)")
                await db.commit()
                reader.execute("ROLLBACK")
                # The app checkpoints it; the next commit restarts the WAL once.
                await db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                await db.execute("INSERT INTO items (id) VALUES (3)")
                await db.commit()
        finally:
            reader.close()
        await tdb.sync()
        dest = tmp_path / "restored.sqlite3"
        await restore_at(local_bucket, "acme", dest, prefix=PREFIX)
    conn = sqlite3.connect(dest)
    try:
        assert conn.execute("SELECT id FROM others").fetchall() == [(2,)]
        assert conn.execute("SELECT id FROM items ORDER BY id").fetchall() == [(1,), (3,)]
    finally:
        conn.close()


async def test_the_restart_after_checkpointing_a_wal_longer_than_16_mib_is_followed(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    # The bench's interleaving at 1,000 writes/s: the WAL outgrows the size at which the
    # shipper holds writes off to ship and checkpoint it all (16 MiB), and the next commit
    # restarts it. With a 16 MiB journal_size_limit, that commit cut the file below the
    # shipped position, erasing the proof that the restart dropped nothing: a snapshot.
    async with machine(local_bucket, tmp_path) as tdb:
        shipper = tdb._shipper
        assert isinstance(shipper, Shipper)
        held = checkpoint.CHECKPOINT_WAL_BYTES * checkpoint.CHECKPOINT_STALL_FACTOR
        async with tdb.connection() as db:
            await db.execute("INSERT INTO items (id) VALUES (1)")
            await db.commit()
            # One commit per statement, each rewriting the same page: one frame apiece.
            updates = held // 4096 + 256
            await db.executescript("UPDATE items SET id = id + 1;" * updates)
        await tdb.sync()
        assert shipper._wal_bytes() > held
        await shipper._checkpoint_if_large()  # holds writes off, checkpoints everything
        assert shipper._restart_expected
        shipped = shipper._position
        assert shipped is not None
        assert shipped.offset > 16 << 20
        async with tdb.connection() as db:
            await db.execute("INSERT INTO others (id) VALUES (2)")  # restarts the WAL
            await db.commit()
        restarted = wal_start(shipper.wal_path)
        assert restarted is not None
        assert restarted.salt1 == shipped.salt1 + 1
        await shipper._checkpoint_if_large()  # the restart is not read yet: nothing cut
        await tdb.sync()
        record = tdb.lease.record
        assert record is not None
        assert record.snapshot is None, "the restart was followed, no snapshot taken"
        await shipper._checkpoint_if_large()  # read: the stale frames past it are cut
        assert shipper.wal_path.stat().st_size == checkpoint.WAL_FILE_BYTES
        dest = tmp_path / "restored.sqlite3"
        await restore_at(local_bucket, "acme", dest, prefix=PREFIX)
    conn = sqlite3.connect(dest)
    try:
        assert conn.execute("SELECT id FROM others").fetchall() == [(2,)]
        assert conn.execute("SELECT id FROM items").fetchall() == [(updates + 1,)]
    finally:
        conn.close()
