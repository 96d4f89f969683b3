"""Takeover: a warm standby vs a cold machine after the holder is SIGKILLed; handoff stalls.

A tenant database of ``--size-mib`` MiB (random rows) is published to moto's S3 server (in
its own process) as the tenant's snapshot. Machines are uvicorn processes serving
``example_app:app`` with a ``--ttl`` second lease. Each round:

- warm: a holder serves and writes; a second machine stands by, restores the tenant once
  and follows the holder's log. The holder is SIGKILLed: the figure is the time from the
  kill to the first 200 from the standby (it waits out the lease, then applies the tail).
- cold: that machine, now the holder, is SIGKILLed and a machine with an empty data
  directory starts at the same moment: the time from the kill to its first 200 (it waits
  out the lease too, restoring meanwhile, then opens the tenant).

Then the graceful handoff: ``tenantdb dev``'s cluster (``Cluster``, the emulated Fly Proxy)
runs two machines of a tenant of the same size on the same S3 server, with a 15 s lease;
writers go through the proxy while the holder is stopped (SIGINT); the figure is the longest
time any request took among those in flight during the handoff, and the failed requests.
Run: ``python -m bench.bench_takeover --size-mib 256``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import MiB, S3Server, child_env, fill_database, machine, median
from tenantdb.dev.cluster import Cluster, ClusterConfig
from tenantdb.protocol.lockfile import LockRecord, SnapshotRef, now_iso
from tests.support.servers import UvicornProcess

BUCKET = "bench-takeover"
TENANT = "bench"
HANDOFF_TENANT = "100"
JSON = {"accept": "application/json"}
GOAL_HANDOFF_STALL = 1.0


def seed(s3: S3Server, source: Path, tenant: str, ttl: float, bucket: str = BUCKET) -> None:
    """Publish ``source`` as ``tenant``'s snapshot in ``bucket``, under a released lease."""
    key = f"tenants/{tenant}/snapshots/00000001-00000001-seed.sqlite3"
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    record = LockRecord(
        tenant=tenant,
        owner=None,
        region=None,
        generation=1,
        seq=1,
        ttl_seconds=ttl,
        snapshot=SnapshotRef(key, digest.hexdigest(), source.stat().st_size, now_iso()),
    )
    client = s3.client()
    client.upload_file(str(source), bucket, key)
    client.put_object(Bucket=bucket, Key=f"tenants/{tenant}/lock.json", Body=record.to_json())
    client.close()


class Machines:
    """uvicorn machines of the benchmark tenant, each with its own data directory."""

    def __init__(self, work: Path, env: dict[str, str], ttl: float) -> None:
        self.work = work
        self.env = env
        self.ttl = ttl
        self.count = 0
        self.running: list[UvicornProcess] = []

    def start(self) -> tuple[UvicornProcess, Path]:
        self.count += 1
        name = f"m{self.count:02d}"
        data = self.work / name
        env = {
            **self.env,
            "TENANT_ID": TENANT,
            "FLY_MACHINE_ID": name,
            "TENANTDB_DATA_DIR": str(data),
            "TENANTDB_LEASE_TTL": f"{self.ttl:g}",
            "TENANTDB_METRICS_PORT": "0",
        }
        server = UvicornProcess(
            "example_app:app",
            child_env(env),
            self.work / f"{name}.log",
            uvicorn_args=["--no-access-log"],
            inherit_environ=False,
        )
        self.running.append(server)
        return server, data / f"{TENANT}.sqlite3"

    def close(self) -> None:
        for server in self.running:
            server.close()


def first_200(server: UvicornProcess, timeout: float = 300) -> float:
    """Poll the tenant on ``server`` until it answers 200; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    url = f"{server.url}/customers/{TENANT}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=JSON, timeout=5).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{server.url} did not serve the tenant:\n{server.log()[-3000:]}")


def write(server: UvicornProcess, visits: int) -> None:
    """``visits`` increments on the holder (each one a commit the standby follows)."""
    for _ in range(visits):
        first_200(server)


def wait_for_file(path: Path, timeout: float = 300) -> None:
    """Wait until a standby's restore put the tenant's file in place (an atomic rename)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def settle(s3: S3Server, standby_file: Path, quiet: float = 3.0, timeout: float = 300) -> None:
    """Wait until the lease and the standby's copy stay put for ``quiet`` seconds.

    On this one-threaded S3 server the standby's download can hold up the holder's
    renewals past a short lease: the holder steps down, takes its own lease back and
    publishes a snapshot, which the standby then restores again. Measured takeovers start
    from a standby that is following, not restoring.
    """
    client = s3.client()
    deadline = time.monotonic() + timeout

    def looks() -> tuple[int, str, int]:
        body = client.get_object(Bucket=BUCKET, Key=f"tenants/{TENANT}/lock.json")["Body"].read()
        record = LockRecord.parse(body, tenant=TENANT, key=f"tenants/{TENANT}/lock.json")
        key = record.snapshot.key if record.snapshot else ""
        return record.generation, key, standby_file.stat().st_ino

    try:
        seen, since = looks(), time.monotonic()
        while time.monotonic() - since < quiet:
            if time.monotonic() > deadline:
                raise TimeoutError("the lease or the standby's copy never settled")
            time.sleep(0.2)
            now = looks()
            if now != seen:
                seen, since = now, time.monotonic()
    finally:
        client.close()


