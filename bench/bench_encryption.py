"""Encryption at rest: what sealing costs, each figure encrypted vs not in the same run.

On moto's S3 server (its own process), through tenantdb's own ``S3Bucket``, in alternating
order every round (ABBA), medians compared:

- restore download: ``download_file`` of a ``--size-mib`` MiB snapshot (a real SQLite
  file of random rows) through ``EncryptedBucket`` (ranged parallel GETs of the sealed
  object, then opened in place chunk by chunk) vs the same bucket without it;
- shipping: ``put`` of 64 segment-sized bodies (256 KiB of random bytes each, with
  ``If-None-Match: *``), sealed vs plain, each body both ways in turn: MiB/s;
- durable write: a commit then ``TenantDB.sync()`` (the segment published by its CAS on
  lock.json, sealed inline there), 100 times, on a running tenant: median latency;
- CPU: one core's seconds per MiB to seal and to open (AES-256-GCM), beside sha256's
  (which every restore already pays).

Run: ``python -m bench.bench_encryption --size-mib 256 --rounds 3``. The ratio line last.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bench.common import MiB, S3Server, alternate, fill_database, machine, median
from tenantdb.config import Secret, Settings
from tenantdb.crypto import ObjectContext, open_bytes, parse_keyring, seal_bytes, wrap_data_key
from tenantdb.machine.database import TenantDB
from tenantdb.storage.base import Bucket
from tenantdb.storage.encrypted import EncryptedBucket
from tenantdb.storage.s3 import S3Bucket

GOAL = 1.10
KEYRING = parse_keyring(base64.b64encode(os.urandom(32)).decode(), variable="bench")
PREFIX = "tenants/"
SEGMENT_BYTES = 256 * 1024
SEGMENTS = 64
WRITES = 100


def _bucket(server: S3Server, name: str) -> S3Bucket:
    return S3Bucket(
        name,
        endpoint_url=server.endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key=Secret("testing"),
    )


async def _timed(action: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def _restore(
    raw: Bucket, sealed: Bucket, db: Path, work: Path, rounds: int
) -> dict[str, float]:
    plain_key = f"{PREFIX}plain/snapshots/00000001-00000001-000000000001-0000000000001-aa.sqlite3"
    sealed_key = f"{PREFIX}sealed/snapshots/00000001-00000001-000000000001-0000000000001-aa.sqlite3"
    await raw.upload_file(plain_key, db)
    await sealed.upload_file(sealed_key, db)
    ways = {
        "plain": lambda: raw.download_file(plain_key, work / "plain"),
        "sealed": lambda: sealed.download_file(sealed_key, work / "sealed"),
    }
    times: dict[str, list[float]] = {"plain": [], "sealed": []}
    for _, order in alternate(rounds, list(ways)):
        for way in order:
            times[way].append(await _timed(lambda way=way: ways[way]()))  # type: ignore[misc]
    same = hashlib.sha256((work / "plain").read_bytes()).digest()
    if same != hashlib.sha256((work / "sealed").read_bytes()).digest():
        raise RuntimeError("the sealed download does not give back the database")
    return {way: median(t) for way, t in times.items()}


async def _ship(raw: Bucket, sealed: Bucket, rounds: int) -> dict[str, float]:
    """Each segment put both ways in turn (ABBA), so that a busy machine's drift cancels."""
    bodies = [os.urandom(SEGMENT_BYTES) for _ in range(SEGMENTS)]
    buckets = {"plain": raw, "sealed": sealed}
    rates: dict[str, list[float]] = {"plain": [], "sealed": []}
    for n in range(1, rounds + 1):
        seconds = {"plain": 0.0, "sealed": 0.0}
        for index, body in enumerate(bodies, 1):
            for way in ["plain", "sealed"] if index % 2 else ["sealed", "plain"]:
                key = f"{PREFIX}ship-{way}/log/{n:08d}/{index:012d}.seg"
                started = time.perf_counter()
                await buckets[way].put(key, body, if_none_match="*")
                seconds[way] += time.perf_counter() - started
        for way, took in seconds.items():
            rates[way].append(SEGMENTS * SEGMENT_BYTES / MiB / took)
    return {way: median(r) for way, r in rates.items()}


