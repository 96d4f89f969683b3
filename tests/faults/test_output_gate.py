"""The output gate through a real server: answers that follow a write wait for the bucket.

The app is served by uvicorn (lifespan on) with ``TenantDBMiddleware`` in ``bucket``
durability, on the moto S3 server behind the fault proxy, and with no periodic shipping
(``sync_interval`` of an hour): whatever the bucket has when an answer arrives, the gate
put there. The truth is read by restoring the bucket directly, past the proxy.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from tenantdb import TenantDBMiddleware, tenant_db
from tenantdb.config import Durability, Secret
from tests.faults.conftest import ProxiedS3
from tests.support.bucket_view import query_restored
from tests.support.fault_proxy import Fault
from tests.support.servers import serve_in_thread

MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY)"]
# The write that makes a commit durable: the CAS on lock.json that publishes its segment
# (carried inline; the segment's own object is uploaded beside it, unwaited for).
LOCK_PUTS: dict[str, Any] = {"method": "PUT", "key": "tenants/acme/lock.json"}


async def add_hit(request: Request) -> Response:
    db = tenant_db(request)
    async with db.execute("INSERT INTO hits DEFAULT VALUES RETURNING id") as cursor:
        row = await cursor.fetchone()
    await db.commit()
    return JSONResponse({"id": row[0] if row else None})


async def count(request: Request) -> Response:
    async with tenant_db(request).execute("SELECT count(*) FROM hits") as cursor:
        row = await cursor.fetchone()
    return JSONResponse({"count": row[0] if row else None})


async def add_then_roll_back(request: Request) -> Response:
    db = tenant_db(request)
    await db.execute("INSERT INTO hits DEFAULT VALUES")
    await db.rollback()
    return JSONResponse({"rolled_back": True})


async def stream(request: Request) -> Response:
    db = tenant_db(request)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"before the write\n"
        await db.execute("INSERT INTO hits DEFAULT VALUES")
        await db.commit()
        yield b"after the write\n"

    return StreamingResponse(chunks())


async def socket(websocket: WebSocket) -> None:
    await websocket.accept()
    db = websocket.state.db
    while True:
        await websocket.receive_text()
        async with db.execute("INSERT INTO hits DEFAULT VALUES RETURNING id") as cursor:
            row = await cursor.fetchone()
        await db.commit()
        await websocket.send_text(str(row[0] if row else None))


async def add_after_rollback_to(request: Request) -> Response:
    # Valid SQLite: a comment between ROLLBACK and TO. The transaction still commits a row.
    await tenant_db(request).executescript(
        "BEGIN; INSERT INTO hits DEFAULT VALUES; SAVEPOINT sp; INSERT INTO hits DEFAULT "
        "VALUES; ROLLBACK /* c */ TO sp; COMMIT;"
    )
    return JSONResponse({"added": 1})


async def add_traced(request: Request) -> Response:
    db = tenant_db(request)
    statements: list[str] = []
    await db.set_trace_callback(statements.append)  # the app's own tracing
    await db.execute("INSERT INTO hits DEFAULT VALUES")
    await db.commit()
    return JSONResponse({"traced": len(statements)})


APP = Starlette(
    routes=[
        Route("/customers/acme/savepoint", add_after_rollback_to, methods=["POST"]),
        Route("/customers/acme/traced", add_traced, methods=["POST"]),
        Route("/customers/acme/hits", add_hit, methods=["POST"]),
        Route("/customers/acme/hits", count, methods=["GET"]),
        Route("/customers/acme/rollback", add_then_roll_back, methods=["POST"]),
        Route("/customers/acme/stream", stream),
        WebSocketRoute("/customers/acme/ws", socket),
    ]
)


def gated_app(s3: ProxiedS3, durability: Durability, **overrides: Any) -> TenantDBMiddleware:
    """The app behind the middleware of machine m1, on the bucket through the proxy."""
    env = s3.env()
    settings = s3.settings(
        "m1",
        bucket_name=env["BUCKET_NAME"],
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region=env["AWS_REGION"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=Secret(env["AWS_SECRET_ACCESS_KEY"]),
        durability=durability,
        **overrides,
    )
    return TenantDBMiddleware(APP, migrations=MIGRATIONS, settings=settings)


@contextmanager
def serve(s3: ProxiedS3, durability: Durability = "bucket", **overrides: Any) -> Iterator[str]:
    with serve_in_thread(gated_app(s3, durability, **overrides), lifespan="on") as url:
        yield f"{url}/customers/acme"


async def in_bucket(s3: ProxiedS3) -> set[int]:
    """The ids of the hits the bucket has (restored past the proxy)."""
    try:
        rows = await query_restored(
            await s3.open(proxied=False), s3.tmp_path, "SELECT id FROM hits"
        )
    except sqlite3.OperationalError:  # not even the table was shipped
        return set()
    return {row[0] for row in rows}


async def test_a_write_is_answered_only_once_the_bucket_has_it(s3: ProxiedS3) -> None:
    s3.proxy.add(Fault.delay(0.5, **LOCK_PUTS))
    with serve(s3) as url:
        async with httpx.AsyncClient(timeout=10) as client:
            started = time.monotonic()
            answer = await client.post(f"{url}/hits")
            waited = time.monotonic() - started
            assert answer.status_code == 200, answer.text
            assert answer.json()["id"] in await in_bucket(s3)
    assert waited >= 0.5  # it waited for the slow upload, and was not answered before


async def test_async_durability_answers_before_the_bucket_has_the_write(s3: ProxiedS3) -> None:
    with serve(s3, durability="async") as url:
        async with httpx.AsyncClient(timeout=10) as client:
            await client.get(f"{url}/hits")  # the first request waits for the new tenant
            await asyncio.sleep(0.2)
            answer = await client.post(f"{url}/hits")
            assert answer.status_code == 200
            assert answer.json()["id"] not in await in_bucket(s3)


async def test_reads_and_rolled_back_writes_are_not_held_behind_a_slow_upload(
    s3: ProxiedS3,
) -> None:
    with serve(s3) as url:
        async with httpx.AsyncClient(timeout=10) as client:
            await client.post(f"{url}/hits")
            s3.proxy.add(Fault.delay(2.0, **LOCK_PUTS))
            held = asyncio.create_task(client.post(f"{url}/hits"))
            await asyncio.sleep(0.3)  # the held write's upload is in flight
            for path, method in (("/hits", "GET"), ("/rollback", "POST")):
                started = time.monotonic()
                answer = await client.request(method, f"{url}{path}")
                assert answer.status_code == 200, answer.text
                assert time.monotonic() - started < 1.0, path
            assert not held.done()
            assert (await held).status_code == 200


async def test_failing_uploads_turn_held_answers_into_503s_never_200s(s3: ProxiedS3) -> None:
    with serve(s3, durability_timeout=1.5) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            first = await client.post(f"{url}/hits")
            assert first.status_code == 200
            s3.proxy.add(Fault.slow_down(**LOCK_PUTS))
            answers = await asyncio.gather(*(client.post(f"{url}/hits") for _ in range(5)))
            assert {a.status_code for a in answers} == {503}
            assert "not known to be in the bucket" in answers[0].text
            assert answers[0].headers["retry-after"]
            s3.proxy.clear()
            after = await client.post(f"{url}/hits")
            for _ in range(100):  # the lease may have lapsed meanwhile: it is taken back
                if after.status_code == 200:
                    break
                await asyncio.sleep(0.1)
                after = await client.post(f"{url}/hits")
            assert after.status_code == 200, after.text
            # Everything answered 200 is in the bucket; the 503s may or may not be.
            assert {first.json()["id"], after.json()["id"]} <= await in_bucket(s3)


async def test_answers_held_when_the_lease_is_lost_become_503s(s3: ProxiedS3) -> None:
    with serve(s3) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(f"{url}/hits")).status_code == 200
            s3.proxy.add(Fault.delay(1.0, **LOCK_PUTS))
            held = asyncio.create_task(client.post(f"{url}/hits"))
            await asyncio.sleep(0.3)
            # Another machine takes the lease meanwhile (its lock.json, written directly).
            lock = s3.lock()
            lock.update(owner="m2", claim="0" * 32, generation=lock["generation"] + 1)
            s3.put("tenants/acme/lock.json", json.dumps(lock).encode())
            answer = await held
    assert answer.status_code == 503, answer.text
    assert "lease" in answer.text


async def test_a_streamed_answer_is_cut_if_a_write_in_it_cannot_be_made_durable(
    s3: ProxiedS3,
) -> None:
    with serve(s3, durability_timeout=1.0) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            whole = await client.get(f"{url}/stream")
            assert whole.text == "before the write\nafter the write\n"
            s3.proxy.add(Fault.slow_down(**LOCK_PUTS))
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"{url}/stream")


def test_a_websocket_message_after_a_write_waits_for_the_bucket_or_closes_1011(
    s3: ProxiedS3,
) -> None:
    app = gated_app(s3, "bucket", durability_timeout=1.0)
    with TestClient(app) as client, client.websocket_connect("/customers/acme/ws") as ws:
        ws.send_text("hit")
        hit = int(ws.receive_text())
        assert hit in asyncio.run(in_bucket(s3))
        s3.proxy.add(Fault.slow_down(**LOCK_PUTS))
        ws.send_text("hit")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 1011
    assert "not known to be in the bucket" in closed.value.reason


async def test_concurrent_writes_share_their_uploads(s3: ProxiedS3) -> None:
    with serve(s3) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(f"{url}/hits")).status_code == 200
            s3.proxy.add(Fault.delay(0.3, **LOCK_PUTS))
            s3.proxy.reset_log()
            answers = await asyncio.gather(*(client.post(f"{url}/hits") for _ in range(20)))
            cas = s3.proxy.seen(operation="PutObject", key="tenants/acme/lock.json")
            assert {a.status_code for a in answers} == {200}
            ids = {a.json()["id"] for a in answers}
            assert ids <= await in_bucket(s3)
    # One CAS was in flight when most of them committed; the next carried them all.
    assert len(cas) <= 3, cas


async def answer_while_uploads_fail(s3: ProxiedS3, path: str) -> httpx.Response:
    """POST ``path`` once lock.json's writes (which make commits durable) all fail."""
    with serve(s3, durability_timeout=1.0) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(f"{url}/hits")).status_code == 200
            s3.proxy.add(Fault.slow_down(**LOCK_PUTS))
            return await client.post(f"{url}{path}")