def takeover_rounds(
    machines: Machines, s3: S3Server, rounds: int
) -> tuple[list[float], list[float]]:
    """Alternate warm and cold takeovers; their seconds from the kill to the first 200."""
    warm: list[float] = []
    cold: list[float] = []
    holder, _ = machines.start()
    first_200(holder)
    for n in range(1, rounds + 1):
        standby, standby_file = machines.start()
        wait_for_file(standby_file)
        settle(s3, standby_file)
        write(holder, 50)
        time.sleep(1.0)  # the standby's next polls apply the last segments
        holder.proc.kill()
        killed = time.monotonic()
        warm.append(first_200(standby) - killed)
        holder.close()
        standby.proc.kill()
        killed = time.monotonic()
        fresh, _ = machines.start()
        cold.append(first_200(fresh) - killed)
        standby.close()
        holder = fresh
        print(f"round {n}: warm standby {warm[-1]:.2f}s  cold machine {cold[-1]:.2f}s", flush=True)
    return warm, cold


async def handoff(work: Path, env: dict[str, str], writers: int) -> dict[str, Any]:
    """Stop the holder of a two-machine tenant under load; the stalls and failures seen."""
    config = ClusterConfig(
        tenants=(HANDOFF_TENANT,),
        machines_per_tenant=2,
        port=0,
        state_dir=work / "cluster",
        kill_timeout=30,
        env={**env, "TENANTDB_LEASE_TTL": "15", "TENANTDB_METRICS_PORT": "0"},
    )
    answers: list[tuple[float, float, int, str]] = []  # sent, seconds, status, machine
    async with (
        Cluster(config) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=60) as client,
    ):
        path = f"/customers/{HANDOFF_TENANT}"
        first = await client.get(path, headers=JSON)
        first.raise_for_status()
        holder = first.json()["machine_id"]
        (standby,) = (m for m in cluster.machine_ids(HANDOFF_TENANT) if m != holder)
        done = asyncio.Event()

        async def writer() -> None:
            while not done.is_set():
                sent = time.monotonic()
                answer = await client.get(path, headers=JSON)
                took = time.monotonic() - sent
                who = answer.json()["machine_id"] if answer.status_code == 200 else ""
                answers.append((sent, took, answer.status_code, who))

        # The standby restores the tenant once before it can follow: give it the time.
        standby_file = next((work / "cluster").rglob(f"{standby}/data"), None)
        assert standby_file is not None, "no data directory for the standby"
        await asyncio.to_thread(wait_for_file, standby_file / f"{HANDOFF_TENANT}.sqlite3")
        tasks = [asyncio.create_task(writer()) for _ in range(writers)]
        await asyncio.sleep(2.0)
        stopped = time.monotonic()
        await cluster.stop_machine(holder)
        took_stop = time.monotonic() - stopped
        deadline = time.monotonic() + 60
        while sum(1 for a in answers if a[3] == standby) < 100:
            if time.monotonic() > deadline:
                raise TimeoutError("the standby did not take over after the holder stopped")
            await asyncio.sleep(0.05)
        done.set()
        await asyncio.gather(*tasks)
    during = [a for a in answers if a[0] + a[1] >= stopped and a[0] <= stopped + took_stop + 5]
    return {
        "requests": len(answers),
        "failed": sum(1 for a in answers if a[2] != 200),
        "longest": max(a[1] for a in during),
        "longest_before": max((a[1] for a in answers if a[0] + a[1] < stopped), default=0.0),
        "stop_seconds": took_stop,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the figures, then the ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_takeover", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256, help="database size (default 256)")
    parser.add_argument("--rounds", type=int, default=2, help="takeover rounds (default 2)")
    parser.add_argument("--ttl", type=float, default=3.0, help="lease TTL seconds (default 3)")
    parser.add_argument("--writers", type=int, default=4, help="handoff clients (default 4)")
    args = parser.parse_args(argv)
    print(
        f"takeover of a {args.size_mib} MiB tenant after SIGKILL (lease {args.ttl:g}s), "
        f"{args.rounds} rounds; graceful handoff with {args.writers} writers"
    )
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-takeover-") as tmp, S3Server() as s3:
        work = Path(tmp)
        source = work / "source.sqlite3"
        fill_database(source, args.size_mib * MiB)
        s3.create_bucket(BUCKET)
        seed(s3, source, TENANT, args.ttl)
        seed(s3, source, HANDOFF_TENANT, 15)
        source.unlink()
        env = s3.settings_env(BUCKET)
        machines = Machines(work, env, args.ttl)
        try:
            warm, cold = takeover_rounds(machines, s3, args.rounds)
        finally:
            machines.close()
        stalls = asyncio.run(handoff(work, child_env(env), args.writers))
    w, c = median(warm), median(cold)
    goal = args.ttl + 1
    print(
        f"graceful handoff: {stalls['requests']} requests, {stalls['failed']} failed; longest "
        f"request during the handoff {stalls['longest']:.2f}s (before it "
        f"{stalls['longest_before']:.2f}s; the holder took {stalls['stop_seconds']:.2f}s to "
        f"stop) (goal < {GOAL_HANDOFF_STALL:.0f}s: "
        f"{'met' if stalls['longest'] < GOAL_HANDOFF_STALL and not stalls['failed'] else 'MISSED'})"
    )
    print(
        f"median seconds from SIGKILL to the first 200: warm standby {w:.2f} (goal <= TTL + 1 "
        f"= {goal:g}s: {'met' if w <= goal else 'MISSED'})  cold machine {c:.2f}"
    )
    print(f"ratio: warm/cold {w / c:.2f}x (cold/warm {c / w:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
