"""Cold start: restore and verify a tenant database from S3 vs boto3's ``download_file``.

The database (a real SQLite file of ``--size-mib`` MiB, random rows) is uploaded once to
moto's S3 server, running in its own process. Then, in every round, two fresh processes
fetch it, in alternating order:

- candidate: ``tenantdb.replication.restore.restore_database`` of a lock.json naming only
  the snapshot (parallel ranged GETs into a temporary file, size check, sha256 against
  lock.json, page hashes for the log, ``PRAGMA quick_check``, fsync, atomic rename);
- baseline:  boto3's ``S3Client.download_file`` with its default transfer settings (no
  verification at all).

Each process sets up its client and warms it with a 1 MiB download before the clock
starts, then reports the seconds, its peak RSS growth during the transfer (ru_maxrss and
a 50 ms RSS sampler) and the S3 server's CPU seconds over the same window (from /proc).
Medians are printed, the ratio line last.
Run: ``python -m bench.bench_restore --size-mib 256 --rounds 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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
    fill_database,
    machine,
    median,
    run_probe,
    server_pid,
    write_random_file,
)

BUCKET = "bench-restore"
KEY = "tenants/bench/snapshots/00000001-00000002.sqlite3"
WARM_KEY = "warm/one-mib"
GOAL_RATIO = 1.2
GOAL_GROWTH_MIB = 64.0


class _TimedBucket:
    """Delegates to a bucket, timing ``download_file`` (the rest of restore is checking)."""

    def __init__(self, bucket: Any) -> None:
        self._bucket = bucket
        self.download_seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)

    async def download_file(self, key: str, dest: Path, *, max_size: int | None = None) -> Any:
        started = time.perf_counter()
        try:
            return await self._bucket.download_file(key, dest, max_size=max_size)
        finally:
            self.download_seconds += time.perf_counter() - started


async def _candidate(ref: dict[str, Any], work: Path) -> dict[str, Any]:
    from tenantdb.config import Settings
    from tenantdb.protocol.lockfile import LockRecord, SnapshotRef
    from tenantdb.replication.restore import restore_database
    from tenantdb.storage import open_bucket

    settings = Settings.from_env()
    async with open_bucket(settings) as bucket:
        await bucket.get(WARM_KEY)
        await bucket.download_file(WARM_KEY, work / "warm.bin")
        timed = _TimedBucket(bucket)
        db_path = work / "tenant.sqlite3"
        with MemoryWatch() as memory:
            server_cpu = cpu_seconds(server_pid())
            started = time.perf_counter()
            record = LockRecord(
                tenant="bench",
                owner=None,
                region=None,
                generation=1,
                seq=1,
                ttl_seconds=15,
                snapshot=SnapshotRef(**ref),
            )
            await restore_database(timed, record, db_path, prefix="tenants/")  # type: ignore[arg-type]
            seconds = time.perf_counter() - started
            server_cpu = cpu_seconds(server_pid()) - server_cpu
    return {
        "seconds": seconds,
        "server_cpu": server_cpu,
        "download_seconds": timed.download_seconds,
        "growth_mib": memory.growth / MiB,
        "size": db_path.stat().st_size,
    }


def _baseline(bucket: str, work: Path) -> dict[str, Any]:
    import boto3

    client = boto3.client("s3")  # endpoint, region and keys from the environment
    client.download_file(bucket, WARM_KEY, str(work / "warm.bin"))
    dest = work / "download.bin"
    with MemoryWatch() as memory:
        server_cpu = cpu_seconds(server_pid())
        started = time.perf_counter()
        client.download_file(bucket, KEY, str(dest))
        seconds = time.perf_counter() - started
        server_cpu = cpu_seconds(server_pid()) - server_cpu
    return {
        "seconds": seconds,
        "server_cpu": server_cpu,
        "growth_mib": memory.growth / MiB,
        "size": dest.stat().st_size,
    }


def probe(way: str, ref: dict[str, Any], work: Path) -> None:
    """Child process: one measured restore (``candidate``) or download (``baseline``)."""
    work.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(_candidate(ref, work)) if way == "candidate" else _baseline(BUCKET, work)
    if result["size"] != ref["size"]:
        raise SystemExit(f"{way}: got {result['size']} bytes, expected {ref['size']}")
    print(json.dumps(result), flush=True)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print medians, then the ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_restore", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256, help="database size (default 256)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--probe", choices=["candidate", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args.probe, json.loads(args.ref), args.work)
        return 0

    print(f"restore of a {args.size_mib} MiB SQLite database from moto S3, {args.rounds} rounds")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp, S3Server() as s3:
        work = Path(tmp)
        source = work / "source.sqlite3"
        fill_database(source, args.size_mib * MiB)
        write_random_file(work / "warm.bin", MiB)
        ref = {
            "key": KEY,
            "sha256": sha256_of(source),
            "size": source.stat().st_size,
            "published_at": "2025-01-01T00:00:00+00:00",
        }
        s3.create_bucket(BUCKET)
        client = s3.client()
        client.upload_file(str(source), BUCKET, KEY)
        client.upload_file(str(work / "warm.bin"), BUCKET, WARM_KEY)
        client.close()
        source.unlink()
        env = s3.settings_env(BUCKET)
        results: dict[str, list[dict[str, Any]]] = {"candidate": [], "baseline": []}
        for n, order in alternate(args.rounds, ["candidate", "baseline"]):
            for way in order:
                scratch = work / f"{way}-{n}"
                probe_args = ["--probe", way, "--ref", json.dumps(ref), "--work", str(scratch)]
                results[way].append(run_probe("bench.bench_restore", probe_args, env))
                for path in scratch.iterdir():
                    path.unlink()
            c, b = results["candidate"][-1], results["baseline"][-1]
            print(
                f"round {n}: restore_database {c['seconds']:6.2f}s (download "
                f"{c['download_seconds']:.2f}s, checks {c['seconds'] - c['download_seconds']:.2f}s"
                f", S3 server CPU {c['server_cpu']:.2f}s, +{c['growth_mib']:.1f} MiB)  "
                f"boto3 download_file {b['seconds']:6.2f}s (S3 server CPU {b['server_cpu']:.2f}s, "
                f"+{b['growth_mib']:.1f} MiB)",
                flush=True,
            )
    cand = median(r["seconds"] for r in results["candidate"])
    down = median(r["download_seconds"] for r in results["candidate"])
    base = median(r["seconds"] for r in results["baseline"])
    growth = max(r["growth_mib"] for r in results["candidate"])
    base_growth = max(r["growth_mib"] for r in results["baseline"])
    mib_s = ref["size"] / MiB / cand
    cpu_c = median(r["server_cpu"] for r in results["candidate"])
    cpu_b = median(r["server_cpu"] for r in results["baseline"])
    print(
        f"median seconds: restore_database {cand:.2f} (download alone {down:.2f}, "
        f"{mib_s:.0f} MiB/s verified, S3 server CPU {cpu_c:.2f})  boto3 download_file "
        f"{base:.2f} (S3 server CPU {cpu_b:.2f})"
    )
    print(
        f"peak RSS growth (max over rounds): restore_database {growth:.1f} MiB "
        f"(goal < {GOAL_GROWTH_MIB:.0f} MiB: {'met' if growth < GOAL_GROWTH_MIB else 'MISSED'})"
        f"  boto3 download_file {base_growth:.1f} MiB"
    )
    ratio = cand / base
    print(
        f"ratio: restore_database/download_file {ratio:.2f}x "
        f"(goal <= {GOAL_RATIO:.2f}x: {'met' if ratio <= GOAL_RATIO else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
