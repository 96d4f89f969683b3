"""The lease across real processes: contention, crashes and a paused zombie holder."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Settings
from tenantdb.storage import open_bucket
from tests.support.workers import Worker

TTL = 3
LONG_TTL = 10

StartWorker = Callable[[str], Worker]


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
        "TENANTDB_LEASE_TTL": str(TTL),
        "TENANTDB_CHECKPOINT_INTERVAL": "0",
    }


@pytest.fixture
def start_worker(tmp_path: Path, bucket_env: dict[str, str]) -> Iterator[StartWorker]:
    workers: list[Worker] = []

    def start(machine: str) -> Worker:
        env = {
            **bucket_env,
            "FLY_MACHINE_ID": machine,
            "TENANTDB_DATA_DIR": str(tmp_path / machine),
        }
        worker = Worker(env, log_path=tmp_path / f"{machine}-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


def read_bucket(env: dict[str, str], key: str) -> bytes:
    async def read() -> bytes:
        async with open_bucket(Settings.from_env(env)) as bucket:
            return (await bucket.get(key)).body

    return asyncio.run(read())


def lock(env: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(read_bucket(env, "tenants/acme/lock.json"))
    return result


def settled(worker: Worker) -> dict[str, Any]:
    return worker.wait_for(lambda e: e.get("state") in ("serving", "standby", "failed"))


def test_one_of_eight_racing_machines_holds_and_a_waiter_takes_over_on_release(
    start_worker: StartWorker, bucket_env: dict[str, str]
) -> None:
    workers = [start_worker(f"m{i}") for i in range(8)]
    first = {id(w): settled(w) for w in workers}
    holders = [w for w in workers if first[id(w)]["state"] == "serving"]
    assert len(holders) == 1
    holder = holders[0]
    holder_id = lock(bucket_env)["owner"]
    for worker in workers:
        if worker is not holder:
            assert first[id(worker)] == {"state": "standby", "generation": None, "owner": holder_id}

    holder.stop()
    waiters = [w for w in workers if w is not holder]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        serving = [w for w in waiters if w.state == "serving"]
        if serving:
            break
        time.sleep(0.05)
    time.sleep(1.5)  # give a wrongly second taker the chance to show itself
    serving = [w for w in waiters if w.state == "serving"]
    assert len(serving) == 1
    record = lock(bucket_env)
    assert record["generation"] == 2
    assert record["last_owner"] == holder_id


def test_a_crashed_holder_is_replaced_at_once_by_its_own_machine_id(
    start_worker: StartWorker, bucket_env: dict[str, str]
) -> None:
    # A TTL far above a process's start on a loaded machine (seconds, in a parallel run):
    # waiting for the lease to expire then stands out from a slow start.
    bucket_env["TENANTDB_LEASE_TTL"] = str(LONG_TTL)
    crashed = start_worker("m1")
    assert settled(crashed)["state"] == "serving"
    assert crashed.command("inc 10")["count"] == 10
    assert crashed.command("checkpoint")["published"] is True
    crashed.kill()
    started = time.monotonic()
    restarted = start_worker("m1")
    event = settled(restarted)
    assert event["state"] == "serving"
    assert event["generation"] == 2
    assert time.monotonic() - started < LONG_TTL  # no wait for the lease to expire
    assert restarted.command("count")["count"] == 10


@pytest.mark.long
def test_another_machine_takes_over_a_crashed_holder_only_after_the_ttl(
    start_worker: StartWorker, bucket_env: dict[str, str]
) -> None:
    # A TTL far above a process's start: the standby must see the lease still held.
    bucket_env["TENANTDB_LEASE_TTL"] = str(LONG_TTL)
    crashed = start_worker("m1")
    assert settled(crashed)["state"] == "serving"
    crashed.command("inc 3")
    crashed.command("checkpoint")
    crashed.kill()
    killed_at = time.monotonic()
    other = start_worker("m2")
    assert settled(other) == {"state": "standby", "generation": None, "owner": "m1"}
    serving = other.wait_for(lambda e: e.get("state") == "serving", timeout=LONG_TTL + 10)
    assert time.monotonic() - killed_at >= LONG_TTL - 1.5  # renewed ttl/3 before the kill
    assert serving["generation"] == 2
    assert other.command("count")["count"] == 3
    assert lock(bucket_env)["owner"] == "m2"


def test_a_paused_zombie_is_fenced_and_never_clobbers_the_new_holders_data(
    start_worker: StartWorker, bucket_env: dict[str, str]
) -> None:
    zombie = start_worker("m1")
    assert settled(zombie)["state"] == "serving"
    zombie.command("inc 5")
    assert zombie.command("checkpoint")["published"] is True
    zombie.kill(signal.SIGSTOP)

    successor = start_worker("m2")
    successor.wait_for(lambda e: e.get("state") == "serving", timeout=TTL + 10)
    assert successor.command("inc 7")["count"] == 12
    assert successor.command("checkpoint")["published"] is True
    record = lock(bucket_env)
    snapshot_bytes = read_bucket(bucket_env, record["snapshot"]["key"])

    zombie.kill(signal.SIGCONT)
    answer = zombie.command("publish")
    assert answer.get("published") is not True
    zombie.wait_for(lambda e: e.get("state") in ("fenced", "standby"))
    assert "error" in zombie.command("inc 1")  # no local writes accepted either

    after = lock(bucket_env)
    assert (after["owner"], after["generation"]) == ("m2", 2)
    assert after["snapshot"] == record["snapshot"]
    assert read_bucket(bucket_env, after["snapshot"]["key"]) == snapshot_bytes
    assert successor.command("count")["count"] == 12


def write_bucket(env: dict[str, str], key: str, body: bytes) -> None:
    async def write() -> None:
        async with open_bucket(Settings.from_env(env)) as bucket:
            await bucket.put(key, body)

    asyncio.run(write())


def test_a_forged_takeover_record_at_the_next_generation_does_not_stop_the_next_holder(
    start_worker: StartWorker, bucket_env: dict[str, str]
) -> None:
    first = start_worker("m1")
    assert settled(first)["state"] == "serving"
    assert first.command("inc 5")["count"] == 5
    first.stop()
    # At the generation the next holder takes: before, its start failed on it, every time.
    forged = {
        "generation": 2,
        "owner": "forged",
        "region": "ams",
        "at": "2026-12-01T10:00:00.000+00:00",
        "tail": 10**12,
        "snapshot": None,
        "claim": "forged",
    }
    write_bucket(bucket_env, "tenants/acme/history/00000002.json", json.dumps(forged).encode())
    second = start_worker("m2")
    event = settled(second)
    assert (event["state"], event.get("generation")) == ("serving", 3), event
    assert second.command("inc 1")["count"] == 6
    record = json.loads(read_bucket(bucket_env, "tenants/acme/history/00000003.json"))
    assert (record["generation"], record["replaces"]) == (3, 2)
