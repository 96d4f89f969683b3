"""Shutdown: from ``TenantDB.stop()`` to "lease released" vs boto3's ``upload_file``.

Every round runs two fresh processes against moto's S3 server (its own process), in
alternating order:

- candidate: a ``TenantDB`` serving a new tenant on S3 (lease TTL 90 s, so that no renewal
  lands inside the measured window) is filled by a child process (so the probe's own peak
  RSS stays clean) to ``--size-mib`` MiB of random rows, then ``--wal-tail-mib`` MiB more
  rows are committed into its WAL and not checkpointed. The clock runs across
  ``await tdb.stop()``: pool close, consistent copy with the backup API (WAL rows
  included), multipart upload with ``PRAGMA quick_check`` and sha256 running alongside,
  the CAS on ``lock.json`` that publishes it, the retention listing, and the CAS that
  releases the lease;
- baseline: boto3's ``S3Client.upload_file`` (default transfer settings) of a file of the
  same size, with no snapshot, check or lease at all.

Both warm their client up with a small upload before the clock starts. Peak RSS growth
over the measured window is taken from ru_maxrss and a 50 ms RSS sampler; the S3 server's
CPU seconds over the same window are read from /proc. Medians are printed, the ratio line
last. Run: ``python -m bench.bench_publish --size-mib 256``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    MemoryWatch,
    MiB,
    S3Server,
    alternate,
    cpu_seconds,
    fill_database_in_child,
    machine,
    median,
    run_probe,
    server_pid,
    write_random_file,
)

BUCKET = "bench-publish"
GOAL_RATIO = 1.3
GOAL_GROWTH_MIB = 64.0


class _TimedBucket:
    """Delegates to a bucket, adding up the seconds spent in each of its methods."""

    def __init__(self, bucket: Any) -> None:
        self._bucket = bucket
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._bucket, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attribute(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                self.seconds[name] = self.seconds.get(name, 0.0) + spent

        return timed


async def _candidate(tenant: str, work: Path, size: int, wal_tail: int) -> dict[str, Any]:
    from example_app import MIGRATIONS
    from tenantdb import TenantDB
    from tenantdb.config import Settings
    from tenantdb.storage import open_bucket

    settings = Settings.from_env(
        tenant=tenant,
        data_dir=work / "data",
        machine_id="bench-publisher",
        checkpoint_interval=0,
        # No renewal (every ttl/3) lands inside the measured window to muddle its breakdown.
        lease_ttl=90,
    )
    async with open_bucket(settings) as bucket:
        timed = _TimedBucket(bucket)
        tdb = TenantDB(settings, migrations=MIGRATIONS, bucket=timed)  # type: ignore[arg-type]
        await tdb.start(standby=False)
        try:
            async with tdb.connection() as db:
                await db.execute("UPDATE counter SET count = count + 1")
                await db.commit()
            # A first (small) publish, as the checkpoint loop would have done by now.
            await tdb.checkpoint()
            await asyncio.to_thread(fill_database_in_child, tdb.path, size, wal_tail=wal_tail)
            wal = Path(f"{tdb.path}-wal").stat().st_size
            if wal < wal_tail:
                raise RuntimeError(f"the WAL holds {wal} bytes, expected {wal_tail}")
            timed.seconds.clear()
            with MemoryWatch() as memory:
                server_cpu = cpu_seconds(server_pid())
                started = time.perf_counter()
                await tdb.stop()
                seconds = time.perf_counter() - started
                server_cpu = cpu_seconds(server_pid()) - server_cpu
        finally:
            await tdb.stop()
        if tdb.lease.status != "released" or tdb.lease.record is None:
            raise RuntimeError(f"the lease was not released: {tdb.lease!r}")
        snapshot = tdb.lease.record.snapshot
    return {
        "seconds": seconds,
        "server_cpu": server_cpu,
        "bucket_seconds": timed.seconds,
        "growth_mib": memory.growth / MiB,
        "size": snapshot.size if snapshot else 0,
        "wal_bytes": wal,
    }


def _baseline(source: Path, key: str) -> dict[str, Any]:
    import boto3

    client = boto3.client("s3")  # endpoint, region and keys from the environment
    warm = source.with_name("warm.bin")
    client.upload_file(str(warm), BUCKET, f"{key}.warm")
    with MemoryWatch() as memory:
        server_cpu = cpu_seconds(server_pid())
        started = time.perf_counter()
        client.upload_file(str(source), BUCKET, key)
        seconds = time.perf_counter() - started
        server_cpu = cpu_seconds(server_pid()) - server_cpu
    size = client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
    return {
        "seconds": seconds,
        "server_cpu": server_cpu,
        "growth_mib": memory.growth / MiB,
        "size": size,
    }


def probe(args: argparse.Namespace) -> None:
    """Child process: one measured shutdown (``candidate``) or upload (``baseline``)."""
    args.work.mkdir(parents=True, exist_ok=True)
    if args.probe == "candidate":
        coro = _candidate(args.tenant, args.work, args.size_mib * MiB, args.wal_tail_mib * MiB)
        result = asyncio.run(coro)
    else:
        result = _baseline(args.source, f"baseline/{args.tenant}.bin")
    print(json.dumps(result), flush=True)


def _empty_bucket(s3: S3Server) -> None:
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", ()):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print medians, then the ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_publish", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256, help="database size (default 256)")
    parser.add_argument(
        "--wal-tail-mib", type=int, default=8, help="MiB of rows left in the WAL (default 8)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--probe", choices=["candidate", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--tenant", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args)
        return 0

    print(
        f"shutdown publish of a {args.size_mib} MiB database (+{args.wal_tail_mib} MiB in its "
        f"WAL) to moto S3, {args.rounds} rounds"
    )
    print(f"machine: {machine()}")
    results: dict[str, list[dict[str, Any]]] = {"candidate": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp, S3Server() as s3:
        work = Path(tmp)
        s3.create_bucket(BUCKET)
        source = work / "same-size.bin"
        write_random_file(source, (args.size_mib + args.wal_tail_mib) * MiB)
        write_random_file(work / "warm.bin", MiB)
        env = s3.settings_env(BUCKET)
        common = ["--size-mib", str(args.size_mib), "--wal-tail-mib", str(args.wal_tail_mib)]
        for n, order in alternate(args.rounds, ["candidate", "baseline"]):
            for way in order:
                scratch = work / f"{way}-{n}"
                probe_args = [
                    *common,
                    "--probe",
                    way,
                    "--tenant",
                    f"publish{n:03d}",
                    "--work",
                    str(scratch),
                    "--source",
                    str(source),
                ]
                results[way].append(run_probe("bench.bench_publish", probe_args, env))
                for path in sorted(scratch.rglob("*"), reverse=True):
                    if path.is_file():
                        path.unlink()
            _empty_bucket(s3)
            c, b = results["candidate"][-1], results["baseline"][-1]
            spent = c["bucket_seconds"]
            upload = spent.get("upload_file", 0.0)
            lease = spent.get("put", 0.0) + spent.get("list", 0.0) + spent.get("delete", 0.0)
            rest = c["seconds"] - upload - lease
            print(
                f"round {n}: stop() {c['seconds']:6.2f}s (copy etc. {rest:.2f}s, upload "
                f"{upload:.2f}s, lease/list {lease:.2f}s, S3 server CPU "
                f"{c['server_cpu']:.2f}s, +{c['growth_mib']:.1f} MiB)  boto3 upload_file "
                f"{b['seconds']:6.2f}s (S3 server CPU {b['server_cpu']:.2f}s, "
                f"+{b['growth_mib']:.1f} MiB)",
                flush=True,
            )
    cand = median(r["seconds"] for r in results["candidate"])
    upload = median(r["bucket_seconds"].get("upload_file", 0.0) for r in results["candidate"])
    base = median(r["seconds"] for r in results["baseline"])
    growth = max(r["growth_mib"] for r in results["candidate"])
    base_growth = max(r["growth_mib"] for r in results["baseline"])
    size = results["candidate"][-1]["size"] / MiB
    cpu_c = median(r["server_cpu"] for r in results["candidate"])
    cpu_b = median(r["server_cpu"] for r in results["baseline"])
    print(
        f"median seconds: stop() to lease released {cand:.2f} (upload {upload:.2f}, "
        f"snapshot {size:.0f} MiB, S3 server CPU {cpu_c:.2f})  boto3 upload_file {base:.2f} "
        f"({results['baseline'][-1]['size'] / MiB:.0f} MiB, S3 server CPU {cpu_b:.2f})"
    )
    print(
        f"peak RSS growth (max over rounds): stop() {growth:.1f} MiB "
        f"(goal < {GOAL_GROWTH_MIB:.0f} MiB: {'met' if growth < GOAL_GROWTH_MIB else 'MISSED'})"
        f"  boto3 upload_file {base_growth:.1f} MiB"
    )
    # moto is single-threaded, so CPU it spends only on the candidate's requests is wall
    # time on the candidate's critical path (see docs/performance.md for what it is).
    extra = [
        max(0.0, c["server_cpu"] - b["server_cpu"])
        for c, b in zip(results["candidate"], results["baseline"], strict=True)
    ]
    adjusted = median(c["seconds"] - x for c, x in zip(results["candidate"], extra, strict=True))
    print(
        f"S3 server CPU spent on the candidate beyond the baseline: median {median(extra):.2f}s; "
        f"without it (estimate): stop() {adjusted:.2f}s, {adjusted / base:.2f}x"
    )
    ratio = cand / base
    print(
        f"ratio: stop()/upload_file {ratio:.2f}x "
        f"(goal <= {GOAL_RATIO:.2f}x: {'met' if ratio <= GOAL_RATIO else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
