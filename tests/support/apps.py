"""The counter app twice, under Starlette and under FastAPI, for server tests.

Both count visits of ``/customers/{tenant}`` and accept ``?delay=S`` to hold a request in
flight (shutdown-under-load tests). Serve with ``uvicorn tests.support.apps:starlette_app``.

``local_acme_settings(root)``: settings for an app served in process, all local under ``root``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import aiosqlite
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from example_app import MIGRATIONS
from tenantdb import TenantDBMiddleware, tenant_db, tenant_db_dependency
from tenantdb.config import Settings


def local_acme_settings(root: Path, **overrides: Any) -> Settings:
    """Settings of machine m1 serving tenant acme, everything local under ``root``.

    Data in ``root/data``, the bucket in ``root/bucket``, no periodic checkpoints.
    """
    return Settings(
        tenant="acme",
        machine_id="m1",
        data_dir=root / "data",
        local_bucket_dir=root / "bucket",
        checkpoint_interval=0,
        **overrides,
    )


async def increment(db: aiosqlite.Connection, delay: float) -> int:
    if delay:
        await asyncio.sleep(delay)
    async with db.execute("UPDATE counter SET count = count + 1 RETURNING count") as cursor:
        row = await cursor.fetchone()
    await db.commit()
    return int(row[0]) if row else -1


async def starlette_visit(request: Request) -> Response:
    count = await increment(tenant_db(request), float(request.query_params.get("delay", 0)))
    return JSONResponse({"tenant": request.state.tenant, "count": count})


starlette_app = Starlette(
    routes=[Route("/customers/{tenant}", starlette_visit)],
    middleware=[Middleware(TenantDBMiddleware, migrations=MIGRATIONS)],
)

fastapi_app = FastAPI()
fastapi_app.add_middleware(TenantDBMiddleware, migrations=MIGRATIONS)


@fastapi_app.get("/customers/{tenant}")
async def fastapi_visit(
    tenant: str,
    db: Annotated[aiosqlite.Connection, Depends(tenant_db_dependency)],
    delay: float = 0,
) -> dict[str, object]:
    return {"tenant": tenant, "count": await increment(db, delay)}
