"""A warm standby in its own process: it follows the holder's log and takes over with the tail.

Real processes (``tests/support/tenant_worker.py``) on both bucket backends: the holder is
SIGKILLed or stopped gracefully, and the standby must serve in time with every segment the
holder shipped, having downloaded the database once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Settings
from tenantdb.errors import TransientStorageError
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.storage import Bucket, open_bucket
from tenantdb.storage.base import SmallObject
from tests.support.workers import Worker

TTL = 3

StartWorker = Callable[..., Worker]


@pytest.fixture(params=["local", "s3"])
def bucket_env(
    request: pytest.FixtureRequest, tmp_path: Path, subprocess_env: dict[str, str]
) -> dict[str, str]:
    if request.param == "s3":
        backend = request.getfixturevalue("s3_settings_env")
    else:
        backend = {"TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket")}
    return {
        **subprocess_env,
        **backend,
        "TENANT_ID": "acme",
        "TENANTDB_CHECKPOINT_INTERVAL": "0",
        "TENANTDB_SYNC_INTERVAL": "0.2",
    }


@pytest.fixture
def start_worker(tmp_path: Path, bucket_env: dict[str, str]) -> Iterator[StartWorker]:
    workers: list[Worker] = []

    def start(machine: str, ttl: float = TTL) -> Worker:
        env = {
            **bucket_env,
            "FLY_MACHINE_ID": machine,
            "TENANTDB_DATA_DIR": str(tmp_path / machine),
            "TENANTDB_LEASE_TTL": str(ttl),
        }
        worker = Worker(env, log_path=tmp_path / f"{machine}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


def lock_record(env: dict[str, str]) -> LockRecord:
    async def read() -> bytes:
        async with open_bucket(Settings.from_env(env)) as bucket:
            return (await bucket.get("tenants/acme/lock.json")).body

    return LockRecord.parse(asyncio.run(read()), tenant="acme", key="lock.json")


def wait_state(worker: Worker, state: str, timeout: float = 30) -> None:
    worker.wait_for(lambda e: e.get("state") == state, timeout=timeout)


def write_for(worker: Worker, seconds: float) -> int:
    """Increments for ``seconds``, then a sync: the count the bucket now has."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        worker.command("inc 7")
    assert "error" not in worker.command("sync")
    return int(worker.command("count")["count"])


@pytest.mark.long
def test_a_warm_standby_serves_within_ttl_plus_2s_of_a_kill_with_every_shipped_segment(
    start_worker: StartWorker, bucket_env: dict[str, str]
) -> None:
    holder = start_worker("m0")
    wait_state(holder, "serving")
    assert "error" not in holder.command("inc 50")
    standby = start_worker("m1")
    wait_state(standby, "standby")
    shipped = write_for(holder, 2.0)
    named = lock_record(bucket_env)
    assert named.log is not None
    assert named.log.tail >= 5, "the holder shipped too few segments to follow"
    holder.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_state(standby, "serving", timeout=TTL + 10)
    took = time.monotonic() - killed_at
    print(f"takeover after SIGKILL: {took:.2f}s (TTL {TTL}s)")
    assert took <= TTL + 2
    assert standby.command("count")["count"] == shipped
    after = lock_record(bucket_env)
    assert after.generation == named.generation + 1
    assert after.log is not None
    assert after.log.state == named.log.state  # nothing lost, nothing invented
    log = standby.log_path.read_text()
    # The copy was downloaded once, when standing by, and only the tail applied since.
    match = re.search(
        r"took over with the standby's copy \((\d+) log objects applied while "
        r"following, (\d+) restore\(s\)\)",
        log,
    )
    assert match, log[-3000:]
    assert int(match.group(2)) == 1


@pytest.mark.parametrize("bucket_env", ["local"], indirect=True)
def test_a_warm_standby_takes_the_lease_as_soon_as_the_holder_releases_it(
    start_worker: StartWorker,
) -> None:
    """With a 15 s lease, a graceful stop hands over in well under a second of polling."""
    holder = start_worker("m0", ttl=15)
    wait_state(holder, "serving")
    standby = start_worker("m1", ttl=15)
    wait_state(standby, "standby")
    shipped = write_for(holder, 1.0)
    stopped_at = time.monotonic()
    holder.stop()
    wait_state(standby, "serving", timeout=20)
    took = time.monotonic() - stopped_at
    print(f"takeover after a graceful stop: {took:.2f}s")
    assert took < 2.5
    assert standby.command("count")["count"] == shipped


class LockReadsFail:
    """A bucket whose reads of lock.json fail while ``failing`` is set."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _check(self, key: str) -> None:
        if self.failing and key.endswith("lock.json"):
            raise TransientStorageError("503 SlowDown (injected)", key=key, operation="get")

    async def get(self, key: str, **options: Any) -> SmallObject:
        self._check(key)
        return await self.inner.get(key, **options)

    async def get_if_changed(self, key: str, etag: str, **options: Any) -> SmallObject | None:
        self._check(key)
        return await self.inner.get_if_changed(key, etag, **options)


async def test_a_holder_fenced_into_standby_keeps_its_unpublished_writes(
    tmp_path: Path, local_bucket: Bucket
) -> None:
    """A holder that steps down while lock.json cannot be read stands by, with writes the
    bucket does not have in its file. The lease is still its own: the standby takes it
    back without following (a follower would overwrite the file with the bucket's data)."""
    bucket = LockReadsFail(local_bucket)
    settings = Settings(
        tenant="acme",
        machine_id="m1",
        data_dir=tmp_path / "m1",
        lease_ttl=3,
        checkpoint_interval=0,
        sync_interval=3600,
    )
    migrations = ["CREATE TABLE hits (id INTEGER PRIMARY KEY)"]
    tdb = TenantDB(settings, migrations=migrations, bucket=bucket)  # type: ignore[arg-type]
    await tdb.start()
    try:
        async with tdb.connection() as db:
            await db.executemany("INSERT INTO hits DEFAULT VALUES", [()] * 5)
            await db.commit()
        await tdb.sync()
        async with tdb.connection() as db:
            await db.executemany("INSERT INTO hits DEFAULT VALUES", [()] * 3)  # not shipped
            await db.commit()
        bucket.failing = True
        tdb.lease.step_down("renewals failed (injected)")
        await poll(lambda: tdb.state == "standby")
        bucket.failing = False
        await poll(lambda: tdb.state == "serving")
        async with tdb.connection() as db, db.execute("SELECT count(*) FROM hits") as cursor:
            row = await cursor.fetchone()
        assert row == (8,)
    finally:
        await tdb.stop()


async def poll(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_standby_that_cannot_read_lock_json_says_so_once_not_at_every_poll(
    tmp_path: Path, local_bucket: Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    def machine(name: str, bucket: Any) -> TenantDB:
        settings = Settings(
            tenant="acme",
            machine_id=name,
            data_dir=tmp_path / name,
            lease_ttl=30,
            follow_interval=0.02,
        )
        return TenantDB(settings, bucket=bucket)

    caplog.set_level(logging.INFO, logger="tenantdb")
    unreadable = LockReadsFail(local_bucket)
    async with machine("m1", local_bucket):
        standby = machine("m2", unreadable)
        await standby.start()
        try:
            assert standby.state == "standby"
            unreadable.failing = True
            polls = 0
            while polls < 20:  # twenty failed polls at least
                await asyncio.sleep(0.02)
                polls += 1
            unreadable.failing = False
            await poll(lambda: "standby reads lock.json again" in caplog.text)
        finally:
            await standby.stop()
    warnings = caplog.text.count("standby could not read lock.json")
    assert warnings == 1, caplog.text
