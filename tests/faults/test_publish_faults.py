"""The final publish at shutdown through a failing bucket: retried within the kill timeout;
if it still fails, the lease stays held, the local file stays, and the log says where."""

from __future__ import annotations

import logging
import time

import pytest

from tenantdb.machine.database import TenantDB
from tests.faults.conftest import ProxiedS3
from tests.support.fault_proxy import Fault

MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)"]
KILL_TIMEOUT = 3.0


async def add_rows(tdb: TenantDB, n: int) -> None:
    async with tdb.connection() as db:
        await db.executemany("INSERT INTO hits (note) VALUES ('x')", [()] * n)
        await db.commit()


async def rows_in(tdb: TenantDB) -> int:
    async with tdb.connection() as db, db.execute("SELECT count(*) FROM hits") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def started_with_rows(s3: ProxiedS3, rows: int, **bucket_options: float) -> TenantDB:
    """Machine m1 serving tenant acme through the proxy, a snapshot of its first rows published."""
    bucket = await s3.open(**bucket_options)
    tdb = TenantDB(
        s3.settings("m1", kill_timeout=KILL_TIMEOUT), migrations=MIGRATIONS, bucket=bucket
    )
    await tdb.start(standby=False)
    await add_rows(tdb, 10)
    assert await tdb.checkpoint() is True
    await add_rows(tdb, rows - 10)
    return tdb


# The final publication is one CAS on lock.json (the tail rides in it): these make it fail.
FAILURES = {
    "lock-cas-503": [Fault.slow_down(operation="PutObject", key="*/lock.json")],
    "lock-cas-cut-connection": [Fault.reset(operation="PutObject", key="*/lock.json")],
    "lock-cas-500": [Fault.internal_error(operation="PutObject", key="*/lock.json")],
    "lock-cas-stalls": [Fault.delay(30, operation="PutObject", key="*/lock.json")],
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_a_final_publish_that_keeps_failing_keeps_the_lease_and_the_file(
    s3: ProxiedS3, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    # The read timeout is longer than the kill timeout, as in production (60 s vs 30 s):
    # a stalled upload must not hold the shutdown past the kill timeout.
    tdb = await started_with_rows(s3, 15, read_timeout=KILL_TIMEOUT * 2)
    before = s3.lock()
    segments_before = s3.keys("tenants/acme/log/")
    s3.proxy.add(*FAILURES[failure])
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="tenantdb"):
        await tdb.stop()
    took = time.monotonic() - started
    assert took < KILL_TIMEOUT, f"shutdown took {took:.1f}s of a {KILL_TIMEOUT}s kill timeout"
    failed = [r for r in caplog.records if "FINAL PUBLISH FAILED" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].levelno == logging.CRITICAL
    assert str(tdb.path.resolve()) in failed[0].getMessage()  # where the newest data is
    # Retried: more attempts than one round of the bucket's own retry budget (5).
    attempts = s3.proxy.seen(operation="PutObject", faulted=True)
    if failure != "lock-cas-stalls":
        assert len(attempts) > 5, attempts
    after = s3.lock()
    assert after["owner"] == "m1"  # not released: nobody may start from the older snapshot
    assert (after["snapshot"], after["log"]) == (before["snapshot"], before["log"])
    assert after["generation"] == before["generation"]
    assert tdb.path.exists()
    # The tail's segment may have been uploaded beside the CAS: an orphan, never named.
    assert len(set(s3.keys("tenants/acme/log/")) - set(segments_before)) <= 1
    assert not list(tdb.path.parent.glob(".snapshot-*"))  # no temporary snapshot left

    # The same machine restarts once the bucket works: it continues from its local file,
    # which has the 5 rows the failed final sync never shipped, and publishes them.
    s3.proxy.clear()
    bucket = await s3.open()
    async with TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=bucket) as again:
        assert await rows_in(again) == 15
    assert s3.lock()["owner"] is None
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as other:
        assert await rows_in(other) == 15


async def test_failing_segment_uploads_do_not_fail_the_final_publish(
    s3: ProxiedS3, caplog: pytest.LogCaptureFixture
) -> None:
    tdb = await started_with_rows(s3, 15)
    s3.proxy.add(Fault.slow_down(operation="PutObject", key="*/log/*"))
    with caplog.at_level(logging.INFO, logger="tenantdb"):
        await tdb.stop()
    assert "FINAL PUBLISH FAILED" not in caplog.text
    lock = s3.lock()
    assert lock["owner"] is None  # published (the tail rides in lock.json), then released
    assert lock["log"]["carried"]
    s3.proxy.clear()
    async with TenantDB(
        s3.settings("m2"), migrations=MIGRATIONS, bucket=await s3.open(proxied=False)
    ) as other:
        assert await rows_in(other) == 15


async def test_a_final_publish_succeeds_once_the_bucket_recovers_within_the_kill_timeout(
    s3: ProxiedS3, caplog: pytest.LogCaptureFixture
) -> None:
    tdb = await started_with_rows(s3, 12)
    # More failures than one round of retries: the shutdown must try again, not give up.
    s3.proxy.add(Fault.slow_down(operation="PutObject", key="*/lock.json", count=7))
    with caplog.at_level(logging.INFO, logger="tenantdb"):
        await tdb.stop()
    assert "FINAL PUBLISH FAILED" not in caplog.text
    assert "final publish failed, retrying" in caplog.text
    assert len(s3.proxy.seen(operation="PutObject", key="*/lock.json", faulted=True)) == 7
    lock = s3.lock()
    assert lock["owner"] is None  # published, then released
    assert lock["last_owner"] == "m1"
    bucket = await s3.open(proxied=False)
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as other:
        assert await rows_in(other) == 12


async def test_a_lost_answer_to_the_publish_cas_is_not_mistaken_for_fencing(
    s3: ProxiedS3, caplog: pytest.LogCaptureFixture
) -> None:
    tdb = await started_with_rows(s3, 11)
    # The CAS lands; its answer is lost; the retry gets 412 for the bytes it wrote itself.
    s3.proxy.add(
        Fault.internal_error(operation="PutObject", key="*/lock.json", after_upstream=True, count=1)
    )
    await tdb.stop()
    assert "FINAL PUBLISH FAILED" not in caplog.text
    assert "fenced" not in caplog.text
    assert s3.lock()["owner"] is None
    bucket = await s3.open(proxied=False)
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as other:
        assert await rows_in(other) == 11
