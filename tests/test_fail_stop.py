"""Fail stop: a loop the machine cannot run without dies, and the machine says so loudly.

Each fault is an exception no loop expects (``ValueError``, ``RecursionError``), injected
into one method of a real shipper, lease or standby, on real SQLite files and the local
bucket; the exit code is that of a real uvicorn process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import tenantdb.machine.local_data
from tenantdb import TenantDBMiddleware, tenant_db
from tenantdb.config import Settings
from tenantdb.errors import ConfigurationError, LeaseLostError, ReplicationError
from tenantdb.machine.database import TenantDB
from tenantdb.machine.standby import Standby
from tenantdb.machine.supervisor import FAIL_STOP_EXIT_CODE
from tenantdb.metrics import Metrics
from tenantdb.protocol.lease import Lease
from tenantdb.replication.shipper import Shipper
from tenantdb.storage.local import LocalBucket
from tests.support.lifespan import lifespan
from tests.support.servers import UvicornProcess

MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY);"]


def settings(tmp_path: Path, machine: str, **kwargs: Any) -> Settings:
    return Settings(
        tenant="acme",
        machine_id=machine,
        data_dir=tmp_path / machine,
        local_bucket_dir=tmp_path / "bucket",
        lease_ttl=3,
        checkpoint_interval=0,
        sync_interval=0.1,
        follow_interval=0.1,
        metrics_port=0,
        **kwargs,
    )


async def lock_json(tmp_path: Path) -> dict[str, Any]:
    async with LocalBucket(tmp_path / "bucket") as bucket:
        lock: dict[str, Any] = json.loads((await bucket.get("tenants/acme/lock.json")).body)
    return lock


async def eventually(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def failures(metrics: Metrics, task: str) -> float:
    value = metrics.registry.get_sample_value("tenantdb_task_failures_total", {"task": task})
    return value or 0.0


def died(caplog: pytest.LogCaptureFixture, task: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.CRITICAL and f"the {task} task died" in r.getMessage()
    ]


def raising(error: type[Exception]) -> Callable[..., Any]:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise error("injected")

    return broken


@pytest.mark.parametrize(
    ("owner", "method", "error", "task"),
    [
        (Shipper, "ship_once", ValueError, "shipper"),
        (Lease, "renew", RecursionError, "renewal"),
    ],
    ids=["shipper-valueerror", "renewal-recursionerror"],
)
async def test_a_required_loop_dying_fails_the_machine_stop_and_releases_the_lease(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    owner: type,
    method: str,
    error: type[Exception],
    task: str,
) -> None:
    tdb = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await tdb.start()
    try:
        assert tdb.serving
        assert tdb.health().ok, tdb.health()
        monkeypatch.setattr(owner, method, raising(error))
        assert await eventually(lambda: tdb.state == "failed"), tdb.state
        reason = await asyncio.wait_for(tdb.failed(), 15)
        assert reason == f"the {task} task died ({error.__name__})"
        assert not tdb.serving
        with pytest.raises(LeaseLostError):
            tdb.connection()
        health = tdb.health()
        assert not health.ok
        assert f"this machine failed: the {task} task died" in health.reasons[0]
        lock = await lock_json(tmp_path)
        assert lock["owner"] is None, lock  # released: a standby may take over at once
        assert lock["generation"] == 1
        assert failures(tdb.metrics, task) == 1
        [record] = died(caplog, task)  # logged once, with the traceback
        assert record.exc_info is not None
        assert record.exc_info[0] is error
    finally:
        await tdb.stop()
    assert tdb.state == "stopped"


async def visit(request: Request) -> Response:
    db = tenant_db(request)
    await db.execute("INSERT INTO hits DEFAULT VALUES")
    await db.commit()
    return PlainTextResponse("counted\n")


async def test_a_failed_machine_answers_503_with_the_reason_and_a_red_health_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Starlette(
        routes=[Route("/customers/{tenant}", visit)],
        middleware=[
            Middleware(
                TenantDBMiddleware,
                settings=settings(tmp_path, "m1"),
                migrations=MIGRATIONS,
                exit_on_failure=False,
            )
        ],
    )
    transport = httpx.ASGITransport(app)
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        healthy = await client.get("/healthz")
        assert (healthy.status_code, healthy.text) == (200, "ok\n")
        assert (await client.get("/customers/acme")).status_code == 200
        monkeypatch.setattr(Shipper, "ship_once", raising(ValueError))
        for _ in range(750):
            health = await client.get("/healthz")
            if health.status_code != 200:
                break
            await asyncio.sleep(0.02)
        assert health.status_code == 503, health.text
        assert "the shipper task died (ValueError)" in health.text
        answer = await client.get("/customers/acme")
        assert answer.status_code == 503
        assert "failed (the shipper task died (ValueError))" in answer.text
        assert answer.headers["retry-after"]


async def test_a_standby_loop_dying_is_restarted_and_the_standby_still_takes_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    holder = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await holder.start()
    async with holder.connection() as db:
        await db.executemany("INSERT INTO hits DEFAULT VALUES", [()] * 3)
        await db.commit()
    await holder.sync()
    standby = TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS)
    follow = Standby._follow
    calls = 0

    async def follow_broken_once(role: Standby, record: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("injected")
        await follow(role, record)

    monkeypatch.setattr(Standby, "_follow", follow_broken_once)
    try:
        await standby.start()
        assert standby.state == "standby"
        assert await eventually(lambda: calls >= 2), "the standby loop was not restarted"
        assert failures(standby.metrics, "standby") == 1
        [record] = died(caplog, "standby")
        assert "restarting it in 0.5s" in record.getMessage()
        assert record.exc_info is not None
        assert record.exc_info[0] is ValueError
        assert await eventually(lambda: standby.health().ok), standby.health()
        await holder.stop()  # releases the lease: the restarted loop takes it
        assert await eventually(lambda: standby.serving), (standby.state, standby.problem)
        async with standby.connection() as db, db.execute("SELECT count(*) FROM hits") as cur:
            assert await cur.fetchone() == (3,)
    finally:
        await holder.stop()
        await standby.stop()


def broken_migration(conn: sqlite3.Connection) -> None:
    raise ValueError("injected")


async def test_a_failed_migration_at_startup_releases_the_lease_at_once(tmp_path: Path) -> None:
    tdb = TenantDB(settings(tmp_path, "m1"), migrations=[*MIGRATIONS, broken_migration])
    with pytest.raises(ConfigurationError, match="a migration failed: ValueError: injected"):
        await tdb.start()
    assert tdb.state == "stopped"
    lock = await lock_json(tmp_path)
    assert lock["owner"] is None, lock
    other = TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS)
    await other.start(standby=False)  # no LeaseHeldError: nothing to wait for
    try:
        assert other.serving
    finally:
        await other.stop()


async def test_a_restore_failing_at_startup_keeps_the_server_up_and_retries_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = TenantDB(settings(tmp_path, "m0"), migrations=MIGRATIONS)
    async with first, first.connection() as db:
        await db.execute("INSERT INTO hits DEFAULT VALUES")
        await db.commit()
    restore = tenantdb.machine.local_data.restore_database
    calls = 0

    async def damaged_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ReplicationError("tenants/acme/log/2/000000000001.seg is damaged (injected)")
        return await restore(*args, **kwargs)

    monkeypatch.setattr(tenantdb.machine.local_data, "restore_database", damaged_once)
    tdb = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await tdb.start(standby=True)  # no exception: the server stays up
    try:
        assert tdb.state == "restoring"
        assert "is damaged (injected)" in (tdb.problem or "")
        assert tdb.health().reasons == ("the tenant's database cannot be opened (retrying)",)
        assert (await lock_json(tmp_path))["owner"] == "m1"  # kept while it retries
        assert await eventually(lambda: tdb.serving), (tdb.state, tdb.problem)
        assert calls == 2
        assert tdb.problem is None
        assert tdb.health().ok
    finally:
        await tdb.stop()


def fault_env(tmp_path: Path, subprocess_env: dict[str, str], fault: str) -> dict[str, str]:
    return {
        **subprocess_env,
        "TENANT_ID": "acme",
        "FLY_MACHINE_ID": "m1",
        "TENANTDB_DATA_DIR": str(tmp_path / "m1"),
        "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket"),
        "TENANTDB_LEASE_TTL": "3",
        "TENANTDB_METRICS_PORT": "0",
        "TENANTDB_TEST_FAULT": fault,
        "TENANTDB_TEST_FAULT_FILE": str(tmp_path / "fault"),
    }


@pytest.mark.parametrize(
    ("fault", "task", "error"),
    [("shipper", "shipper", "ValueError"), ("renewal", "renewal", "RecursionError")],
)
def test_a_uvicorn_server_whose_loop_dies_exits_non_zero_with_the_lease_released(
    tmp_path: Path, subprocess_env: dict[str, str], fault: str, task: str, error: str
) -> None:
    env = fault_env(tmp_path, subprocess_env, fault)
    server = UvicornProcess(
        "tests.support.faulty_app:app", env, tmp_path / "server.log", inherit_environ=False
    )
    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/customers/acme", timeout=10).status_code == 200
        (tmp_path / "fault").touch()
        code = server.proc.wait(30)
    finally:
        server.close()
    log = server.log()
    assert code == FAIL_STOP_EXIT_CODE, log
    assert log.count(f"the {task} task died ({error}); this machine fails stop") == 1, log
    assert "Traceback (most recent call last)" in log
    assert f"shutting the server down, exit code {FAIL_STOP_EXIT_CODE}" in log
    assert log.rstrip().endswith(f"shutdown complete, exiting with code {FAIL_STOP_EXIT_CODE}")
    lock = asyncio.run(lock_json(tmp_path))
    assert lock["owner"] is None, lock


async def test_a_snapshot_key_gc_cannot_read_never_stops_log_shipping(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case: a 15-digit time in a snapshot key once killed the shipper via GC."""
    tdb = TenantDB(settings(tmp_path, "m1", durability="async"), migrations=MIGRATIONS)
    await tdb.start()
    try:
        async with LocalBucket(tmp_path / "bucket") as bucket:
            await bucket.put(
                "tenants/acme/snapshots/00000001-00000099-000000000000-999999999999999-ab.sqlite3",
                b"",
            )
        shipper = tdb._shipper
        assert shipper is not None
        shipper.garbage.next_collection = time.monotonic()  # garbage collection is due now
        await asyncio.sleep(0.5)  # a collection ran into the key (and may have died of it)
        before = (await lock_json(tmp_path))["log"]
        async with tdb.connection() as db:
            await db.execute("INSERT INTO hits DEFAULT VALUES")
            await db.commit()
        # async durability: only the shipper's own loop can ship this commit
        for _ in range(100):
            after = (await lock_json(tmp_path))["log"]
            if after != before:
                break
            await asyncio.sleep(0.05)
        assert after != before, "nothing was shipped after the garbage collection"
        assert tdb.state == "serving"
        assert tdb.health().ok, tdb.health()
        # Whether the key still kills a collection (then restarted) is the parser's business.
        assert len(died(caplog, "gc")) == failures(tdb.metrics, "gc")
        assert not died(caplog, "shipper")
    finally:
        await tdb.stop()


