"""TenantDBMiddleware facing clients it cannot trust: what a 503 tells them."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from example_app import MIGRATIONS
from tenantdb import TenantDBMiddleware
from tenantdb.config import Settings
from tenantdb.database import TenantDB
from tenantdb.lease import Lease
from tenantdb.storage import LocalBucket
from tests.support.apps import starlette_visit
from tests.support.servers import serve_in_thread


def machine_settings(root: Path, machine: str) -> Settings:
    return Settings(
        tenant="acme",
        machine_id=machine,
        data_dir=root / machine,
        local_bucket_dir=root / "bucket",
        checkpoint_interval=0,
        lease_ttl=3,
    )


async def publish_then_lose_snapshot(root: Path) -> None:
    """m0 publishes the tenant, its snapshot objects vanish, m1 holds the lease (alive)."""
    async with TenantDB(machine_settings(root, "m0"), migrations=MIGRATIONS) as tdb:
        async with tdb.connection() as db:
            await db.execute("UPDATE counter SET count = count + 1")
            await db.commit()
        await tdb.checkpoint()
    async with LocalBucket(root / "bucket") as bucket:
        for info in await bucket.list("tenants/acme/"):
            if info.key.endswith((".sqlite3", ".seg")):
                await bucket.delete(info.key)


def test_the_503_while_restoring_keeps_bucket_keys_and_local_paths_out_of_the_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(publish_then_lose_snapshot(tmp_path))

    async def hold_then_release() -> None:
        async with LocalBucket(tmp_path / "bucket") as bucket:
            other = Lease(bucket, "acme", machine_id="m1", region="local", ttl=3)
            await other.acquire()
            await asyncio.sleep(0.5)  # m2 starts as a standby meanwhile
            await other.release()

    app = TenantDBMiddleware(
        Starlette(routes=[Route("/customers/{tenant}", starlette_visit)]),
        migrations=MIGRATIONS,
        settings=machine_settings(tmp_path, "m2"),
        proxy_large_bodies=False,
    )
    caplog.set_level(logging.ERROR, logger="tenantdb")
    holder = asyncio.new_event_loop()
    holding = holder.create_task(hold_then_release())
    holder.run_until_complete(asyncio.sleep(0.1))  # m1 holds the lease before m2 starts
    with serve_in_thread(app, lifespan="on") as url:
        holder.run_until_complete(holding)
        holder.close()
        deadline = time.monotonic() + 10
        while app.tenantdb is None or not app.tenantdb.problem:
            assert time.monotonic() < deadline, "the restore never failed"
            time.sleep(0.05)
        answer = httpx.get(f"{url}/customers/acme", timeout=10)
    assert answer.status_code == 503
    assert "restored" in answer.text
    assert "failed" in answer.text
    for secret in ("tenants/acme", "snapshots", str(tmp_path), ".sqlite3"):
        assert secret not in answer.text
    # The operator still gets the whole reason, in the log.
    assert any("tenants/acme" in r.getMessage() for r in caplog.records), caplog.text
