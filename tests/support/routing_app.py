"""An app for routing tests under real uvicorn: counts visits and echoes uploads.

Environment, besides tenantdb's own: ``ROUTING_TEST_MACHINE_URLS`` (JSON object: machine id ->
base URL, where large bodies are streamed) and ``ROUTING_TEST_PROXY_LARGE_BODIES`` ("0" to
answer 413 instead). Serve with ``uvicorn tests.support.routing_app:app``.
"""

from __future__ import annotations

import hashlib
import json
import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from example_app import MIGRATIONS
from tenantdb import TenantDBMiddleware

URLS: dict[str, str] = json.loads(os.environ.get("ROUTING_TEST_MACHINE_URLS", "{}"))


def machine_url(machine_id: str) -> str:
    """Return the test URL of a machine (an unknown id gets a port nothing listens on)."""
    return URLS.get(machine_id, "http://127.0.0.1:9")


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def visit(request: Request) -> Response:
    return JSONResponse({"tenant": request.state.tenant, "machine": os.environ["FLY_MACHINE_ID"]})


async def upload(request: Request) -> Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse(
        {
            "tenant": request.state.tenant,
            "machine": os.environ["FLY_MACHINE_ID"],
            "size": size,
            "sha256": digest.hexdigest(),
            "proxied_by": request.headers.get("tenantdb-proxied-by"),
            "query": request.url.query,
            "host": request.headers.get("host"),
        },
        headers={"x-upload": "done"},
    )


app = Starlette(
    routes=[
        Route("/healthz", healthz),
        Route("/customers/{tenant}", visit),
        Route("/customers/{tenant}/upload", upload, methods=["POST", "PUT"]),
    ],
    middleware=[
        Middleware(
            TenantDBMiddleware,
            migrations=MIGRATIONS,
            proxy_large_bodies=os.environ.get("ROUTING_TEST_PROXY_LARGE_BODIES", "1") != "0",
            machine_url=machine_url,
        )
    ],
)