async def test_a_server_stopped_while_it_cannot_open_the_tenant_releases_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Port in use, a deploy: a server that never served gives the lease back at once."""
    first = TenantDB(settings(tmp_path, "m0"), migrations=MIGRATIONS)
    async with first, first.connection() as db:
        await db.execute("INSERT INTO hits DEFAULT VALUES")
        await db.commit()
    monkeypatch.setattr(tenantdb.machine.local_data, "restore_database", raising(ReplicationError))
    tdb = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await tdb.start(standby=True)
    assert tdb.state == "restoring"
    assert (await lock_json(tmp_path))["owner"] == "m1"
    await tdb.stop()
    lock = await lock_json(tmp_path)
    assert lock["owner"] is None, lock
    assert lock["generation"] == 2  # m1's, released: the next holder takes generation 3


async def test_with_async_durability_a_failed_machine_keeps_the_lease_for_its_own_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answered commit the dead shipper never shipped is published by the restart."""
    tdb = TenantDB(settings(tmp_path, "m1", durability="async"), migrations=MIGRATIONS)
    await tdb.start()
    monkeypatch.setattr(Shipper, "ship_once", raising(ValueError))
    async with tdb.connection() as db:
        await db.execute("INSERT INTO hits DEFAULT VALUES")
        await db.commit()  # answered at once: async durability
    assert await asyncio.wait_for(tdb.failed(), 15) == "the shipper task died (ValueError)"
    await tdb.stop()
    assert (await lock_json(tmp_path))["owner"] == "m1"  # kept, not released
    monkeypatch.undo()
    again = TenantDB(settings(tmp_path, "m1", durability="async"), migrations=MIGRATIONS)
    await again.start(standby=False)  # the same data directory takes it back at once
    async with again.connection() as db, db.execute("SELECT count(*) FROM hits") as cursor:
        assert await cursor.fetchone() == (1,)
    await again.stop()  # publishes it
    elsewhere = TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS)
    async with (
        elsewhere,
        elsewhere.connection() as db,
        db.execute("SELECT count(*) FROM hits") as c,
    ):
        assert await c.fetchone() == (1,)


