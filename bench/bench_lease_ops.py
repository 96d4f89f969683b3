"""Lease operations: HTTP requests the S3 server receives, against the protocol minimum.

moto's S3 runs in its own process behind a WSGI middleware that records every request
(``bench.common.S3Server``); tenantdb talks to it exactly as in production (``S3Bucket``
opened from ``Settings``). Each operation runs on a fresh request log, ``--rounds`` times,
and the counts must be the same every time:

- acquire of a new tenant (minimum: GET lock.json -> 404, conditional PUT);
- renew (minimum: one conditional PUT);
- publish: the snapshot upload (minimum: one PUT below the multipart threshold, else
  CreateMultipartUpload + one UploadPart per part + CompleteMultipartUpload) and, reported
  separately, the lease side (minimum: one conditional PUT + one LIST for retention, + one
  DELETE per snapshot beyond the retention count);
- release (minimum: one conditional PUT);
- acquire of a released tenant (minimum: GET + conditional PUT);
- whole lifecycles through ``TenantDB``: a new tenant's start + stop (its commit shipped as
  one segment, carried in lock.json), and a cold start that restores it + stop.

The ratio line (counted / minimum, over all operations) is printed last.
Run: ``python -m bench.bench_lease_ops``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import MiB, Request, S3Server, fill_database, machine

BUCKET = "bench-lease-ops"
PART = 8 * MiB  # S3Bucket's default part size
THRESHOLD = 16 * MiB  # S3Bucket's default multipart threshold


@dataclass
class Operation:
    """One measured operation: its name, its protocol minimum, what the server saw."""

    name: str
    minimum: int
    counts: list[int]
    kinds: collections.Counter[str]


def upload_minimum(size: int) -> int:
    """Requests a snapshot upload of ``size`` bytes needs at the least."""
    return 1 if size < THRESHOLD else -(-size // PART) + 2


def describe(kinds: collections.Counter[str]) -> str:
    """``GetObject x1, PutObject x1`` for a request mix."""
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))


def split(requests: list[Request]) -> tuple[list[Request], list[Request]]:
    """(requests on snapshot objects' upload, everything else)."""
    upload_kinds = {"PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload"}
    uploads = [r for r in requests if "/snapshots/" in r.path and r.kind in upload_kinds]
    return uploads, [r for r in requests if r not in uploads]


async def measure(s3: S3Server, rounds: int, size: int, work: Path) -> list[Operation]:
    """Run every operation ``rounds`` times; return what the server received."""
    from example_app import MIGRATIONS
    from tenantdb import TenantDB
    from tenantdb.config import Secret, Settings
    from tenantdb.protocol.lease import Lease
    from tenantdb.protocol.lockfile import now_ms
    from tenantdb.protocol.snapshot import copy_database, publish_snapshot
    from tenantdb.replication.checksum import PageHashes, database_page_size
    from tenantdb.replication.shipper import empty_log
    from tenantdb.storage import open_bucket

    ops: dict[str, Operation] = {}

    def record(name: str, minimum: int, requests: list[Request]) -> None:
        op = ops.setdefault(name, Operation(name, minimum, [], collections.Counter()))
        op.counts.append(len(requests))
        if len(op.counts) == 1:
            op.kinds.update(r.kind for r in requests)

    async def counted(action: Callable[[], Awaitable[Any]]) -> list[Request]:
        s3.requests(reset=True)
        await action()
        return s3.requests(reset=True)

    source_path = work / "source.sqlite3"
    fill_database(source_path, size)
    source = sqlite3.connect(source_path, check_same_thread=False)
    copy = work / "copy.sqlite3"
    copy_database(source, copy)
    copy_log = empty_log(PageHashes.of_file(copy, database_page_size(copy)))
    settings = Settings(
        bucket_name=BUCKET,
        endpoint_url=s3.endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key=Secret("testing"),
        machine_id="bench-machine",
        checkpoint_interval=0,
    )
    async with open_bucket(settings) as bucket:
        await bucket.put("warm-up", b"x")  # the client's first connection, outside the counts
        for n in range(rounds):
            lease = Lease(bucket, f"lease{n:03d}", machine_id="m1", region="local", ttl=15)
            record("acquire (new tenant)", 2, await counted(lease.acquire))
            record("renew", 1, await counted(lease.renew))
            snapshot_size = 0
            for publish in range(2):

                async def publish_once(lease: Lease = lease) -> None:
                    await publish_snapshot(lease, bucket, copy, log=copy_log, taken_ms=now_ms())

                uploads, rest = split(await counted(publish_once))
                snapshot_size = lease.record.snapshot.size if lease.record.snapshot else 0
                if publish == 0:
                    record("publish: snapshot upload", upload_minimum(snapshot_size), uploads)
                # Old snapshots are the garbage collector's, not the publisher's.
                record(f"publish: lease CAS ({'first' if publish == 0 else 'again'})", 1, rest)
            record("release", 1, await counted(lease.release))
            again = Lease(bucket, lease.tenant, machine_id="m2", region="local", ttl=15)
            record("acquire (released tenant)", 2, await counted(again.acquire))
            await again.release()

            # Whole lifecycles, as a machine runs them.
            tenant = f"life{n:03d}"
            first = TenantDB(
                settings.with_overrides(tenant=tenant, data_dir=work / f"m1-{n}"),
                migrations=MIGRATIONS,
                bucket=bucket,
            )

            async def new_tenant_lifecycle(tdb: TenantDB = first) -> None:
                await tdb.start(standby=False)
                async with tdb.connection() as db:
                    await db.execute("UPDATE counter SET count = count + 1")
                    await db.commit()
                await tdb.stop()

            # acquire (GET + PUT), the takeover record (PUT), then at stop the CAS that
            # appends the segment, carrying it (PUT: no object, a pack comes only with more
            # segments), then the release (PUT): a new tenant needs no snapshot.
            requests = await counted(new_tenant_lifecycle)
            record("lifecycle: new tenant start+stop", 2 + 1 + 1 + 1, requests)
            second = TenantDB(
                settings.with_overrides(
                    tenant=tenant, data_dir=work / f"m2-{n}", machine_id="bench-machine-2"
                ),
                migrations=MIGRATIONS,
                bucket=bucket,
            )

            async def restore_lifecycle(tdb: TenantDB = second) -> None:
                await tdb.start(standby=False)
                await tdb.stop()  # nothing written: no publish, just the release

            # acquire (GET + PUT), the takeover record (PUT), release (PUT): the one segment
            # rides in lock.json, which the acquire read anyway
            record(
                "lifecycle: cold start (restore)+stop", 2 + 1 + 1, await counted(restore_lifecycle)
            )
    source.close()
    return list(ops.values())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the counts, then the ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_lease_ops", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--size-mib",
        type=int,
        default=20,
        help="snapshot size for the publishes (default 20: a multipart upload)",
    )
    args = parser.parse_args(argv)
    print(f"S3 requests per lease operation, counted at the server, {args.rounds} rounds")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-lease-") as tmp, S3Server() as s3:
        s3.create_bucket(BUCKET)
        ops = asyncio.run(measure(s3, args.rounds, args.size_mib * MiB, Path(tmp)))
    width = max(len(op.name) for op in ops)
    total = minimum = 0
    worst = 0.0
    for op in ops:
        if len(set(op.counts)) != 1:
            raise RuntimeError(f"{op.name}: counts differ between rounds: {op.counts}")
        count = op.counts[0]
        total += count
        minimum += op.minimum
        worst = max(worst, count / op.minimum)
        print(
            f"{op.name:<{width}}  {count:>3} requests (minimum {op.minimum:>2}, "
            f"{count / op.minimum:.2f}x)  {describe(op.kinds)}"
        )
    print(
        f"ratio: counted/minimum {total}/{minimum} = {total / minimum:.2f}x over all "
        f"operations (worst single operation {worst:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
