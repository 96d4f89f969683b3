"""Idle stop: a tenant nobody uses releases its lease as "idle" and its server exits 0.

Real uvicorn processes (for the exit code) on the embedded local bucket, real SQLite files;
the idle time is a second or two so that each test stays short.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from tenantdb.config import Settings
from tenantdb.machine.database import TenantDB
from tenantdb.metrics import Metrics
from tenantdb.storage.local import LocalBucket
from tenantdb.storage.metered import MeteredBucket
from tests.support.servers import MachineProcesses

APP = "tests.support.apps:starlette_app"
# tenantdb's INFO lines in the machines' logs, which uvicorn's own configuration leaves out.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
}
MIGRATIONS = ["CREATE TABLE IF NOT EXISTS hits (id INTEGER PRIMARY KEY)"]


def logged(tmp_path: Path) -> list[str]:
    """uvicorn's arguments for a log with tenantdb's INFO lines."""
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(LOGGING))
    return ["--log-config", str(path)]


def machine_env(tmp_path: Path, subprocess_env: dict[str, str], **more: str) -> dict[str, str]:
    return {
        **subprocess_env,
        "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket"),
        "TENANTDB_LEASE_TTL": "3",
        "TENANTDB_FOLLOW_INTERVAL": "0.2",
        "TENANTDB_METRICS_PORT": "0",
        "TENANTDB_CHECKPOINT_INTERVAL": "0",
        **more,
    }


async def read_lock(tmp_path: Path) -> dict[str, Any]:
    async with LocalBucket(tmp_path / "bucket") as bucket:
        lock: dict[str, Any] = json.loads((await bucket.get("tenants/acme/lock.json")).body)
    return lock


def test_an_idle_holder_ships_its_tail_releases_as_idle_exits_0_and_wakes_on_its_file(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    # async durability and a sync interval of an hour: the write is only in the local file
    # until the idle stop ships it.
    env = machine_env(
        tmp_path,
        subprocess_env,
        TENANTDB_IDLE_STOP="1",
        TENANTDB_DURABILITY="async",
        TENANTDB_SYNC_INTERVAL="3600",
    )
    with MachineProcesses(tmp_path) as machines:
        m1 = machines.start(APP, "m1", "acme", env, uvicorn_args=logged(tmp_path))
        assert httpx.get(f"{m1.url}/customers/acme", timeout=10).json()["count"] == 1
        code = m1.proc.wait(20)
        log = m1.log()
        assert code == 0, log
        assert "no request for 1s; stopping this machine" in log
        assert "lease released (idle)" in log
        lock = asyncio.run(read_lock(tmp_path))
        assert (lock["owner"], lock["released"], lock["last_owner"]) == (None, "idle", "m1")
        assert lock["log"]["tail"] >= lock["log"]["base"], lock  # the tail was shipped
        # Woken (by the next request, on Fly): the same machine goes on from its own file.
        again = machines.start(
            APP, "m1", "acme", {**env, "TENANTDB_IDLE_STOP": "0"}, uvicorn_args=logged(tmp_path)
        )
        assert httpx.get(f"{again.url}/customers/acme", timeout=10).json()["count"] == 2
        assert "continuing from the local file" in again.log()
        assert asyncio.run(read_lock(tmp_path))["released"] is None  # held again


def test_a_standby_whose_holder_stopped_idle_stops_too_and_does_not_take_the_lease(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    env = machine_env(tmp_path, subprocess_env, TENANTDB_IDLE_STOP="2")
    with MachineProcesses(tmp_path) as machines:
        m1 = machines.start(APP, "m1", "acme", env, uvicorn_args=logged(tmp_path))
        m2 = machines.start(APP, "m2", "acme", env, ready=False, uvicorn_args=logged(tmp_path))
        # The tenant is in use until the standby follows it.
        deadline = time.monotonic() + 20
        while "standing by" not in m2.log():
            assert time.monotonic() < deadline, m2.log()
            assert httpx.get(f"{m1.url}/customers/acme", timeout=10).status_code == 200
            time.sleep(0.2)
        assert m1.proc.wait(20) == 0, m1.log()
        assert m2.proc.wait(20) == 0, m2.log()
        assert "the holder stopped for idleness; this standby stops too" in m2.log()
        lock = asyncio.run(read_lock(tmp_path))
        # Never taken over: the generation is still the holder's first.
        assert (lock["owner"], lock["released"], lock["generation"]) == (None, "idle", 1)


def test_a_standby_started_on_an_idle_release_takes_the_lease(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    # The idle release stops the standbys that were following; a machine started later was
    # started by a request (autostart), so it serves.
    env = machine_env(tmp_path, subprocess_env, TENANTDB_IDLE_STOP="1")
    with MachineProcesses(tmp_path) as machines:
        m1 = machines.start(APP, "m1", "acme", env, uvicorn_args=logged(tmp_path))
        assert httpx.get(f"{m1.url}/customers/acme", timeout=10).json()["count"] == 1
        assert m1.proc.wait(20) == 0, m1.log()
        m2 = machines.start(APP, "m2", "acme", {**env, "TENANTDB_IDLE_STOP": "0"})
        assert httpx.get(f"{m2.url}/customers/acme", timeout=10).json()["count"] == 2
        lock = asyncio.run(read_lock(tmp_path))
        assert (lock["owner"], lock["released"], lock["generation"]) == ("m2", None, 2)


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "tenant": "acme",
        "machine_id": "m1",
        "data_dir": tmp_path / "m1",
        "local_bucket_dir": tmp_path / "bucket",
        "lease_ttl": 3,
        "checkpoint_interval": 0,
        "metrics_port": 0,
        "idle_stop": 1,
        **overrides,
    }
    return Settings(**values)


async def test_a_request_in_flight_or_just_ended_keeps_the_holder_from_idling(
    tmp_path: Path,
) -> None:
    tdb = TenantDB(settings(tmp_path), migrations=MIGRATIONS)
    await tdb.start(standby=False)
    try:
        with tdb.request():
            await asyncio.sleep(1.5)  # longer than the idle time, but a request runs
            assert tdb.idle_for() == 0
        await asyncio.sleep(0.5)
        with tdb.request():
            pass
        began = time.monotonic()
        await asyncio.wait_for(tdb.idle(), 5)
        # The idle time counts from the end of the last request.
        assert time.monotonic() - began >= 0.9
    finally:
        await tdb.stop()
    assert (await read_lock(tmp_path))["released"] == "idle"


async def test_a_stop_while_the_tenant_is_in_use_is_a_plain_release(tmp_path: Path) -> None:
    # A deploy or `fly machine stop` of a busy tenant is a handoff: the standby takes over.
    tdb = TenantDB(settings(tmp_path, idle_stop=300), migrations=MIGRATIONS)
    await tdb.start(standby=False)
    with tdb.request():
        pass
    await tdb.stop()
    lock = await read_lock(tmp_path)
    assert (lock["owner"], lock["released"]) == (None, None)


async def test_idle_stop_0_never_idles(tmp_path: Path) -> None:
    tdb = TenantDB(settings(tmp_path, idle_stop=0), migrations=MIGRATIONS)
    await tdb.start(standby=False)
    try:
        await asyncio.sleep(1.2)
        assert not tdb._idle.is_set()
    finally:
        await tdb.stop()
    assert (await read_lock(tmp_path))["released"] is None


async def test_an_idle_holder_renews_once_per_third_of_its_ttl_and_asks_nothing_else(
    tmp_path: Path,
) -> None:
    metrics = Metrics()
    bucket = MeteredBucket(LocalBucket(tmp_path / "bucket"), metrics, tenant="acme")
    tdb = TenantDB(
        settings(tmp_path, idle_stop=0, sync_interval=0.05),
        migrations=MIGRATIONS,
        bucket=bucket,
        metrics=metrics,
    )
    async with bucket:
        await tdb.start(standby=False)
        try:
            await asyncio.sleep(1.5)  # past the start's own writes
            before = requests(metrics)
            await asyncio.sleep(4)  # 4 renewals at most, one per TTL/3 (1 s)
            after = requests(metrics)
        finally:
            await tdb.stop()
    made = {kind: after[kind] - before[kind] for kind in after}
    assert 3 <= made["A"] <= 5, made  # renewals, each a CAS of lock.json
    assert (made["B"], made["free"]) == (0, 0), made  # no read, list or delete while idle


def requests(metrics: Metrics) -> dict[str, float]:
    return {
        kind: metrics.registry.get_sample_value(
            "tenantdb_bucket_requests_total", {"tenant": "acme", "class": kind}
        )
        or 0.0
        for kind in ("A", "B", "free")
    }


async def test_a_machine_woken_after_an_idle_stop_uploads_no_new_snapshot(
    tmp_path: Path,
) -> None:
    # Waking is frequent for a tenant used now and then: the local file is checked against
    # lock.json instead of being published again whole.
    for wake in range(2):
        tdb = TenantDB(settings(tmp_path, sync_interval=0.05), migrations=MIGRATIONS)
        await tdb.start(standby=False)
        try:
            with tdb.request():
                async with tdb.connection() as db:
                    await db.execute("INSERT INTO hits DEFAULT VALUES")
                    await db.commit()
            await tdb.sync()
            await asyncio.wait_for(tdb.idle(), 5)
        finally:
            await tdb.stop()
        lock = await read_lock(tmp_path)
        assert lock["released"] == "idle"
        if wake == 0:
            first = lock["snapshot"]
    assert lock["generation"] == 2
    assert lock["snapshot"] == first  # no snapshot published by the second holding
    async with LocalBucket(tmp_path / "bucket") as bucket:
        assert [o.key for o in await bucket.list("tenants/acme/snapshots/")] == (
            [first["key"]] if first else []
        )


async def test_a_standby_with_idle_stop_0_takes_over_an_idle_release(tmp_path: Path) -> None:
    holder = TenantDB(settings(tmp_path), migrations=MIGRATIONS)
    standby = TenantDB(
        settings(
            tmp_path, machine_id="m2", data_dir=tmp_path / "m2", idle_stop=0, follow_interval=0.1
        ),
        migrations=MIGRATIONS,
    )
    await holder.start(standby=False)
    await standby.start(standby=True)
    try:
        assert standby.state == "standby"
        await asyncio.wait_for(holder.idle(), 5)
        await holder.stop()
        assert await standby.wait_serving(10)  # "never idle" here: it takes the tenant
        assert not standby._idle.is_set()
    finally:
        await standby.stop()
