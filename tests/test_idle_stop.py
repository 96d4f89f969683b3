"""Idle stop: a tenant nobody uses releases its lease as "idle" and its server exits 0.

Real uvicorn processes (for the exit code) on the embedded local bucket, real SQLite files;
the idle time is a second or two so that each test stays short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tenantdb.config import Settings
from tenantdb.machine.database import TenantDB
from tenantdb.metrics import Metrics
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.replication.checksum import PageHashes
from tenantdb.replication.restore import restore_database
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
        await hold_once(tmp_path)
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


async def hold_once(tmp_path: Path, **overrides: Any) -> None:
    """One holding of acme by m1: a write, then an idle stop."""
    tdb = TenantDB(settings(tmp_path, sync_interval=0.05, **overrides), migrations=MIGRATIONS)
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


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose every page is hashed from now on."""
    files: list[Path] = []
    real = PageHashes.of_file

    def counting(path: Path, page_size: int) -> PageHashes:
        files.append(Path(path))
        return real(path, page_size)

    monkeypatch.setattr(PageHashes, "of_file", staticmethod(counting))
    return files


async def test_a_wake_after_an_idle_stop_takes_the_kept_page_hashes_and_reads_no_page(
    tmp_path: Path, hashed: list[Path]
) -> None:
    # Hashing every page was most of a wake's time at 256 MiB: the clean stop keeps them.
    await hold_once(tmp_path)
    first = (await read_lock(tmp_path))["snapshot"]
    db = tmp_path / "m1" / "acme.sqlite3"
    await hold_once(tmp_path)
    assert db not in hashed
    lock = await read_lock(tmp_path)
    assert (lock["generation"], lock["released"]) == (2, "idle")
    assert lock["snapshot"] == first  # the kept hashes were the bucket's: no new snapshot
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM hits").fetchone() == (2,)


def touch(db: Path) -> None:
    st = db.stat()
    os.utime(db, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def damage_sidecar(db: Path) -> None:
    sidecar = Path(f"{db}.tenantdb-pages")
    data = bytearray(sidecar.read_bytes())
    data[-40] ^= 1  # a page's hash: the checksum finds it
    sidecar.write_bytes(bytes(data))


def truncate_sidecar(db: Path) -> None:
    sidecar = Path(f"{db}.tenantdb-pages")
    sidecar.write_bytes(sidecar.read_bytes()[:-9])


@pytest.mark.parametrize("change", [touch, damage_sidecar, truncate_sidecar])
async def test_a_file_touched_or_a_damaged_sidecar_is_hashed_and_still_matches(
    tmp_path: Path, hashed: list[Path], change: Callable[[Path], None]
) -> None:
    await hold_once(tmp_path)
    first = (await read_lock(tmp_path))["snapshot"]
    db = tmp_path / "m1" / "acme.sqlite3"
    change(db)
    await hold_once(tmp_path)
    assert hashed.count(db) == 1  # nothing vouched for the file: every page was read
    assert (await read_lock(tmp_path))["snapshot"] == first  # and it was the bucket's


async def test_a_file_written_after_its_idle_stop_is_hashed_and_published_as_newer(
    tmp_path: Path, hashed: list[Path]
) -> None:
    # Another process wrote the file after the stop (same inode): its kept hashes are not
    # the file's, which is hashed, found newer than the bucket and published whole.
    await hold_once(tmp_path)
    first = (await read_lock(tmp_path))["snapshot"]
    db = tmp_path / "m1" / "acme.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("INSERT INTO hits DEFAULT VALUES")
        conn.commit()
    await hold_once(tmp_path)
    assert hashed.count(db) == 1
    lock = await read_lock(tmp_path)
    assert lock["snapshot"] != first  # published whole, as a file newer than the bucket is
    restored = tmp_path / "restored.sqlite3"
    async with LocalBucket(tmp_path / "bucket") as bucket:
        key = "tenants/acme/lock.json"
        record = LockRecord.parse((await bucket.get(key)).body, tenant="acme", key=key)
        await restore_database(bucket, record, restored, prefix="tenants/")
    with contextlib.closing(sqlite3.connect(restored)) as conn:
        assert conn.execute("SELECT count(*) FROM hits").fetchone() == (3,)


async def test_a_file_closed_with_unshipped_commits_keeps_no_page_hashes(tmp_path: Path) -> None:
    # Closed without a final publish (as after a failure): the file is newer than what
    # the shipper published, so nothing may vouch for it.
    tdb = TenantDB(
        settings(tmp_path, durability="async", sync_interval=3600), migrations=MIGRATIONS
    )
    await tdb.start(standby=False)
    async with tdb.connection() as db:
        await db.execute("INSERT INTO hits DEFAULT VALUES")
        await db.commit()
    await tdb._close_resources()
    db_path = tmp_path / "m1" / "acme.sqlite3"
    assert not Path(f"{db_path}-wal").exists()  # folded in: only the hashes could be wrong
    assert not Path(f"{db_path}.tenantdb-pages").exists()