async def _durable_writes(raw: Bucket, work: Path, rounds: int) -> dict[str, float]:
    latencies: dict[str, list[float]] = {"plain": [], "sealed": []}
    for n, order in alternate(rounds, ["plain", "sealed"]):
        for way in order:
            bucket = raw if way == "plain" else EncryptedBucket(raw, KEYRING, prefix=PREFIX)
            settings = Settings(
                tenant=f"w-{way}-{n}",
                machine_id="bench",
                data_dir=work / f"w-{way}-{n}",
                checkpoint_interval=0,
                durability="async",
            )
            migrations = ["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"]
            async with TenantDB(settings, migrations=migrations, bucket=bucket) as tdb:
                for _ in range(WRITES):
                    started = time.perf_counter()
                    async with tdb.connection() as db:
                        await db.execute("INSERT INTO t (v) VALUES (?)", ("x" * 200,))
                        await db.commit()
                    await tdb.sync()
                    latencies[way].append(time.perf_counter() - started)
    return {way: statistics.median(values) for way, values in latencies.items()}


def _cpu_per_mib() -> dict[str, float]:
    data_key = wrap_data_key(KEYRING, "bench", f"{PREFIX}bench/key.json")[0]
    ctx = ObjectContext("bench", f"{PREFIX}bench/log/00000001/000000000001.seg", 1, "segment")
    body = os.urandom(16 * MiB)
    started = time.process_time()
    sealed = seal_bytes(data_key, ctx, body)
    seal = time.process_time() - started
    started = time.process_time()
    open_bytes(data_key, ctx, sealed)
    opened = time.process_time() - started
    started = time.process_time()
    hashlib.sha256(body).digest()
    sha = time.process_time() - started
    return {"seal": seal / 16 * 1e3, "open": opened / 16 * 1e3, "sha256": sha / 16 * 1e3}


async def _run(size_mib: int, rounds: int) -> int:
    print(machine(), flush=True)
    with S3Server() as server, tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        name = server.create_bucket("bench-encryption")
        db = work / "db.sqlite3"
        fill_database(db, size_mib * MiB)
        async with _bucket(server, name) as raw:
            sealed = EncryptedBucket(raw, KEYRING, prefix=PREFIX)
            restore = await _restore(raw, sealed, db, work, rounds)
            print(
                f"restore download {size_mib} MiB: sealed {restore['sealed']:.2f} s vs plain "
                f"{restore['plain']:.2f} s",
                flush=True,
            )
            ship = await _ship(raw, sealed, rounds)
            print(
                f"shipping {SEGMENTS} x 256 KiB: sealed {ship['sealed']:.1f} vs plain "
                f"{ship['plain']:.1f} MiB/s",
                flush=True,
            )
            writes = await _durable_writes(raw, work, rounds)
            print(
                f"durable write (commit + sync), median of {WRITES} x {rounds}: sealed "
                f"{writes['sealed'] * 1e3:.2f} ms vs plain {writes['plain'] * 1e3:.2f} ms",
                flush=True,
            )
    cpu = _cpu_per_mib()
    print(
        f"CPU per MiB, one core: seal {cpu['seal']:.2f} ms, open {cpu['open']:.2f} ms "
        f"(sha256 {cpu['sha256']:.2f} ms)",
        flush=True,
    )
    restore_ratio = restore["sealed"] / restore["plain"]
    ship_ratio = ship["plain"] / ship["sealed"]
    write_ratio = writes["sealed"] / writes["plain"]
    worst = max(restore_ratio, ship_ratio, write_ratio)
    verdict = "met" if worst <= GOAL else "missed"
    print(
        f"encryption overhead: restore {restore_ratio:.3f}x, shipping {ship_ratio:.3f}x, "
        f"durable write {write_ratio:.3f}x (goal <= {GOAL:.2f}x: {verdict})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_encryption", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.size_mib, args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())
