"""A Starlette app whose tenants each count their visits in their own SQLite database."""

from __future__ import annotations

import html
import os
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tenantdb import TenantDBMiddleware, tenant_db

MIGRATIONS = [
    """
    CREATE TABLE counter (id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL);
    INSERT INTO counter (id, count) VALUES (1, 0);
    """,
]

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tenant {tenant}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto}}
.count{{font-size:4rem;font-weight:700}}</style></head>
<body><h1>Tenant {tenant}</h1><p class="count">{count}</p>
<p>visits, counted in this tenant's own SQLite database on machine
<code>{machine}</code> in region <code>{region}</code>.</p>
<p><a href="">Reload to count again</a> &middot; <a href="/">Home</a></p></body></html>
"""

_HOME = """tenantdb counter demo

Each tenant has its own SQLite database, served by its own machine.
Try:
  curl http://HOST/customers/100        (counts a visit for tenant 100)
  curl -H 'Accept: application/json' http://HOST/customers/200
Requests for a tenant that another machine serves are replayed to it (fly-replay).
"""


async def home(request: Request) -> Response:
    """Explain what to try."""
    return PlainTextResponse(_HOME.replace("HOST", request.url.netloc))


async def healthz(request: Request) -> Response:
    """Liveness for Fly's health checks."""
    return PlainTextResponse("ok\n")


async def visit(request: Request) -> Response:
    """Count one visit for the request's tenant and show the count."""
    db = tenant_db(request)
    async with db.execute(
        "UPDATE counter SET count = count + 1 WHERE id = 1 RETURNING count"
    ) as cursor:
        row = await cursor.fetchone()
    await db.commit()
    count = int(row[0]) if row else 0
    tenant = request.state.tenant
    machine = os.environ.get("FLY_MACHINE_ID", "local")
    region = os.environ.get("FLY_REGION", "local")
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse(
            {"tenant": tenant, "count": count, "machine_id": machine, "region": region}
        )
    return HTMLResponse(
        _PAGE.format(
            tenant=html.escape(tenant),
            count=count,
            machine=html.escape(machine),
            region=html.escape(region),
        )
    )


def create_app(**tenantdb_options: Any) -> Starlette:
    """Build the demo app; keyword arguments go to ``TenantDBMiddleware``."""
    return Starlette(
        routes=[
            Route("/", home),
            Route("/healthz", healthz),
            Route("/customers/{tenant}", visit),
        ],
        middleware=[Middleware(TenantDBMiddleware, migrations=MIGRATIONS, **tenantdb_options)],
    )


app = create_app()
