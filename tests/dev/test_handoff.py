"""Graceful handoff in `tenantdb dev`: the holder is stopped under load, a warm standby follows.

Writers go through the emulated Fly Proxy the whole time. When the holder is stopped
(SIGINT, as Fly stops machines), the proxy stops sending it requests at once (PM08 for a
replay to it) while it still ships its last writes and releases the lease: the standby
holds the requests the holder cannot take until it serves. No request may fail, and no
acknowledged increment may be lost (each 200 carries the count its increment made, so a
lost one would make the new holder hand out the same count twice).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tenantdb.dev.cluster import Cluster, ClusterConfig

JSON = {"accept": "application/json"}
WRITERS = 4
pytestmark = pytest.mark.usefixtures("clean_environment")


async def test_stopping_the_holder_under_load_fails_no_request_and_loses_no_write(
    tmp_path: Path,
) -> None:
    config = ClusterConfig(
        port=0,
        state_dir=tmp_path / "state",
        tenants=("100",),
        machines_per_tenant=2,
        kill_timeout=10,
        # A lease that outlives the test: the handoff must not wait for an expiry.
        env={"TENANTDB_LEASE_TTL": "60"},
    )
    answers: list[tuple[float, float, int, str, int]] = []  # sent, took, status, machine, count
    async with (
        Cluster(config) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=30) as client,
    ):
        first = await client.get("/customers/100", headers=JSON)
        assert first.status_code == 200, first.text
        holder = first.json()["machine_id"]
        (standby,) = (m for m in cluster.machine_ids("100") if m != holder)
        stop_now = asyncio.Event()
        done = asyncio.Event()

        async def writer() -> None:
            while not done.is_set():
                sent = time.monotonic()
                answer = await client.get("/customers/100", headers=JSON)
                took = time.monotonic() - sent
                body = answer.json() if answer.status_code == 200 else {}
                answers.append(
                    (
                        sent,
                        took,
                        answer.status_code,
                        body.get("machine_id", answer.text),
                        body.get("count", 0),
                    )
                )
                if len(answers) >= 100:
                    stop_now.set()

        writers = [asyncio.create_task(writer()) for _ in range(WRITERS)]
        await stop_now.wait()
        stopped_at = time.monotonic()
        await cluster.stop_machine(holder)
        # Keep writing until the standby has answered a good number of requests itself.
        deadline = time.monotonic() + 20
        while sum(1 for a in answers if a[3] == standby) < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        done.set()
        await asyncio.gather(*writers)
        final = await client.get("/customers/100", headers=JSON)
    failed = [a for a in answers if a[2] != 200]
    assert not failed, failed[:5]
    counts = [a[4] for a in answers]
    assert len(set(counts)) == len(counts), "an acknowledged increment was lost"
    assert final.json()["machine_id"] == standby
    assert final.json()["count"] == max(counts) + 1
    during = [a[1] for a in answers if a[0] + a[1] >= stopped_at]
    print(
        f"{len(answers)} requests, none failed; longest during the handoff {max(during):.2f}s; "
        f"{sum(1 for a in answers if a[3] == holder)} by the holder, "
        f"{sum(1 for a in answers if a[3] == standby)} by the standby"
    )
