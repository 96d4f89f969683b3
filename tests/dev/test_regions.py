"""`tenantdb dev` across regions, with real machine processes: requests enter in a region,
replica reads stay there, a hop to another region pays the injected latency, and tail hints
cross the emulated private network."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tenantdb.dev.cluster import Cluster, ClusterConfig
from tenantdb.dev.regions import EDGE_REGION_HEADER, RegionLatency
from tenantdb.dev.routes import RouteRecord

pytestmark = pytest.mark.usefixtures("clean_environment")

LATENCY = 0.25  # seconds each way between ams and fra
JSON = {"accept": "application/json"}


def config(tmp_path: Path, **env: str) -> ClusterConfig:
    return ClusterConfig(
        port=0,
        state_dir=tmp_path / "state",
        tenants=("100",),
        machines_per_tenant=2,
        regions=("ams", "fra"),
        latency=RegionLatency(LATENCY),
        kill_timeout=10,
        env={"TENANTDB_REPLICA_READS": "1", **env},
    )


def entering(region: str, **headers: str) -> dict[str, str]:
    return {**JSON, EDGE_REGION_HEADER: region, **headers}


async def timed(
    client: httpx.AsyncClient, method: str, **options: Any
) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    response = await client.request(method, "/customers/100", **options)
    return response, time.monotonic() - began


async def route_of(cluster: Cluster, response: httpx.Response) -> RouteRecord:
    """The proxy's record of the request ``response`` answers: the proxy notes it once its
    answer is sent, so it may come a moment after the client has the answer."""
    request_id = response.headers["fly-request-id"]
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in cluster.proxy.routes if r.request_id == request_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no route recorded for {request_id}"
        await asyncio.sleep(0.01)


async def holder_and_replica(
    cluster: Cluster, client: httpx.AsyncClient
) -> tuple[str, str, dict[str, str]]:
    """The holder's id, the replica's, and each machine's region (as the dashboard shows)."""
    deadline = time.monotonic() + 10
    while True:
        machines = (await client.get("/_dev/state")).json()["machines"]
        holders = [m["id"] for m in machines if m["lease"] == "holder"]
        if holders:
            break
        assert time.monotonic() < deadline, machines
        await asyncio.sleep(0.1)
    regions = {m["id"]: m["region"] for m in machines}
    (holder,) = holders
    (replica,) = set(regions) - {holder}
    return holder, replica, regions


async def test_a_read_entering_in_the_replicas_region_stays_there_and_a_write_pays_the_crossing(
    tmp_path: Path,
) -> None:
    async with (
        Cluster(config(tmp_path)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=20) as client,
    ):
        holder, replica, regions = await holder_and_replica(cluster, client)
        assert sorted(regions.values()) == ["ams", "fra"]
        first = await client.get("/customers/100", headers=entering(regions[holder]))
        assert first.status_code == 200, first.text
        near = entering(regions[replica])
        # The replica serves reads once its copy is current (it follows the log).
        deadline = time.monotonic() + 10
        while True:
            read, took = await timed(client, "HEAD", headers=near)
            if read.headers.get("tenantdb-served-by") == replica:
                break
            assert time.monotonic() < deadline, read.headers
            await asyncio.sleep(0.1)
        read, took = await timed(client, "HEAD", headers=near)
        assert read.status_code == 200
        assert read.headers["tenantdb-served-by"] == replica
        assert took < 2 * LATENCY, f"a read in the replica's own region took {took:.3f}s"
        # Machines see Fly's Fly-Region request header, never the dev-only one.
        route = await route_of(cluster, read)
        assert route.edge == regions[replica]
        assert [(s.machine_id, s.kind) for s in route.steps] == [(replica, "direct")]

        # A write entering there reaches the replica, which replays it to the holder in the
        # other region: the request goes there and its answer comes back.
        write, took = await timed(client, "GET", headers=near)
        assert write.status_code == 200, write.text
        assert write.json()["machine_id"] == holder
        assert took >= 2 * LATENCY, f"a replay to another region took only {took:.3f}s"
        route = await route_of(cluster, write)
        assert [(s.machine_id, s.kind) for s in route.steps] == [
            (replica, "direct"),
            (holder, "replayed"),
        ]
        # A read entering in the holder's region is answered there, without the crossing.
        read, took = await timed(client, "HEAD", headers=entering(regions[holder]))
        assert read.status_code == 200
        assert took < 2 * LATENCY, f"a read in the holder's own region took {took:.3f}s"


async def test_each_tenants_machine_in_the_first_region_holds_it(tmp_path: Path) -> None:
    # Three machines a tenant (ams, fra, ams), those in ams slow to start: started together,
    # the one in fra would win the lease; the first, in the first region, must.
    tenants = ("100", "200")
    setup = dataclasses.replace(
        config(tmp_path, LATE_REGION="ams", LATE_SECONDS="1.5"),
        tenants=tenants,
        machines_per_tenant=3,
        app_module="tests.support.late_app:app",
    )
    async with (
        Cluster(setup) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=20) as client,
    ):
        firsts = {cluster.machine_ids(tenant)[0]: "ams" for tenant in tenants}
        deadline = time.monotonic() + 10
        while True:
            machines = (await client.get("/_dev/state")).json()["machines"]
            holders = {m["id"]: m["region"] for m in machines if m["lease"] == "holder"}
            if len(holders) == len(tenants):
                break
            assert time.monotonic() < deadline, machines
            await asyncio.sleep(0.1)
        assert holders == firsts, machines


async def test_an_unknown_edge_region_is_refused(tmp_path: Path) -> None:
    async with (
        Cluster(config(tmp_path)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=20) as client,
    ):
        answer = await client.get("/customers/100", headers=entering("Not A Region"))
        assert answer.status_code == 400
        assert EDGE_REGION_HEADER in answer.text


async def test_tail_hints_bring_a_write_to_the_replica_without_waiting_for_its_poll(
    tmp_path: Path,
) -> None:
    # The standby reads lock.json every 30 s on its own: only a hint brings a write sooner.
    slow_poll = {
        "TENANTDB_FOLLOW_INTERVAL": "30",
        "TENANTDB_MAX_REPLICA_LAG": "60",
    }
    async with (
        Cluster(config(tmp_path, **slow_poll)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=20) as client,
    ):
        holder, replica, regions = await holder_and_replica(cluster, client)

        async def replica_reaches(bookmark: str, within: float, **headers: str) -> httpx.Response:
            """Read through the replica until its answer says its copy reached ``bookmark``."""
            deadline = time.monotonic() + within
            while True:
                client.cookies.clear()
                read = await client.head(
                    "/customers/100", headers=entering(regions[replica], **headers)
                )
                if read.headers.get("tenantdb-bookmark") == bookmark:
                    return read
                assert time.monotonic() < deadline, f"the replica is still at {read.headers}"
                await asyncio.sleep(0.05)

        first = await client.get("/customers/100", headers=entering(regions[holder]))
        assert first.status_code == 200, first.text
        # Warming up, the bookmark makes the replica read lock.json at once (the first write
        # may predate its first look at the holder). Later reads carry none, so only the
        # holder's hints (or a poll 30 s later) bring the replica the writes.
        written = first.headers["tenantdb-bookmark"]
        await replica_reaches(written, within=10, **{"tenantdb-bookmark": written})
        for _ in range(2):
            write = await client.get("/customers/100", headers=entering(regions[holder]))
            assert write.status_code == 200, write.text
            read = await replica_reaches(write.headers["tenantdb-bookmark"], within=3)
            assert read.status_code == 200
            assert read.headers["tenantdb-served-by"] == replica
