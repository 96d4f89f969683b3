"""What only the local bucket does: ages on CLOCK_BOOTTIME, and durable blobs."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tenantdb.errors import StorageError
from tenantdb.storage import LocalBucket
from tenantdb.storage import local as local_module

pytestmark = pytest.mark.skipif(
    not hasattr(time, "CLOCK_BOOTTIME") or not Path("/proc/sys/kernel/random/boot_id").exists(),
    reason="needs CLOCK_BOOTTIME and a kernel boot id (Linux)",
)

YEAR = 365 * 24 * 3600.0


def step_wall_clock(monkeypatch: pytest.MonkeyPatch, by: timedelta) -> None:
    """Make the local bucket see the wall clock stepped by ``by``, as NTP would step it."""

    class Stepped(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Stepped:
            real = datetime.now(tz) + by
            return cls.fromtimestamp(real.timestamp(), real.tzinfo)

    monkeypatch.setattr(local_module, "datetime", Stepped)


def pointer_path(bucket: LocalBucket, key: str) -> Path:
    return bucket.root / "keys" / key


def edit_pointer(bucket: LocalBucket, key: str, **changes: Any) -> None:
    """Rewrite fields of a pointer on disk; a value of None removes the field."""
    path = pointer_path(bucket, key)
    pointer = json.loads(path.read_text())
    for name, value in changes.items():
        if value is None:
            pointer.pop(name, None)
        else:
            pointer[name] = value
    path.write_text(json.dumps(pointer))


@pytest.mark.parametrize("hours", [1, -1])
async def test_age_ignores_wall_clock_steps(
    local_bucket: LocalBucket, monkeypatch: pytest.MonkeyPatch, hours: int
) -> None:
    await local_bucket.put("t/lock.json", b"{}")
    step_wall_clock(monkeypatch, timedelta(hours=hours))
    for info in (await local_bucket.head("t/lock.json"), *await local_bucket.list("t/")):
        assert 0 <= info.server_age < 60
        assert info.server_age is not None
        assert 0 <= info.server_age < 60


async def test_written_during_a_wall_clock_step(
    local_bucket: LocalBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_wall_clock(monkeypatch, timedelta(hours=1))
    await local_bucket.put("t/lock.json", b"{}")
    monkeypatch.undo()  # NTP steps the clock back
    info = await local_bucket.head("t/lock.json")
    assert 0 <= info.server_age < 60
    # Last-Modified stays the wall time of the write, for display.
    assert info.last_modified > datetime.now(UTC) + timedelta(minutes=50)


async def test_object_from_before_a_reboot_looks_ancient(local_bucket: LocalBucket) -> None:
    await local_bucket.put("t/lock.json", b"{}")
    edit_pointer(local_bucket, "t/lock.json", boot_id="00000000-0000-0000-0000-000000000000")
    info = await local_bucket.head("t/lock.json")
    assert info.server_age > 5 * YEAR
    assert info.server_date is not None
    assert info.server_date >= datetime.now(UTC) - timedelta(minutes=1)


async def test_pointer_without_a_clock_stamp_uses_the_wall_clock(
    local_bucket: LocalBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    await local_bucket.put("t/lock.json", b"{}")
    assert 0 <= (await local_bucket.head("t/lock.json")).server_age < 60
    edit_pointer(local_bucket, "t/lock.json", boot_id=None, boottime=None)
    step_wall_clock(monkeypatch, timedelta(hours=1))
    assert 3540 < (await local_bucket.head("t/lock.json")).server_age < 3660


async def test_new_blob_is_durable_before_its_pointer_is_committed(
    local_bucket: LocalBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync_dir = local_module.fsync_dir
    real_replace = local_module.os.replace

    def fsync_dir(path: Path) -> None:
        events.append(f"fsync {path.relative_to(local_bucket.root)}")
        real_fsync_dir(path)

    def replace(src: Any, dst: Any) -> None:
        events.append(f"replace {Path(dst).relative_to(local_bucket.root)}")
        real_replace(src, dst)

    monkeypatch.setattr(local_module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(local_module.os, "replace", replace)
    await local_bucket.put("t/lock.json", b"{}")
    assert events == ["fsync blobs", "replace keys/t/lock.json", "fsync keys/t"]


async def test_a_bucket_directory_that_cannot_be_made_is_named_with_what_to_do(
    tmp_path: Path,
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StorageError) as raised:
        async with LocalBucket(tmp_path / "a-file" / "bucket"):
            pass
    message = str(raised.value)
    assert "local bucket open failed" in message
    assert str(tmp_path / "a-file" / "bucket") in message  # where
    assert "set TENANTDB_LOCAL_BUCKET to a writable directory" in message  # what to do


async def test_a_key_that_cannot_be_written_is_named_with_its_file(tmp_path: Path) -> None:
    async with LocalBucket(tmp_path / "bucket") as bucket:
        (bucket.root / "keys" / "tenants").write_text("in the way")
        with pytest.raises(StorageError) as raised:
            await bucket.put("tenants/acme/lock.json", b"{}")
    message = str(raised.value)
    assert "'tenants/acme/lock.json'" in message
    assert str(bucket.root / "keys" / "tenants") in message
