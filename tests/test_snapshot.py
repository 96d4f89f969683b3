"""Consistent snapshots, publish, restore and retention on both bucket backends."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tenantdb.errors import SnapshotError
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LockRecord, now_ms
from tenantdb.protocol.snapshot import (
    copy_database,
    file_sha256,
    publish_snapshot,
    temp_snapshot_path,
    verify_database,
)
from tenantdb.replication.checksum import PageHashes, database_page_size
from tenantdb.replication.restore import restore_database
from tenantdb.replication.shipper import empty_log
from tenantdb.storage.base import Bucket


async def publish(
    lease: Lease, bucket: Bucket, source: sqlite3.Connection, work_dir: Path
) -> LockRecord:
    """Copy the live database and publish the copy as a snapshot with an empty log."""
    copy = temp_snapshot_path(work_dir)
    try:
        copy_database(source, copy)
        hashes = PageHashes.of_file(copy, database_page_size(copy))
        log = empty_log(hashes)
        return await publish_snapshot(lease, bucket, copy, log=log, taken_ms=now_ms())
    finally:
        copy.unlink(missing_ok=True)


async def restore(bucket: Bucket, record: LockRecord, target: Path) -> None:
    await restore_database(bucket, record, target, prefix="tenants/")


def live_wal_database(path: Path, rows: int) -> sqlite3.Connection:
    """A WAL database whose rows are committed but not checkpointed into the main file."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i}",) for i in range(rows)])
    return conn


def count_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


def test_snapshot_contains_rows_still_in_the_wal(tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    writer = live_wal_database(db, 500)
    assert Path(f"{db}-wal").stat().st_size > 0
    source = sqlite3.connect(db)
    snap_path = tmp_path / "snap.sqlite3"
    copy_database(source, snap_path)
    verify_database(snap_path)
    # A raw copy of the main file would miss the WAL: prove the rows are not there yet.
    raw = tmp_path / "raw.sqlite3"
    raw.write_bytes(db.read_bytes())
    with pytest.raises(sqlite3.OperationalError):
        count_rows(raw)
    assert count_rows(snap_path) == 500
    assert not Path(f"{snap_path}-wal").exists()
    writer.close()
    source.close()


def test_verify_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.sqlite3"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SnapshotError, match="not a usable SQLite database"):
        verify_database(bogus)


async def held_lease(bucket: Bucket) -> Lease:
    lease = Lease(bucket, "acme", machine_id="m1", region="ams", ttl=15)
    await lease.acquire()
    return lease


async def test_publish_then_restore_round_trips_the_data(bucket: Bucket, tmp_path: Path) -> None:
    lease = await held_lease(bucket)
    writer = live_wal_database(tmp_path / "live.sqlite3", 1000)
    source = sqlite3.connect(tmp_path / "live.sqlite3", check_same_thread=False)
    record = await publish(lease, bucket, source, tmp_path)
    assert record.snapshot is not None
    assert re.fullmatch(
        r"tenants/acme/snapshots/00000001-00000002-000000000001-\d{13}-[0-9a-f]{16}\.sqlite3",
        record.snapshot.key,
    )
    assert list(tmp_path.glob(".snapshot-*")) == []

    restored = tmp_path / "other-machine" / "acme.sqlite3"
    restored.parent.mkdir()
    await restore(bucket, record, restored)
    assert count_rows(restored) == 1000
    assert file_sha256(restored) == record.snapshot.sha256
    writer.close()
    source.close()


async def test_corrupt_snapshot_is_refused_and_nothing_changes(
    bucket: Bucket, tmp_path: Path
) -> None:
    lease = await held_lease(bucket)
    writer = live_wal_database(tmp_path / "live.sqlite3", 200)
    source = sqlite3.connect(tmp_path / "live.sqlite3", check_same_thread=False)
    record = await publish(lease, bucket, source, tmp_path)
    assert record.snapshot is not None
    key = record.snapshot.key
    original = tmp_path / "original"
    await bucket.download_file(key, original)
    flipped = bytearray(original.read_bytes())
    for offset in range(5000, 5016):
        flipped[offset] ^= 0xFF
    damaged = tmp_path / "damaged"
    damaged.write_bytes(bytes(flipped))
    await bucket.upload_file(key, damaged)
    lock_before = (await bucket.get(lease.key)).body
    snapshot_before = (await bucket.head(key)).etag

    target = tmp_path / "restore" / "acme.sqlite3"
    target.parent.mkdir()
    target.write_bytes(b"previous good local file")
    with pytest.raises(SnapshotError, match="corrupt") as error:
        await restore(bucket, record, target)
    assert key in str(error.value)
    assert target.read_bytes() == b"previous good local file"
    assert [p.name for p in target.parent.iterdir()] == ["acme.sqlite3"]
    assert (await bucket.get(lease.key)).body == lock_before
    assert (await bucket.head(key)).etag == snapshot_before
    writer.close()
    source.close()


async def test_missing_snapshot_object_is_a_clear_error_naming_the_key(
    bucket: Bucket, tmp_path: Path
) -> None:
    lease = await held_lease(bucket)
    writer = live_wal_database(tmp_path / "live.sqlite3", 10)
    source = sqlite3.connect(tmp_path / "live.sqlite3", check_same_thread=False)
    record = await publish(lease, bucket, source, tmp_path)
    assert record.snapshot is not None
    await bucket.delete(record.snapshot.key)
    with pytest.raises(SnapshotError, match="missing") as error:
        await restore(bucket, record, tmp_path / "acme.sqlite3")
    assert record.snapshot.key in str(error.value)
    assert not (tmp_path / "acme.sqlite3").exists()
    writer.close()
    source.close()
