"""Writes that landed on the bucket while their answer was lost, through the fault proxy.

Each test is a scenario a review proved against the earlier protocol: a renewal, a
publish or a lease write lands on moto, the proxy drops the answer (and fails the
retries), and tenantdb must neither believe its lease lasts longer than the bucket says,
nor reuse an immutable key, nor take its own landed write for another holder's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path

import pytest

from tenantdb.errors import LeaseHeldError, StorageError, TenantDBError
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lease import Lease
from tests.faults.conftest import FAST_RETRY, TTL, ProxiedS3
from tests.support.fault_proxy import Fault

LOCK = "tenants/acme/lock.json"
MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY)"]


def lost_then_failing(**match: object) -> list[Fault]:
    """The first matching request lands but loses its answer; every retry fails."""
    return [
        Fault.error(503, "SlowDown", after_upstream=True, count=1, **match),
        Fault.slow_down(count=FAST_RETRY.attempts - 1, **match),
    ]


async def add_hits(tdb: TenantDB, n: int) -> None:
    async with tdb.connection() as db:
        await db.executemany("INSERT INTO hits DEFAULT VALUES", [()] * n)
        await db.commit()


async def hits(tdb: TenantDB) -> int:
    async with tdb.connection() as db, db.execute("SELECT count(*) FROM hits") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_a_renewal_whose_answer_was_lost_never_outlives_the_lease_on_the_bucket(
    s3: ProxiedS3,
) -> None:
    holder = Lease(await s3.open(), "acme", machine_id="m1", region="ams", ttl=TTL)
    other = Lease(await s3.open(proxied=False), "acme", machine_id="m2", region="ams", ttl=TTL)
    await holder.acquire()

    s3.proxy.add(*lost_then_failing(method="PUT", key=LOCK))
    with pytest.raises(StorageError):
        await holder.renew()  # landed on the bucket; the holder never heard
    s3.proxy.clear()
    await asyncio.sleep(2.0)
    await holder.renew()  # finds its landed write behind the 412, then renews on top of it

    # Now the holder is cut off, and the other machine waits for the lease to expire.
    s3.proxy.add(Fault.slow_down())
    deadline = time.monotonic() + TTL + 5
    while time.monotonic() < deadline:
        try:
            await other.acquire()
        except LeaseHeldError:
            await asyncio.sleep(0.05)
            continue
        break
    assert other.status == "held"
    # At the moment the bucket let another machine in, the old holder had stopped serving.
    assert holder.valid_for <= 0, f"both held the lease for {holder.valid_for:.2f}s"


async def test_a_publish_whose_answer_was_lost_never_overwrites_the_published_snapshot(
    s3: ProxiedS3,
) -> None:
    bucket = await s3.open()
    tdb = TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=bucket)
    await tdb.start(standby=False)
    await add_hits(tdb, 3)
    await tdb.sync()
    s3.proxy.add(*lost_then_failing(method="PUT", key=LOCK))
    with pytest.raises(TenantDBError):
        await tdb.checkpoint()  # lock.json now points at the snapshot; tdb never heard
    s3.proxy.clear()
    published = s3.lock()["snapshot"]
    await add_hits(tdb, 2)
    assert await tdb.checkpoint()
    await tdb.stop()

    # The first snapshot is as lock.json described it then, and so is the current one.
    assert hashlib.sha256(s3.get(published["key"])).hexdigest() == published["sha256"]
    current = s3.lock()["snapshot"]
    assert current["key"] != published["key"]
    assert hashlib.sha256(s3.get(current["key"])).hexdigest() == current["sha256"]
    async with TenantDB(
        s3.settings("m2"), migrations=MIGRATIONS, bucket=await s3.open(proxied=False)
    ) as restored:
        assert await hits(restored) == 5


async def test_a_graceful_stop_after_a_lost_renewal_answer_publishes_and_releases(
    s3: ProxiedS3, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = await s3.open()
    tdb = TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=bucket)
    await tdb.start(standby=False)
    await add_hits(tdb, 4)
    s3.proxy.add(*lost_then_failing(method="PUT", key=LOCK))
    with pytest.raises(StorageError):
        await tdb.lease.renew()
    s3.proxy.clear()
    with caplog.at_level(logging.INFO, logger="tenantdb"):
        await tdb.stop()
    assert "FENCED" not in caplog.text
    assert "FINAL PUBLISH FAILED" not in caplog.text
    lock = s3.lock()
    assert lock["owner"] is None, lock
    async with TenantDB(
        s3.settings("m2"), migrations=MIGRATIONS, bucket=await s3.open(proxied=False)
    ) as restored:
        assert await hits(restored) == 4


async def test_a_takeover_whose_answer_was_lost_is_recognised_by_its_claim(
    s3: ProxiedS3, tmp_path: Path
) -> None:
    first = Lease(await s3.open(proxied=False), "acme", machine_id="m1", region="ams", ttl=TTL)
    await first.acquire()
    await first.release()
    s3.proxy.add(*lost_then_failing(method="PUT", key=LOCK))
    taker = Lease(await s3.open(), "acme", machine_id="m2", region="ams", ttl=TTL)
    with pytest.raises(StorageError):
        await taker.acquire()
    s3.proxy.clear()
    # lock.json names m2 under the taker's claim: a restart of the same claim takes it back
    # at once, while a rival with the same machine id but another claim must wait.
    rival = Lease(await s3.open(), "acme", machine_id="m2", region="ams", ttl=TTL)
    with pytest.raises(LeaseHeldError):
        await rival.acquire()
    again = Lease(
        await s3.open(), "acme", machine_id="m2", region="ams", ttl=TTL, claim=taker.claim
    )
    record = await again.acquire()
    assert (record.generation, json.loads(s3.get(LOCK))["claim"]) == (3, taker.claim)


async def test_a_takeover_record_whose_answer_was_lost_is_taken_as_written(
    s3: ProxiedS3,
) -> None:
    record_key = "tenants/acme/history/00000001.json"
    # It lands; the answer is lost; the retry finds the key taken (412) by this very write.
    s3.proxy.add(Fault.error(503, "SlowDown", after_upstream=True, count=1, key=record_key))
    async with TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=await s3.open()) as tdb:
        await add_hits(tdb, 1)
        assert await hits(tdb) == 1
        written = json.loads(s3.get(record_key))
        assert (written["generation"], written["claim"]) == (1, tdb.lease.claim)