async def test_gate_sees_commit_after_rollback_with_comment_before_to(s3: ProxiedS3) -> None:
    answer = await answer_while_uploads_fail(s3, "/savepoint")
    assert answer.status_code == 503, answer.text  # never a 200 for a write not durable
    assert "not known to be in the bucket" in answer.text


async def test_gate_survives_app_trace_callback(s3: ProxiedS3) -> None:
    answer = await answer_while_uploads_fail(s3, "/traced")
    assert answer.status_code == 503, answer.text
    assert "not known to be in the bucket" in answer.text


async def test_a_write_the_bucket_refuses_is_503_without_bucket_keys_in_the_answer(
    s3: ProxiedS3, caplog: pytest.LogCaptureFixture
) -> None:
    """The client learns that its write may not be kept; which key failed is the log's."""
    with serve(s3) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(f"{url}/hits")).status_code == 200
            s3.proxy.add(Fault.error(403, "AccessDenied", **LOCK_PUTS))
            answer = await client.post(f"{url}/hits")
            s3.proxy.clear()
    assert answer.status_code == 503, answer.text
    assert "not known to be in the bucket (the bucket did not confirm it)" in answer.text
    assert "tenants/acme" not in answer.text
    assert "lock.json" not in answer.text
    assert "tenants/acme/lock.json" in caplog.text  # the log names it
