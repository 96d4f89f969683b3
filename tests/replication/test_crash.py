"""SIGKILL of real holder processes under a stream of writes, then takeovers.

Every increment a worker acknowledged more than one sync interval plus one upload before
it was killed must be in the bucket: the machine that takes over restores exactly a
committed prefix of the history (never a row that was not committed, never fewer than
what was shipped). Runs on both bucket backends, several crash/takeover rounds in a row.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.workers import Worker

TTL = 3
SYNC_INTERVAL = 0.2
# Time for one segment upload and the lock.json CAS on this machine, with margin.
UPLOAD_BOUND = 1.0

StartWorker = Callable[[str], Worker]


@pytest.fixture(params=["local", "s3"])
def start_worker(
    request: pytest.FixtureRequest, tmp_path: Path, subprocess_env: dict[str, str]
) -> Iterator[StartWorker]:
    if request.param == "s3":
        backend = request.getfixturevalue("s3_settings_env")
    else:
        backend = {"TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket")}
    workers: list[Worker] = []

    def start(machine: str) -> Worker:
        env = {
            **subprocess_env,
            **backend,
            "TENANT_ID": "acme",
            "FLY_MACHINE_ID": machine,
            "TENANTDB_DATA_DIR": str(tmp_path / f"{machine}-{len(workers)}"),
            "TENANTDB_LEASE_TTL": str(TTL),
            "TENANTDB_CHECKPOINT_INTERVAL": "0",
            "TENANTDB_SYNC_INTERVAL": str(SYNC_INTERVAL),
        }
        worker = Worker(env, log_path=tmp_path / f"{machine}-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


def serving(worker: Worker) -> None:
    event = worker.wait_for(lambda e: e.get("state") in ("serving", "failed"), timeout=TTL * 3 + 10)
    assert event["state"] == "serving", event


def test_killed_holders_lose_at_most_one_sync_interval_and_never_invent_rows(
    start_worker: StartWorker,
) -> None:
    rng = random.Random(20261129)
    holder = start_worker("m0")
    serving(holder)
    acknowledged = 0
    for round_number in range(3):
        acked_at: list[tuple[float, int]] = []
        deadline = time.monotonic() + rng.uniform(1.0, 2.0)
        while time.monotonic() < deadline:
            answer = holder.command(f"inc {rng.randint(1, 5)}")
            acknowledged = answer["count"]
            acked_at.append((time.monotonic(), acknowledged))
        holder.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        # Everything acknowledged this long before the kill was shipped.
        shipped = max(
            [count for at, count in acked_at if at < killed_at - SYNC_INTERVAL - UPLOAD_BOUND],
            default=0,
        )
        holder = start_worker(f"m{round_number + 1}")
        serving(holder)
        restored = holder.command("count")["count"]
        assert shipped <= restored <= acknowledged, (round_number, shipped, restored)
        lost = acknowledged - restored
        print(
            f"round {round_number}: acknowledged {acknowledged}, restored {restored}, lost {lost}"
        )
        acknowledged = restored  # the new history goes on from what the bucket had
    holder.stop()
