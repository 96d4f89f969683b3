"""The log through a failing bucket: segment uploads and lock.json moves that fail, are cut
or lose their answer are retried and never leave a gap, and a restore through the same
failures gives the exact database."""

from __future__ import annotations

import asyncio
import sqlite3

from tenantdb.errors import TenantDBError
from tenantdb.machine.database import TenantDB
from tests.faults.conftest import ProxiedS3
from tests.support.fault_proxy import transient_mix

MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)"]


async def test_shipping_and_restoring_through_30_percent_failures_gives_the_exact_database(
    s3: ProxiedS3,
) -> None:
    bucket = await s3.open()
    tdb = TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=bucket)
    await tdb.start(standby=False)
    s3.proxy.add(*transient_mix(0.3))
    failed_syncs = 0
    for batch in range(30):
        async with tdb.connection() as db:
            await db.executemany(
                "INSERT INTO hits (note) VALUES (?)",
                [(f"batch {batch} row {i}",) for i in range(7)],
            )
            await db.commit()
        try:
            await tdb.sync()
        except TenantDBError:
            failed_syncs += 1  # a whole retry budget failed: the next sync carries on
    for _ in range(20):  # the last batches, once the retries get through
        try:
            await tdb.sync()
            break
        except TenantDBError:
            failed_syncs += 1
    async with tdb.connection() as db, db.execute("SELECT id, note FROM hits") as cursor:
        expected = [tuple(row) for row in await cursor.fetchall()]
    for task in list(tdb._supervisor.tasks):  # the holder dies: no final publish, no release
        task.cancel()
    await tdb._close_database()
    tdb._dir_lock.release()
    assert len(s3.proxy.seen(faulted=True)) > 10

    # The next machine restores through the same failures (its startup retries when a whole
    # retry budget fails) and gets exactly the database the holder had shipped.
    lock = s3.lock()
    assert lock["log"]["tail"] >= 2
    other = TenantDB(s3.settings("m2", lease_ttl=3), migrations=MIGRATIONS, bucket=await s3.open())
    for _ in range(10):
        try:
            await other.start(standby=True)
        except TenantDBError:
            continue
        break
    for _ in range(200):
        if other.serving:
            break
        await asyncio.sleep(0.1)
    assert other.serving, other.problem
    async with other.connection() as db, db.execute("SELECT id, note FROM hits") as cursor:
        assert [tuple(row) for row in await cursor.fetchall()] == expected
    s3.proxy.clear()
    await other.stop()
    restored = sqlite3.connect(other.path)
    try:
        assert restored.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        restored.close()
