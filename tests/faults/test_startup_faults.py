"""Startup through a failing bucket: it succeeds after retries or fails clearly, and never
starts a tenant that had data with a new, empty database."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest
from starlette.applications import Starlette

from tenantdb import TenantDBMiddleware
from tenantdb.config import Settings
from tenantdb.errors import (
    LeaseLostError,
    SnapshotError,
    StorageError,
    TenantDBError,
    TransientStorageError,
)
from tenantdb.machine.database import TenantDB
from tests.faults.conftest import ProxiedS3
from tests.support.careless_s3 import careless_s3
from tests.support.fault_proxy import Fault, transient_mix
from tests.support.lifespan import lifespan
from tests.support.s3_server import s3_env

MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)"]
ROWS = 25


async def seed(s3: ProxiedS3, tenant: str = "acme", rows: int = ROWS) -> None:
    """Give ``tenant`` published data: m1 writes ``rows`` rows, snapshots them, releases."""
    direct = await s3.open(proxied=False)
    settings = s3.settings("m1", tenant)
    async with TenantDB(settings, migrations=MIGRATIONS, bucket=direct) as tdb:
        await add_rows(tdb, rows, "seed")
        await tdb.checkpoint()  # a snapshot, so that startup must download it
    assert s3.lock(tenant)["owner"] is None
    assert s3.lock(tenant)["snapshot"] is not None


async def add_rows(tdb: TenantDB, n: int, note: str) -> None:
    async with tdb.connection() as db:
        await db.executemany("INSERT INTO hits (note) VALUES (?)", [(note,)] * n)
        await db.commit()


async def start_or_error(tdb: TenantDB) -> TenantDBError | None:
    """Start ``tdb`` as a script would; return the startup error instead of raising it.

    (A server that holds the lease keeps retrying instead: ``tests/test_fail_stop.py``.)
    """
    try:
        await tdb.start(standby=False)
    except TenantDBError as exc:
        return exc
    return None


async def rows_in(tdb: TenantDB) -> int:
    async with tdb.connection() as db, db.execute("SELECT count(*) FROM hits") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


def local_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM hits").fetchone()[0])
    finally:
        conn.close()


async def test_startup_with_30_percent_of_requests_failing_keeps_the_data(s3: ProxiedS3) -> None:
    """Eight tenants with data start on a new machine while 30% of requests fail."""
    tenants = [f"t{i}" for i in range(8)]
    for tenant in tenants:
        await seed(s3, tenant)
    bucket = await s3.open(read_timeout=0.5)
    s3.proxy.add(*transient_mix(0.3, delay=0.8))
    outcomes: dict[str, str] = {}
    for tenant in tenants:
        before = s3.lock(tenant)
        tdb = TenantDB(s3.settings("m2", tenant), migrations=MIGRATIONS, bucket=bucket)
        error = await start_or_error(tdb)
        if error is not None:
            # A failed startup is allowed, if it is clear and leaves the data alone.
            assert isinstance(error, StorageError | SnapshotError), repr(error)
            assert f"tenants/{tenant}/" in str(error)
            outcomes[tenant] = type(error).__name__
            assert not tdb.path.exists()  # nothing was created in place of the data
            after = s3.lock(tenant)
            assert after["snapshot"] == before["snapshot"]
            continue
        try:
            assert await rows_in(tdb) == ROWS
            outcomes[tenant] = "started"
        finally:
            s3.proxy.clear()  # the shutdown is not under test here
            await tdb.stop()
            s3.proxy.add(*transient_mix(0.3, delay=0.8))
    s3.proxy.clear()
    faulted = s3.proxy.seen(faulted=True)
    assert len(faulted) >= 10, faulted  # the faults did happen
    assert {seen.fault for seen in faulted} >= {"error 500", "error 503", "cut", "reset"}
    assert list(outcomes.values()).count("started") >= 4, outcomes
    # Whatever happened, every tenant still has all its rows for the next machine.
    direct = await s3.open(proxied=False)
    for tenant in tenants:
        async with TenantDB(s3.settings("m3", tenant), migrations=MIGRATIONS, bucket=direct) as tdb:
            assert await rows_in(tdb) == ROWS, (tenant, outcomes[tenant])


@pytest.mark.parametrize(
    ("operation", "key", "what"),
    [
        ("GetObject", "tenants/acme/lock.json", "reading lock.json"),
        ("PutObject", "tenants/acme/lock.json", "writing lock.json"),
        ("GetObject", "tenants/acme/snapshots/*", "downloading the snapshot"),
    ],
    ids=["lock-read", "lock-write", "snapshot-download"],
)
async def test_startup_fails_clearly_when_the_bucket_keeps_failing(
    s3: ProxiedS3, operation: str, key: str, what: str
) -> None:
    await seed(s3)
    before = s3.lock()
    bucket = await s3.open()
    s3.proxy.add(Fault.slow_down(operation=operation, key=key))
    tdb = TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(TransientStorageError) as raised:
        await tdb.start(standby=False)
    message = str(raised.value)
    assert "SlowDown (HTTP 503)" in message
    assert raised.value.key.startswith("tenants/acme/"), message
    assert raised.value.key in message
    # Every attempt of the retry budget was made, then startup gave up (no endless loop).
    assert len(s3.proxy.seen(operation=operation, key=key, faulted=True)) == 5
    assert tdb.state == "stopped"
    assert not tdb.path.exists()
    assert not list(tdb.path.parent.glob("*.restore-*"))
    after = s3.lock()
    assert after["snapshot"] == before["snapshot"]
    if what != "downloading the snapshot":
        assert after == before  # the lease was never taken
    # When the bucket recovers the same machine starts with every row.
    s3.proxy.clear()
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        assert await rows_in(tdb) == ROWS


async def test_a_lock_write_that_landed_but_whose_answer_was_lost_is_recognised(
    s3: ProxiedS3,
) -> None:
    await seed(s3)
    bucket = await s3.open()
    # The takeover PUT reaches the bucket, then the client sees a 500 and retries: the
    # retry gets 412, and the lease must recognise its own bytes instead of giving up.
    s3.proxy.add(
        Fault.internal_error(
            operation="PutObject", key="tenants/acme/lock.json", count=1, after_upstream=True
        )
    )
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        assert tdb.state == "serving"
        assert (tdb.lease.record.generation if tdb.lease.record else 0) == 2
        assert await rows_in(tdb) == ROWS
    assert len(s3.proxy.seen(operation="PutObject", faulted=True)) == 1


async def test_a_lost_race_for_the_lock_is_re_read_not_fatal(s3: ProxiedS3) -> None:
    await seed(s3)
    bucket = await s3.open()
    # 412 on the first takeover write: as if another machine had written in between.
    s3.proxy.add(Fault.precondition_failed(operation="PutObject", key="*/lock.json", count=1))
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        assert tdb.state == "serving"
        assert await rows_in(tdb) == ROWS
    # A lock that keeps changing under every attempt is a clear error, and nothing local.
    s3.proxy.add(Fault.precondition_failed(operation="PutObject", key="*/lock.json"))
    tdb = TenantDB(s3.settings("m3"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(LeaseLostError, match=r"lock\.json"):
        await tdb.start(standby=True)
    assert not tdb.path.exists()


async def test_a_409_conflict_on_the_lock_write_is_retried(s3: ProxiedS3) -> None:
    await seed(s3)
    bucket = await s3.open()
    s3.proxy.add(Fault.conflict(operation="PutObject", key="*/lock.json", count=3))
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        assert await rows_in(tdb) == ROWS
    assert len(s3.proxy.seen(operation="PutObject", faulted=True)) == 3


async def test_a_machine_with_an_old_local_file_never_serves_it_when_restore_fails(
    s3: ProxiedS3,
) -> None:
    """m2 held the tenant once; m1 wrote more since. m2 must not fall back to its stale copy."""
    direct = await s3.open(proxied=False)
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=direct) as tdb:
        await add_rows(tdb, 1, "old")
    stale = s3.settings("m2").data_dir / "acme.sqlite3"
    stale_bytes = stale.read_bytes()
    await seed(s3, rows=ROWS)  # m1 takes over and adds rows: the bucket is now newer
    bucket = await s3.open()
    s3.proxy.add(Fault.cut(0.3, operation="GetObject", key="tenants/acme/snapshots/*"))
    tdb = TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(TransientStorageError, match="snapshots/"):
        await tdb.start(standby=False)
    assert stale.read_bytes() == stale_bytes  # untouched, and not served either
    assert tdb.state == "stopped"
    s3.proxy.clear()
    async with TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        assert await rows_in(tdb) == ROWS + 1
    assert local_rows(stale) == ROWS + 1


@pytest.mark.parametrize(
    ("operation", "key"),
    [
        ("GetObject", "tenants/acme/lock.json"),
        ("PutObject", "tenants/acme/lock.json"),  # a PUT first waits for "100 Continue"
        ("GetObject", "tenants/acme/snapshots/*"),
    ],
    ids=["lock-read", "lock-write", "snapshot-download"],
)
async def test_an_endpoint_that_never_answers_fails_startup_within_the_timeouts(
    s3: ProxiedS3, operation: str, key: str
) -> None:
    """A hung load balancer: the connection is accepted, and nothing ever comes back."""
    await seed(s3)
    bucket = await s3.open(read_timeout=0.3)
    s3.proxy.add(Fault.stall(60, operation=operation, key=key))
    tdb = TenantDB(s3.settings("m2"), migrations=MIGRATIONS, bucket=bucket)
    started = time.monotonic()
    with pytest.raises(TransientStorageError, match="ReadTimeout"):
        # Five attempts of 0.3 s each, and some backoff: far below this bound.
        await asyncio.wait_for(tdb.start(standby=False), timeout=10)
    assert time.monotonic() - started < 5
    assert len(s3.proxy.seen(operation=operation, key=key, faulted=True)) == 5
    assert not tdb.path.exists()


@pytest.mark.parametrize(
    ("ignored", "named"), [("if-none-match", "If-None-Match: *"), ("if-match", "If-Match")]
)
async def test_a_server_refuses_to_serve_from_a_bucket_that_ignores_conditional_writes(
    tmp_path: Path, ignored: str, named: str
) -> None:
    """Such a store lets two machines hold one lease: the server fails its startup, named."""
    with careless_s3(ignores={ignored}) as endpoint:
        env = {**s3_env("careless", endpoint), "TENANT_ID": "acme"}
        settings = replace(
            Settings.from_env(env), data_dir=tmp_path / "m1", metrics_port=0, machine_id="m1"
        )
        app = TenantDBMiddleware(Starlette(), settings=settings)
        with pytest.raises(RuntimeError, match=f"bucket 'careless' ignores {re.escape(named)}"):
            async with lifespan(app):
                pass
    assert app.tenantdb is not None
    assert app.tenantdb.state == "stopped"  # it never took the lease
