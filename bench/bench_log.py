"""The log: bytes uploaded under steady writes, shutdown, and restore, against baselines.

Against moto's S3 server in its own process, with one tenant database of ``--size-mib``:

1. **Bytes uploaded** while the demo's increments (``UPDATE counter``) and then inserts of
   1 KiB rows run at ``--rate`` writes/s for ``--seconds`` each, shipped every second.
   The lower bound is the bytes of the distinct pages each second's commits changed (the
   pages in the segments, counted by decoding them); the baseline is what a whole-file
   snapshot per checkpoint uploads (the database's size every 30 s, or every second).
2. **Shutdown**: ``TenantDB.stop()`` from the drain to the lease released, with 1 MiB of
   rows committed since the last segment, vs boto3 ``upload_file`` of the database file
   (what a whole-file final publish needs at the least).
3. **Restore**: ``restore_database`` of the snapshot + ``--segments`` segments vs boto3
   ``download_file`` of one object of the same total size.

Rounds alternate candidate and baseline; medians are printed, the ratio lines last.
Run: ``python -m bench.bench_log --size-mib 256``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import MiB, S3Server, machine, write_random_file

BUCKET = "bench-log"
MIGRATIONS = [
    "CREATE TABLE counter (id INTEGER PRIMARY KEY, count INTEGER NOT NULL);"
    "INSERT INTO counter VALUES (1, 0);"
    "CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB);"
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
]
FILL = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?) "
    "INSERT INTO blobs (body) SELECT randomblob(3000) FROM n"
)
WORKLOADS = {
    "increments": ("UPDATE counter SET count = count + 1 WHERE id = 1", ()),
    "1 KiB inserts": ("INSERT INTO notes (body) VALUES (hex(randomblob(512)))", ()),
}


def settings(s3: S3Server, work: Path, machine_id: str, **overrides: Any) -> Any:
    """Settings of one machine; every machine serves a tenant of its own name."""
    from tenantdb.config import Settings

    return Settings.from_env(
        s3.settings_env(BUCKET),
        tenant=machine_id,
        machine_id=machine_id,
        data_dir=work / machine_id,
        checkpoint_interval=0,
        **overrides,
    )


async def fill(tdb: Any, size: int) -> None:
    """Grow the database to about ``size`` bytes of incompressible rows."""
    while tdb.path.stat().st_size + Path(f"{tdb.path}-wal").stat().st_size < size:
        async with tdb.connection() as db:
            await db.execute(FILL, (4096,))
            await db.commit()


async def log_objects(bucket: Any, tenant: str, what: str = "log") -> dict[str, int]:
    return {o.key: o.size for o in await bucket.list(f"tenants/{tenant}/{what}/")}


async def bytes_uploaded(s3: S3Server, work: Path, size: int, seconds: float, rate: float) -> None:
    from tenantdb.machine.database import TenantDB
    from tenantdb.replication.segment import decode_segment
    from tenantdb.storage import open_bucket

    config = settings(s3, work, "bytes", sync_interval=1.0)
    async with open_bucket(config) as bucket, TenantDB(config, migrations=MIGRATIONS) as tdb:
        await fill(tdb, size)
        await tdb.checkpoint()
        async with tdb.connection() as db:
            async with db.execute("PRAGMA page_count") as cursor:
                pages = (await cursor.fetchone())[0]
            async with db.execute("PRAGMA page_size") as cursor:
                db_bytes = pages * (await cursor.fetchone())[0]
        print(f"database: {db_bytes / MiB:.1f} MiB")
        for name, (sql, args) in WORKLOADS.items():
            before = await log_objects(bucket, "bytes")
            snapshots_before = await log_objects(bucket, "bytes", "snapshots")
            writes, started = 0, time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                async with tdb.connection() as db:
                    await db.execute(sql, args)
                    await db.commit()
                writes += 1
                await asyncio.sleep(max(0.0, writes / rate - elapsed))
            await tdb.sync()
            minutes = (time.monotonic() - started) / 60
            new = {k: v for k, v in (await log_objects(bucket, "bytes")).items() if k not in before}
            snapshots = {
                k: v
                for k, v in (await log_objects(bucket, "bytes", "snapshots")).items()
                if k not in snapshots_before
            }
            uploaded = sum(new.values()) + sum(snapshots.values())
            lower = 0
            for key in new:
                segment = decode_segment((await bucket.get(key)).body, key=key)
                lower += len(segment.pages) * segment.header.page_size
            print(
                f"{name}: {writes} writes in {minutes * 60:.1f}s, {len(new)} segments, "
                f"{len(snapshots)} snapshots; per "
                f"minute: uploaded {uploaded / minutes / MiB:.3f} MiB "
                f"({uploaded / minutes / db_bytes:.2%} of the database), distinct changed "
                f"pages {lower / minutes / MiB:.3f} MiB; whole-file snapshots every 30 s "
                f"{2 * db_bytes / MiB:.0f} MiB, every 1 s {60 * db_bytes / MiB:.0f} MiB"
            )
            print(
                f"ratio ({name}): uploaded/lower bound {uploaded / lower:.2f}x, "
                f"uploaded/whole file per 30 s {uploaded / minutes / (2 * db_bytes):.4f}x"
            )


async def shutdown(s3: S3Server, work: Path, size: int, rounds: int) -> tuple[float, float, float]:
    from tenantdb.machine.database import TenantDB

    client = s3.client()
    candidate: list[float] = []
    released: list[float] = []
    baseline: list[float] = []
    try:
        for n in range(rounds):
            config = settings(s3, work, f"stop{n}", sync_interval=3600.0)
            tdb = TenantDB(config, migrations=MIGRATIONS)
            await tdb.start(standby=False)
            await fill(tdb, size)
            await tdb.checkpoint()
            async with tdb.connection() as db:  # 1 MiB committed since the last segment
                await db.execute(FILL, (256,))
                await db.commit()
            order = ["candidate", "baseline"] if n % 2 == 0 else ["baseline", "candidate"]
            for way in order:
                started = time.perf_counter()
                if way == "candidate":
                    release = tdb.lease.release

                    async def timed_release(release: Any = release, since: float = started) -> None:
                        await release()
                        released.append(time.perf_counter() - since)

                    tdb.lease.release = timed_release  # type: ignore[method-assign]
                    tdb.drain()
                    await tdb.stop()
                    candidate.append(time.perf_counter() - started)
                else:
                    await asyncio.to_thread(
                        client.upload_file, str(tdb.path), BUCKET, f"baseline/{n}.sqlite3"
                    )
                    baseline.append(time.perf_counter() - started)
    finally:
        client.close()
    return statistics.median(released), statistics.median(candidate), statistics.median(baseline)


async def restore(
    s3: S3Server, work: Path, size: int, segments: int, rounds: int
) -> tuple[float, float]:
    from tenantdb.machine.database import TenantDB
    from tenantdb.protocol.lease import Lease
    from tenantdb.replication.restore import restore_database
    from tenantdb.replication.segment import chunk_key
    from tenantdb.storage import open_bucket

    config = settings(s3, work, "restore", sync_interval=3600.0)
    async with open_bucket(config) as bucket:
        async with TenantDB(config, migrations=MIGRATIONS, bucket=bucket) as tdb:
            await fill(tdb, size)
            await tdb.checkpoint()
            for n in range(segments):
                async with tdb.connection() as db:
                    await db.execute("UPDATE counter SET count = count + 1")
                    await db.execute(FILL, (n % 4 + 1,))
                    await db.commit()
                await tdb.sync()
                if tdb._shipper is not None:  # compact as the shipper's loop would
                    async with tdb._shipper._lock:
                        await tdb._shipper._compact()
        observed = await Lease(bucket, "restore", machine_id="r", region="x", ttl=15).read()
        assert observed is not None
        assert observed.record.log is not None
        record = observed.record
        sizes = await log_objects(bucket, "restore")
        # A pack holds several chunks: its key once.
        named = list(
            dict.fromkeys(chunk_key("tenants/", "restore", c) for c in record.log.chunks())
        )
        total = (record.snapshot.size if record.snapshot else 0) + sum(sizes[k] for k in named)
        segments = record.log.tail - record.log.base + 1
        print(
            f"restore: snapshot + {len(named)} log objects ({segments} segments, merged as "
            f"the shipper does), {total / MiB:.1f} MiB in all"
        )
        blob = work / "same-bytes.bin"
        write_random_file(blob, total)
        client = s3.client()
        client.upload_file(str(blob), BUCKET, "baseline/same-bytes")
        candidate: list[float] = []
        baseline: list[float] = []
        try:
            for n in range(rounds):
                order = ["candidate", "baseline"] if n % 2 == 0 else ["baseline", "candidate"]
                for way in order:
                    target = work / f"restored-{way}-{n}"
                    started = time.perf_counter()
                    if way == "candidate":
                        await restore_database(bucket, record, target, prefix="tenants/")
                        candidate.append(time.perf_counter() - started)
                    else:
                        await asyncio.to_thread(
                            client.download_file, BUCKET, "baseline/same-bytes", str(target)
                        )
                        baseline.append(time.perf_counter() - started)
                    target.unlink()
        finally:
            client.close()
    return statistics.median(candidate), statistics.median(baseline)


async def run(args: argparse.Namespace) -> None:
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3:
        s3.create_bucket(BUCKET)
        work = Path(tmp)
        await bytes_uploaded(s3, work, size, args.seconds, args.rate)
        released, stop, upload = await shutdown(s3, work, size, args.rounds)
        print(
            f"median seconds: drain to lease released {released:.2f} (stop() returns after "
            f"{stop:.2f}, SQLite folding the WAL in as the last connection closes), "
            f"upload_file of the database {upload:.2f}"
        )
        fetch, download = await restore(s3, work, size, args.segments, args.rounds)
        print(f"median seconds: restore_database {fetch:.2f}, download_file {download:.2f}")
        print(f"machine: {machine()}")
        print(
            f"ratio: drain to lease released/upload_file {released / upload:.2f}x "
            f"(goal: at most 1 s: {released:.2f}s)"
        )
        print(f"ratio: restore_database/download_file {fetch / download:.2f}x (goal <= 1.3x)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the log benchmarks."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_log")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--segments", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
