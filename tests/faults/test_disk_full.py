"""A full disk during restore or snapshot: a clear error naming the cause, and neither the
previous good local file nor the bucket is touched.

The real variants put the data directory on a small tmpfs (``mount -t tmpfs``; skipped
where mounting is not permitted). The injected variants make the file layer fail with
ENOSPC (``os.posix_fallocate``, ``os.pwrite``, ``os.fsync``) and run everywhere.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tenantdb.errors import LocalDiskError, SnapshotError, StorageError
from tenantdb.machine.database import TenantDB
from tests.faults.conftest import MiB, ProxiedS3

MIGRATIONS = ["CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)"]
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"

Mount = Callable[[str], Path]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Mount]:
    """``small_disk("2m")`` mounts a tmpfs of that size and returns its directory."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{len(mounted)}"
        where.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


async def add_blobs(tdb: TenantDB, count: int, size: int) -> None:
    async with tdb.connection() as db:
        await db.executemany("INSERT INTO blobs (data) VALUES (randomblob(?))", [(size,)] * count)
        await db.commit()


def blob_bytes(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        return int(conn.execute("SELECT coalesce(sum(length(data)), 0) FROM blobs").fetchone()[0])
    finally:
        conn.close()


def leftovers(directory: Path) -> list[str]:
    """Temporary files of restores and snapshots left in ``directory``."""
    return sorted(
        p.name for p in directory.iterdir() if "restore-" in p.name or ".snapshot-" in p.name
    )


class BucketState:
    """What a test must find unchanged: lock.json's snapshot, and every snapshot object."""

    def __init__(self, s3: ProxiedS3) -> None:
        self.snapshot = s3.lock()["snapshot"]
        self.objects = {key: s3.get(key) for key in s3.keys("tenants/acme/snapshots/")}

    def assert_unchanged(self, s3: ProxiedS3) -> None:
        assert s3.lock()["snapshot"] == self.snapshot
        assert {key: s3.get(key) for key in s3.keys("tenants/acme/snapshots/")} == self.objects


async def old_then_new(s3: ProxiedS3, data_dir: Path, new_bytes: int) -> Path:
    """m2 keeps an old local copy in ``data_dir``; then m1 publishes ``new_bytes`` more."""
    direct = await s3.open(proxied=False)
    settings = s3.settings("m2", data_dir=data_dir)
    async with TenantDB(settings, migrations=MIGRATIONS, bucket=direct) as tdb:
        await add_blobs(tdb, 1, 1000)
    async with TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=direct) as tdb:
        await add_blobs(tdb, new_bytes // (MiB // 4), MiB // 4)
        await tdb.checkpoint()
    return data_dir / "acme.sqlite3"


def assert_clear_disk_error(error: BaseException, *, key: str = "") -> None:
    assert isinstance(error, LocalDiskError | SnapshotError), repr(error)
    message = str(error)
    assert NO_SPACE in message or "disk is full" in message, message
    if key:
        assert key in message


# -- restore ---------------------------------------------------------------------------------


async def test_restore_onto_a_full_tmpfs_fails_clearly_and_keeps_the_old_file(
    s3: ProxiedS3, small_disk: Mount
) -> None:
    disk = small_disk("2m")
    old_file = await old_then_new(s3, disk / "data", 3 * MiB)
    old_bytes = old_file.read_bytes()
    bucket_before = BucketState(s3)
    bucket = await s3.open(proxied=False)
    tdb = TenantDB(s3.settings("m2", data_dir=disk / "data"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(StorageError) as raised:
        await tdb.start(standby=False)
    assert_clear_disk_error(raised.value, key=bucket_before.snapshot["key"])
    assert old_file.read_bytes() == old_bytes
    assert blob_bytes(old_file) == 1000
    assert leftovers(old_file.parent) == []
    bucket_before.assert_unchanged(s3)


async def test_restore_with_the_disk_filling_up_mid_download_keeps_the_old_file(
    s3: ProxiedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_file = await old_then_new(s3, s3.tmp_path / "m2", 2 * MiB)
    old_bytes = old_file.read_bytes()
    bucket_before = BucketState(s3)
    bucket = await s3.open(proxied=False)
    real_pwrite = os.pwrite
    written = 0

    def unsupported(*args: Any) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def pwrite_until_full(fd: int, data: Any, offset: int) -> int:
        nonlocal written
        if written >= MiB:
            raise OSError(errno.ENOSPC, NO_SPACE)
        n: int = real_pwrite(fd, data, offset)
        written += n
        return n

    # A file system without fallocate: the space runs out after 1 MiB has been written.
    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    monkeypatch.setattr(os, "pwrite", pwrite_until_full)
    tdb = TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(LocalDiskError) as raised:
        await tdb.start(standby=False)
    monkeypatch.undo()
    assert written >= MiB  # the failure came mid-download
    assert_clear_disk_error(raised.value, key=bucket_before.snapshot["key"])
    assert old_file.read_bytes() == old_bytes
    assert leftovers(old_file.parent) == []
    bucket_before.assert_unchanged(s3)


async def test_restore_refused_by_fallocate_keeps_the_old_file(
    s3: ProxiedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_file = await old_then_new(s3, s3.tmp_path / "m2", MiB)
    old_bytes = old_file.read_bytes()
    bucket_before = BucketState(s3)
    bucket = await s3.open(proxied=False)

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(os, "posix_fallocate", full)
    tdb = TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(LocalDiskError) as raised:
        await tdb.start(standby=False)
    monkeypatch.undo()
    assert_clear_disk_error(raised.value, key=bucket_before.snapshot["key"])
    assert old_file.read_bytes() == old_bytes
    assert leftovers(old_file.parent) == []
    bucket_before.assert_unchanged(s3)


# -- snapshot --------------------------------------------------------------------------------


def fill(directory: Path, leave: int) -> Path:
    """Fill the file system of ``directory`` until about ``leave`` bytes are free."""
    filler = directory / f"filler-{uuid.uuid4().hex}"
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as f:
        remaining = max(0, free - leave)
        chunk = b"\0" * MiB
        while remaining > 0:
            try:
                remaining -= f.write(chunk[: min(MiB, remaining)])
            except OSError:
                break
    return filler


async def test_a_snapshot_on_a_full_tmpfs_fails_clearly_and_changes_nothing(
    s3: ProxiedS3, small_disk: Mount
) -> None:
    disk = small_disk("4m")
    bucket = await s3.open(proxied=False)
    tdb = TenantDB(s3.settings("m1", data_dir=disk), migrations=MIGRATIONS, bucket=bucket)
    await tdb.start(standby=False)
    try:
        await add_blobs(tdb, 1, 1000)
        assert await tdb.checkpoint() is True
        await add_blobs(tdb, 4, 256 * 1024)  # 1 MiB more: the next snapshot needs ~1 MiB
        with sqlite3.connect(tdb.path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        bucket_before = BucketState(s3)
        lock_before = s3.lock()
        filler = fill(disk, leave=256 * 1024)
        with pytest.raises(SnapshotError) as raised:
            await tdb.checkpoint()
        assert_clear_disk_error(raised.value)
        assert str(disk) in str(raised.value)  # where it could not write
        # Nothing was uploaded or published; the live database is intact and still used.
        bucket_before.assert_unchanged(s3)
        assert s3.lock() == lock_before
        assert leftovers(disk) == []
        assert blob_bytes(tdb.path) == 1000 + MiB
        # Once there is room again, the next checkpoint publishes everything.
        filler.unlink()
        assert await tdb.checkpoint() is True
        assert s3.lock()["snapshot"]["size"] > MiB
    finally:
        await tdb.stop()
    assert s3.lock()["owner"] is None


async def test_a_snapshot_whose_fsync_fails_is_a_local_disk_error(
    s3: ProxiedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = await s3.open(proxied=False)
    async with TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        await add_blobs(tdb, 2, 1000)
        assert await tdb.checkpoint() is True
        await add_blobs(tdb, 2, 1000)
        bucket_before = BucketState(s3)
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            # Only the snapshot copy fails, as a disk that filled up under its write-back.
            if ".snapshot-" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, NO_SPACE)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(LocalDiskError) as raised:
            await tdb.checkpoint()
        monkeypatch.undo()
        assert_clear_disk_error(raised.value)
        bucket_before.assert_unchanged(s3)
        assert leftovers(tdb.path.parent) == []
        assert blob_bytes(tdb.path) == 4000
        assert await tdb.checkpoint() is True
