"""A connection cut in the middle of a snapshot download: the partial file is never opened
as the database, the local file is untouched or absent, and no temporary file is left."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tenantdb.errors import TransientStorageError
from tenantdb.machine.database import TenantDB
from tests.faults.conftest import MiB, ProxiedS3
from tests.support.fault_proxy import Fault

MIGRATIONS = ["CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)"]
SNAPSHOTS = "tenants/acme/snapshots/*"


async def add_blobs(tdb: TenantDB, count: int, size: int) -> None:
    async with tdb.connection() as db:
        await db.executemany("INSERT INTO blobs (data) VALUES (randomblob(?))", [(size,)] * count)
        await db.commit()


async def seed(s3: ProxiedS3, megabytes: int) -> dict[str, Any]:
    """Machine m1 publishes a snapshot of about ``megabytes`` MiB of random bytes."""
    direct = await s3.open(proxied=False)
    async with TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=direct) as tdb:
        await add_blobs(tdb, megabytes * 4, MiB // 4)
        await tdb.checkpoint()
    snapshot: dict[str, Any] = s3.lock()["snapshot"]
    assert snapshot["size"] > megabytes * MiB
    return snapshot


def blob_bytes(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT coalesce(sum(length(data)), 0) FROM blobs").fetchone()[0])
    finally:
        conn.close()


class OpenSpy:
    """Records every SQLite file opened in this process while it is installed.

    A file opened while it is a partial download (its sha256 is not the snapshot's) is
    recorded in ``partial``.
    """

    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256
        self.opened: list[str] = []
        self.partial: list[str] = []
        self._connect: Callable[..., sqlite3.Connection] = sqlite3.connect

    def connect(self, database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        path = str(database).removeprefix("file:").split("?")[0]
        self.opened.append(path)
        if ".restore-" in path:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            if digest != self.sha256:
                self.partial.append(path)
        return self._connect(database, *args, **kwargs)


@pytest.fixture
def open_spy(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], OpenSpy]:
    def install(sha256: str) -> OpenSpy:
        spy = OpenSpy(sha256)
        monkeypatch.setattr(sqlite3, "connect", spy.connect)
        return spy

    return install


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*restore-*"))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
async def test_a_download_cut_every_time_fails_and_leaves_nothing_behind(
    s3: ProxiedS3, open_spy: Callable[[str], OpenSpy], fraction: float
) -> None:
    snapshot = await seed(s3, 2)
    bucket = await s3.open()
    s3.proxy.add(Fault.cut(fraction, operation="GetObject", key=SNAPSHOTS))
    spy = open_spy(snapshot["sha256"])
    tdb = TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(TransientStorageError) as raised:
        await tdb.start(standby=False)
    assert raised.value.key == snapshot["key"]
    assert snapshot["key"] in str(raised.value)
    assert len(s3.proxy.seen(operation="GetObject", key=SNAPSHOTS, faulted=True)) == 5
    assert spy.opened == []  # not the partial file, and no new database either
    assert not tdb.path.exists()
    assert leftovers(tdb.path.parent) == []
    assert s3.lock()["snapshot"] == snapshot


async def test_a_download_cut_once_is_retried_and_only_the_whole_file_is_opened(
    s3: ProxiedS3, open_spy: Callable[[str], OpenSpy]
) -> None:
    snapshot = await seed(s3, 2)
    bucket = await s3.open()
    s3.proxy.add(Fault.cut(0.5, operation="GetObject", key=SNAPSHOTS, count=1))
    spy = open_spy(snapshot["sha256"])
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        assert blob_bytes(tdb.path) == 2 * MiB
        assert leftovers(tdb.path.parent) == []
    assert len(s3.proxy.seen(operation="GetObject", key=SNAPSHOTS, faulted=True)) == 1
    assert spy.partial == []
    assert any(".restore-" in path for path in spy.opened)  # verified before it was renamed


async def test_a_cut_in_a_later_range_of_a_large_snapshot_fails_without_touching_the_local_file(
    s3: ProxiedS3, open_spy: Callable[[str], OpenSpy]
) -> None:
    # Machine m2 held the tenant before and kept its (now older) local file.
    direct = await s3.open(proxied=False)
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=direct) as tdb:
        await add_blobs(tdb, 1, 1)
    old_file = tdb.path
    old_bytes = old_file.read_bytes()
    # m1 then writes 6 MiB: more than one 5 MiB range, so m2 downloads it in two GETs.
    snapshot = await seed(s3, 6)
    bucket = await s3.open(concurrency=1)
    s3.proxy.add(Fault.cut(0.5, operation="GetObject", key=SNAPSHOTS, skip=1))
    spy = open_spy(snapshot["sha256"])
    tdb = TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(TransientStorageError, match="snapshots/"):
        await tdb.start(standby=False)
    seen = s3.proxy.seen(operation="GetObject", key=SNAPSHOTS)
    assert [s.fault for s in seen[:2]] == [None, "cut"]  # the first range passed, then a cut
    assert old_file.read_bytes() == old_bytes
    assert spy.partial == []
    assert str(old_file) not in spy.opened
    assert leftovers(old_file.parent) == []
    # Once the network behaves, the same machine gets every byte.
    s3.proxy.clear()
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        assert blob_bytes(tdb.path) == 6 * MiB + 1
