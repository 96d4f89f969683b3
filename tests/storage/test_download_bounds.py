"""Objects are never read whole before their size is checked: a snapshot larger than
lock.json says, or a segment larger than any segment may be, is refused before its bytes
reach the disk or the memory."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from tenantdb.errors import ObjectTooLargeError, ReplicationError, SnapshotError
from tenantdb.protocol.lockfile import LogChunk, SnapshotRef
from tenantdb.protocol.snapshot import download_snapshot
from tenantdb.replication.log_objects import LogObjects
from tenantdb.replication.restore import fetch_segment
from tenantdb.replication.segment import SEGMENT_MAX_BYTES
from tenantdb.storage import Bucket, LocalBucket

MiB = 1 << 20
SNAPSHOT = "tenants/acme/snapshots/000000000003-000000000001-ab.sqlite3"


def big_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(64) * (MiB // 64))
    return path


async def test_a_snapshot_larger_than_lock_json_says_is_refused_before_a_byte_is_written(
    bucket: Bucket, tmp_path: Path
) -> None:
    await bucket.upload_file(SNAPSHOT, big_file(tmp_path / "big", 12 * MiB))
    ref = SnapshotRef(key=SNAPSHOT, sha256="0" * 64, size=8192, published_at="")
    dest = tmp_path / "restoring.sqlite3"
    with pytest.raises(SnapshotError, match=r"is 12582912 bytes, lock.json says 8192"):
        await download_snapshot(bucket, ref, dest)
    assert not dest.exists() or dest.stat().st_size == 0


async def test_a_download_stops_at_its_limit_when_the_blob_outgrew_its_size(
    local_bucket: LocalBucket, tmp_path: Path
) -> None:
    """The local bucket's pointer says 8 KiB; the blob behind it grew to 12 MiB."""
    await local_bucket.put(SNAPSHOT, b"s" * 8192)
    (blob,) = (local_bucket.root / "blobs").iterdir()
    with open(blob, "ab") as f:
        f.write(b"x" * (12 * MiB))
    dest = tmp_path / "restoring.sqlite3"
    with pytest.raises(ObjectTooLargeError):
        await local_bucket.download_file(SNAPSHOT, dest, max_size=8192)
    assert dest.stat().st_size <= 8192
    with pytest.raises(ObjectTooLargeError):
        await local_bucket.get(SNAPSHOT, max_size=8192)


async def test_a_segment_object_over_the_limit_is_refused_without_reading_it(
    local_bucket: LocalBucket, tmp_path: Path
) -> None:
    key = "tenants/acme/log/000000000003/000000000001.seg"
    await local_bucket.upload_file(key, big_file(tmp_path / "big", SEGMENT_MAX_BYTES + 8 * MiB))
    tracemalloc.start()
    try:
        chunk = LogChunk(1, 1, 3, merged=False)
        with pytest.raises((ObjectTooLargeError, ReplicationError)):
            await fetch_segment(LogObjects(local_bucket, "acme"), key, chunk, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB allocated to refuse it"
