"""TenantDBMiddleware facing clients it cannot trust: what a 503 tells them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_ws import AsyncWebSocketSession, aconnect_ws
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from example_app import MIGRATIONS
from tenantdb import TenantDBMiddleware, tenant_db
from tenantdb.asgi.middleware import MAX_HANDED_BACK_HOLDS
from tenantdb.config import Settings
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lease import Lease
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


# -- slow clients hold no connection ---------------------------------------------------------


async def upload(request: Request) -> Response:
    body = await request.body()  # a slow client: the request waits here
    db = tenant_db(request)
    await db.execute("UPDATE counter SET count = count + ?", [len(body)])
    await db.commit()
    return PlainTextResponse("stored")


async def upload_in_a_transaction(request: Request) -> Response:
    db = tenant_db(request)
    await db.execute("BEGIN IMMEDIATE")  # the app's own choice: it holds the connection
    body = await request.body()
    await db.execute("UPDATE counter SET count = count + ?", [len(body)])
    await db.commit()
    return PlainTextResponse("stored")


async def idle_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    db = tenant_db(websocket)
    async with db.execute("SELECT count FROM counter") as cursor:
        row = await cursor.fetchone()
    await websocket.send_json({"count": row[0] if row else None})
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await websocket.receive_text()  # an idle client: the socket waits here


CLIENTS_APP = Starlette(
    routes=[
        Route("/customers/{tenant}", starlette_visit),
        Route("/customers/{tenant}/upload", upload, methods=["POST"]),
        Route("/customers/{tenant}/held", upload_in_a_transaction, methods=["POST"]),
        WebSocketRoute("/customers/{tenant}/ws", idle_socket),
    ]
)


def serving_app(root: Path, **overrides: Any) -> TenantDBMiddleware:
    return TenantDBMiddleware(
        CLIENTS_APP,
        migrations=MIGRATIONS,
        settings=Settings(
            tenant="acme",
            machine_id="m1",
            data_dir=root / "data",
            local_bucket_dir=root / "bucket",
            checkpoint_interval=0,
            kill_timeout=2,
            **overrides,
        ),
    )


async def settled(app: TenantDBMiddleware) -> None:
    """Wait (bounded) for the requests of closed clients to end, so the server stops at once."""
    for _ in range(100):
        await asyncio.sleep(0.05)
        if app._running.count == 0:
            return


async def start_slow_upload(url: str, path: str) -> asyncio.StreamWriter:
    """A POST whose body never finishes arriving: headers and 10 of its 1,000 bytes."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode())
    writer.write(b"x" * 10)
    await writer.drain()
    return writer


async def test_eight_slow_uploads_and_eight_idle_websockets_leave_the_tenant_serving(
    tmp_path: Path,
) -> None:
    app = serving_app(tmp_path, durability="async")  # 8 connections at most, the default
    with serve_in_thread(app, lifespan="on") as url:
        async with contextlib.AsyncExitStack() as stack, httpx.AsyncClient(timeout=10) as client:
            uploads = [await start_slow_upload(url, "/customers/acme/upload") for _ in range(8)]
            for writer in uploads:
                stack.callback(writer.close)
            ws_url = url.replace("http://", "ws://") + "/customers/acme/ws"
            for _ in range(8):
                socket: AsyncWebSocketSession = await stack.enter_async_context(aconnect_ws(ws_url))
                assert (await socket.receive_json())["count"] >= 0  # it used the database
            await asyncio.sleep(0.3)  # every borrower has held its turn long by now
            # 16 clients wait on their side; the tenant still answers everyone else.
            answers = await asyncio.wait_for(
                asyncio.gather(*(client.get(f"{url}/customers/acme") for _ in range(20))), 8
            )
            assert [a.status_code for a in answers] == [200] * 20
            health = app.tenantdb.pool.stalled() if app.tenantdb else "no tenant"
            assert health is None
        await settled(app)


async def test_a_request_that_gets_no_connection_in_time_is_503_and_the_pool_says_stalled(
    tmp_path: Path,
) -> None:
    app = serving_app(tmp_path, durability="async", pool_size=1)
    with serve_in_thread(app, lifespan="on") as url:
        assert app.tenantdb is not None
        pool = app.tenantdb.pool
        pool.lend_timeout = 0.3
        holder = await start_slow_upload(url, "/customers/acme/held")  # holds the one connection
        try:
            await asyncio.sleep(0.2)
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.get(f"{url}/customers/acme")
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"].isdigit()
            assert "retry shortly" in answer.text
            assert str(tmp_path) not in answer.text
            reason = pool.stalled()
            assert reason is not None
            assert "within 0.3s" in reason
            async with httpx.AsyncClient(timeout=10) as client:
                health = await client.get(f"{url}/healthz")
            assert health.status_code == 503  # Fly stops sending it requests, and says why
            assert "within 0.3s" in health.text
        finally:
            holder.close()
        await settled(app)


async def test_a_standby_holds_only_a_bounded_number_of_requests_that_say_they_were_handed_back(
    tmp_path: Path,
) -> None:
    """``fly-replay-failed`` is a header any client can send: it cannot make a standby hold
    every request of a flood for TENANTDB_HANDOFF_WAIT."""
    wait = 3.0
    async with TenantDB(machine_settings(tmp_path, "m1"), migrations=MIGRATIONS):
        standby = TenantDBMiddleware(
            CLIENTS_APP,
            migrations=MIGRATIONS,
            settings=replace(machine_settings(tmp_path, "m2"), handoff_wait=wait, kill_timeout=2),
        )
        with serve_in_thread(standby, lifespan="on") as url:
            assert standby.tenantdb is not None
            assert standby.tenantdb.state == "standby"
            flood = MAX_HANDED_BACK_HOLDS + 16
            limits = httpx.Limits(max_connections=flood)
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:

                async def forged() -> float:
                    started = time.monotonic()
                    answer = await client.get(
                        f"{url}/customers/acme", headers={"fly-replay-failed": "forged"}
                    )
                    assert answer.status_code == 503, answer.text
                    return time.monotonic() - started

                took = await asyncio.gather(*(forged() for _ in range(flood)))
            quick = sum(1 for seconds in took if seconds < wait / 2)
            # Before, all of them were held for the whole wait.
            assert quick >= flood - MAX_HANDED_BACK_HOLDS, sorted(took)
