"""A holder resumed from Fly's suspend answers nothing before the bucket confirms its lease.

Fly's suspend restores a Firecracker snapshot: no signal, the process goes on where it was,
its monotonic clock never counted the time away. Here the freeze shows as the wall clock
running ahead of the monotonic one, with the middleware served in process on a local
bucket whose lock.json requests the test counts and holds.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from example_app import MIGRATIONS
from tenantdb import TenantDBMiddleware, clock, tenant_db
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.storage.base import Bucket
from tests.support.apps import local_acme_settings, starlette_visit
from tests.support.lifespan import lifespan

LOCK_KEY = "tenants/acme/lock.json"
SUSPENDED_FOR = 5.0  # well inside the 15 s TTL by every local clock


class HeldLockBucket:
    """A bucket whose lock.json requests are counted and, while ``hold`` is set, held."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.lock_requests: list[str] = []
        self.hold = False
        self.released = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(key: str, *args: Any, **kwargs: Any) -> Any:
            if key == LOCK_KEY:
                self.lock_requests.append(name)
                if self.hold:
                    await self.released.wait()
            return await method(key, *args, **kwargs)

        return call


def suspend(monkeypatch: pytest.MonkeyPatch, shown_by: str = "wall") -> None:
    """What a resume shows: the wall clock (or Linux's boot clock, which counts a kernel's
    sleep) counted the time away, the monotonic one did not."""
    counted = getattr(clock, shown_by)
    monkeypatch.setattr(clock, shown_by, lambda: counted() + SUSPENDED_FOR)


async def read_count(request: Request) -> Response:
    """A request that commits nothing: no output gate holds its answer."""
    async with tenant_db(request).execute("SELECT count FROM counter") as cursor:
        row = await cursor.fetchone()
    return JSONResponse({"count": row[0] if row else None})


async def serve_acme(tmp_path: Path) -> tuple[TenantDBMiddleware, httpx.AsyncClient]:
    app = Starlette(
        routes=[
            Route("/customers/{tenant}", starlette_visit),
            Route("/customers/{tenant}/count", read_count),
        ]
    )
    middleware = TenantDBMiddleware(
        app, migrations=MIGRATIONS, settings=local_acme_settings(tmp_path)
    )
    transport = httpx.ASGITransport(app=middleware)
    return middleware, httpx.AsyncClient(transport=transport, base_url="http://m1", timeout=10)


@pytest.mark.parametrize("shown_by", ["wall", "boottime"])
async def test_a_resumed_holder_answers_only_after_one_lock_json_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shown_by: str
) -> None:
    middleware, client = await serve_acme(tmp_path)
    async with lifespan(middleware), client:
        assert (await client.get("/customers/acme")).json()["count"] == 1
        tdb = middleware.tenantdb
        assert tdb is not None
        bucket = HeldLockBucket(tdb.lease.bucket)
        tdb.lease.bucket = bucket  # type: ignore[assignment]
        bucket.hold = True
        suspend(monkeypatch, shown_by)

        answer = asyncio.create_task(client.get("/customers/acme/count"))
        for _ in range(100):
            if bucket.lock_requests:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # time to answer, were it going to before the round trip
        assert not answer.done(), "answered before the bucket confirmed the lease"
        assert bucket.lock_requests == ["put"]  # one conditional renewal, nothing else

        bucket.hold = False
        bucket.released.set()
        response = await asyncio.wait_for(answer, 10)
        assert response.status_code == 200, response.text
        assert response.json()["count"] == 1
        assert tdb.serving


async def test_a_holder_resumed_after_a_takeover_never_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    middleware, client = await serve_acme(tmp_path)
    async with lifespan(middleware), client:
        assert (await client.get("/customers/acme")).json()["count"] == 1
        tdb = middleware.tenantdb
        assert tdb is not None
        bucket = tdb.lease.bucket
        # While this machine slept, m2 took the tenant over (its lease expired on the bucket).
        stored = await bucket.get(LOCK_KEY)
        ours = LockRecord.parse(stored.body, tenant="acme", key=LOCK_KEY)
        theirs = replace(
            ours, owner="m2", claim="m2-claim", generation=ours.generation + 1, seq=ours.seq + 1
        )
        await bucket.put(LOCK_KEY, theirs.to_json(), if_match=stored.info.etag)
        suspend(monkeypatch)

        response = await client.get("/customers/acme/count")
        assert response.status_code != 200, response.text
        assert not tdb.serving
        after = await bucket.get(LOCK_KEY)
        assert LockRecord.parse(after.body, tenant="acme", key=LOCK_KEY) == theirs


async def test_a_holder_whose_clocks_show_no_freeze_asks_the_bucket_nothing_first(
    tmp_path: Path,
) -> None:
    middleware, client = await serve_acme(tmp_path)
    async with lifespan(middleware), client:
        assert (await client.get("/customers/acme")).json()["count"] == 1
        tdb = middleware.tenantdb
        assert tdb is not None
        bucket = HeldLockBucket(tdb.lease.bucket)
        tdb.lease.bucket = bucket  # type: ignore[assignment]
        bucket.hold = True  # a lock.json request would hold the answer up
        try:
            response = await asyncio.wait_for(client.get("/customers/acme/count"), 5)
        finally:
            bucket.released.set()
        assert response.json() == {"count": 1}
        assert bucket.lock_requests == []
