"""An app for replica tests under real uvicorn: notes written and read, and a GET that writes.

``GET /customers/{tenant}/notes`` reads every note (in the order written; with ``?token=``
only that one, if it is there), ``POST`` with
``?token=`` writes one, ``GET /customers/{tenant}/sneaky`` writes although it is a GET (an
app's marking mistake), ``GET /customers/{tenant}/late`` writes after its answer began.
Answers say which machine ran them. Serve with ``uvicorn tests.support.replica_app:app``
(``:long_polls_only``: the same as a holder from before tail hint streams).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tenantdb import TenantDBMiddleware, tenant_db

MIGRATIONS = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE);"]
MACHINE = os.environ.get("FLY_MACHINE_ID", "")


async def notes(request: Request) -> Response:
    db = tenant_db(request)
    if request.method == "POST":
        await db.execute("INSERT INTO notes (token) VALUES (?)", (request.query_params["token"],))
        await db.commit()
        return JSONResponse({"machine": MACHINE}, status_code=201)
    if "token" in request.query_params:  # one note, if it is there (a cheap probe)
        query, args = "SELECT token FROM notes WHERE token = ?", (request.query_params["token"],)
    else:
        query, args = "SELECT token FROM notes ORDER BY id", ()
    rows = await db.execute_fetchall(query, args)
    return JSONResponse({"machine": MACHINE, "tokens": [row[0] for row in rows]})


async def late(request: Request) -> Response:
    """A GET that writes after its answer began (streamed): a marking bug on a replica."""
    db = tenant_db(request)

    async def body() -> AsyncIterator[bytes]:
        yield b"begun;"
        try:
            await db.execute("INSERT INTO notes (token) VALUES ('late')")
            await db.commit()
            yield b"wrote"
        except Exception:
            yield b"refused"

    return StreamingResponse(body(), headers={"x-machine": MACHINE})


async def sneaky(request: Request) -> Response:
    db = tenant_db(request)
    try:
        await db.execute("INSERT INTO notes (token) VALUES (?)", (f"sneaky-{os.urandom(4).hex()}",))
        await db.commit()
    except Exception as exc:  # an app that hides the error in its own answer
        return JSONResponse({"machine": MACHINE, "error": str(exc)}, status_code=500)
    return JSONResponse({"machine": MACHINE, "wrote": True})


app = Starlette(
    routes=[
        Route("/customers/{tenant}/notes", notes, methods=["GET", "POST"]),
        Route("/customers/{tenant}/sneaky", sneaky),
        Route("/customers/{tenant}/late", late),
    ],
    middleware=[Middleware(TenantDBMiddleware, migrations=MIGRATIONS)],
)


async def long_polls_only(scope: Scope, receive: Receive, send: Send) -> None:
    """``app`` as a holder from before hint streams answers: every tail hint request a long
    poll (it never saw the Accept header that asks for a stream)."""
    if scope["type"] == "http" and scope["path"].startswith("/.tenantdb/tail/"):
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"accept"]}
    await app(scope, receive, send)