def test_a_failed_server_held_open_by_a_request_still_exits_within_the_kill_timeout(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    env = {**fault_env(tmp_path, subprocess_env, "shipper"), "TENANTDB_KILL_TIMEOUT": "2"}
    server = UvicornProcess(
        "tests.support.faulty_app:app", env, tmp_path / "server.log", inherit_environ=False
    )
    try:
        server.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            # In the handler for a minute: the graceful shutdown would wait for it.
            held = pool.submit(httpx.get, f"{server.url}/customers/acme?delay=60", timeout=90)
            time.sleep(0.5)
            (tmp_path / "fault").touch()
            started = time.monotonic()
            code = server.proc.wait(30)
            took = time.monotonic() - started
            with contextlib.suppress(httpx.HTTPError):
                held.result()
    finally:
        server.close()
    log = server.log()
    assert code == FAIL_STOP_EXIT_CODE, log
    assert "the server did not shut down within 2s; exiting with code 70" in log
    assert took < 15, log
    assert asyncio.run(lock_json(tmp_path))["owner"] is None


async def test_a_watcher_that_dies_is_logged_at_critical_not_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The task that ends a failed machine's process could itself die of a bug: loudly."""
    app = TenantDBMiddleware(Starlette(), settings=settings(tmp_path, "m1"))

    async def broken() -> None:
        raise ValueError("injected into a watcher")

    watcher = asyncio.create_task(broken())
    with contextlib.suppress(ValueError):
        await watcher
    app.process._watcher_ended(watcher)
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.getMessage() == "tenantdb: a watcher of this machine died"
    assert record.exc_info is not None
