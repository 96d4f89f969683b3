"""A Starlette app whose tenants each count their visits in their own SQLite database."""

from __future__ import annotations

import html
import os
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tenantdb import TenantDBMiddleware, tenant_db

MIGRATIONS = [
    """
    CREATE TABLE counter (id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL);
    INSERT INTO counter (id, count) VALUES (1, 0);
    """,
]

_STYLE = """<style>body{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto}
.count{font-size:4rem;font-weight:700}</style>"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tenant {tenant}</title>{style}</head>
<body><h1>Tenant {tenant}</h1><p class="count">{count}</p>
<p>visits, counted in this tenant's own SQLite database on machine
<code>{machine}</code> in region <code>{region}</code>.</p>
<p>This request {path}.</p>
<p><a href="">Reload to count again</a> &middot; <a href="/">Home</a></p></body></html>
"""

_HOME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tenantdb counter demo</title>{style}</head>
<body><h1>tenantdb counter demo</h1>
<p>Each tenant has its own SQLite database, served by its own machine. A visit to a
tenant's page lands on any machine; unless that machine serves the tenant, it answers
with a <code>fly-replay</code> header and the proxy replays the request to the tenant's
machine, which counts the visit in the tenant's database. The page is sent once the bucket
has the visit (<code>TENANTDB_DURABILITY=bucket</code>, the default; with
<code>async</code> it is sent at once, and the visit reaches the bucket within a
second).</p>
<ul>{links}</ul>
<p>As JSON: <code>curl -H 'Accept: application/json' {base}customers/{first}</code></p>
</body></html>
"""


def _tenants() -> list[str]:
    # The demo's own list: `tenantdb dev` runs these by default, and the deploy guide
    # creates machines for the first two.
    return [t for t in os.environ.get("DEMO_TENANTS", "100,200,300").split(",") if t]


async def home(request: Request) -> Response:
    """The tenants, with links, and what happens on a visit."""
    tenants = _tenants()
    links = "".join(
        f'<li><a href="/customers/{html.escape(t)}">tenant {html.escape(t)}</a></li>'
        for t in tenants
    )
    return HTMLResponse(
        _HOME.format(
            style=_STYLE,
            links=links,
            base=html.escape(str(request.base_url)),
            first=html.escape(tenants[0] if tenants else "100"),
        )
    )


def _request_path(request: Request, machine: str) -> str:
    """Which machine received the request first, from Fly's ``fly-replay-src`` header."""
    fields = dict(
        part.strip().partition("=")[::2]
        for part in request.headers.get("fly-replay-src", "").split(";")
    )
    source = fields.get("instance")
    if source and source != machine:
        return f"was received by machine {source} and replayed to {machine}"
    return f"was received by machine {machine} itself, which serves this tenant"


async def visit(request: Request) -> Response:
    """Count one visit for the request's tenant and show the count (HEAD only reads it)."""
    db = tenant_db(request)
    if request.method == "HEAD":  # a HEAD asks about the page; it is not a visit
        async with db.execute("SELECT count FROM counter WHERE id = 1") as cursor:
            row = await cursor.fetchone()
    else:
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
            style=_STYLE,
            tenant=html.escape(tenant),
            count=count,
            machine=html.escape(machine),
            region=html.escape(region),
            path=html.escape(_request_path(request, machine)),
        )
    )


def create_app(**tenantdb_options: Any) -> Starlette:
    """Build the demo app; keyword arguments go to ``TenantDBMiddleware``."""
    return Starlette(
        routes=[
            Route("/", home),
            # GET /healthz, Fly's health check, is the middleware's (health_path): red
            # whenever a loop the machine needs has died (see docs/guarantees.md).
            Route("/customers/{tenant}", visit),
        ],
        middleware=[Middleware(TenantDBMiddleware, migrations=MIGRATIONS, **tenantdb_options)],
    )


app = create_app()
