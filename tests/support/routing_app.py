"""An app for routing tests under real uvicorn: counts visits, echoes uploads and websockets.

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
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from example_app import MIGRATIONS
from tenantdb import TenantDBMiddleware

URLS: dict[str, str] = json.loads(os.environ.get("ROUTING_TEST_MACHINE_URLS", "{}"))


def machine_url(machine_id: str) -> str:
    """Return the test URL of a machine (an unknown id gets a port nothing listens on)."""
    return URLS.get(machine_id, "http://127.0.0.1:9")


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
            # The machine the signed header names (its signature is checked by tenantdb).
            "proxied_by": request.headers.get("tenantdb-proxied-by", "").partition(";")[0] or None,
            "query": request.url.query,
            "host": request.headers.get("host"),
        },
        headers={"x-upload": "done"},
    )


async def echo(websocket: WebSocket) -> None:
    """Say who serves the socket, echo each message back, close with 4000 on "bye"."""
    await websocket.accept(subprotocol=websocket.scope["subprotocols"][0])
    await websocket.send_json(
        {
            "tenant": websocket.state.tenant,
            "machine": os.environ["FLY_MACHINE_ID"],
            "replayed_from": websocket.headers.get("fly-replay-src", "").partition(";")[0],
        }
    )
    while (text := await websocket.receive_text()) != "bye":
        await websocket.send_text(f"echo {text}")
    await websocket.close(4000, "bye")


app = Starlette(
    routes=[
        WebSocketRoute("/customers/{tenant}/ws", echo),
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
