"""The fleet verbs at scale: forks, ``query --all``, ``migrate`` and a large purge.

On moto's S3 (``bench.common.S3Server``, counting every request): one template tenant
written by a real ``TenantDB`` (a snapshot and a few segments), ``--tenants`` forks of it
(``create_tenant``: a server-side copy each), ``query_tenants`` of a simple aggregate over
all of them cold (every copy restored) and warm (nothing new: one GET of ``lock.json``
each), ``migrate status`` (each tenant's schema from its ``lock.json``), a migration of
one added column on every tenant (``migrate_tenant``), then ``purge_tenant`` of a tenant
of ``--objects`` objects. Each phase prints its time and the S3 requests it made per
tenant (per object for the purge); the last line compares them with the issue's goals,
scaled to the tenants measured.

Run: ``python -m bench.bench_fleet [--tenants 200] [--objects 10000] [--parallel 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import S3Server

BUCKET = "bench-fleet"
PREFIX = "tenants/"
MIGRATIONS = ["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"]


def by_kind(s3: S3Server) -> str:
    """The requests since the last call, by S3 operation."""
    counts = collections.Counter(request.kind for request in s3.requests())
    total = sum(counts.values())
    parts = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
    return f"{total} requests ({parts})" if total else "0 requests"


async def measure(s3: S3Server, tenants: int, objects: int, parallel: int, work: Path) -> None:
    """Run the phases; print one line per phase and the ratio line."""
    from tenantdb import TenantDB
    from tenantdb.config import Secret, Settings
    from tenantdb.fleet import create_tenant, migrate_tenant, purge_tenant, query_tenants
    from tenantdb.storage.s3 import S3Bucket

    env = s3.settings_env(s3.create_bucket(BUCKET))
    bucket = S3Bucket(
        BUCKET,
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region=env["AWS_REGION"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=Secret(env["AWS_SECRET_ACCESS_KEY"]),
    )
    async with bucket:
        settings = Settings(tenant="template", data_dir=work / "template", checkpoint_interval=0)
        async with TenantDB(settings, migrations=MIGRATIONS, bucket=bucket) as tdb:
            for batch in range(4):
                async with tdb.connection() as db:
                    await db.executemany(
                        "INSERT INTO t (v) VALUES (?)", [(f"{batch}-{i}" * 10,) for i in range(200)]
                    )
                    await db.commit()
                await tdb.sync()
                if batch == 1:
                    await tdb.checkpoint()
        s3.requests()

        names = [f"t{i:06d}" for i in range(tenants)]
        gate = asyncio.Semaphore(parallel)

        async def fork(name: str) -> None:
            async with gate:
                await create_tenant(bucket, name, prefix=PREFIX, lease_ttl=15, source="template")

        started = time.monotonic()
        await asyncio.gather(*(fork(name) for name in names))
        fork_s = time.monotonic() - started
        print(f"fork {tenants} tenants: {fork_s:.1f}s; {by_kind(s3)}", flush=True)

        async def query(label: str) -> float:
            began = time.monotonic()
            results = query_tenants(
                bucket,
                names,
                "SELECT count(*) FROM t",
                prefix=PREFIX,
                cache_dir=work / "cache",
                parallel=parallel,
            )
            answers = [r async for r in results]
            took = time.monotonic() - began
            failed = [r for r in answers if r.error]
            assert not failed, failed[0]
            assert all(r.rows == ((800,),) for r in answers)
            print(f"query --all {label}: {took:.1f}s; {by_kind(s3)}", flush=True)
            return took

        cold, warm = await query("cold"), await query("warm")

        from tenantdb.fleet.migrate import read_schemas

        began = time.monotonic()
        schemas = [s async for s in read_schemas(bucket, names, prefix=PREFIX, parallel=parallel)]
        status_s = time.monotonic() - began
        assert not [s for s in schemas if s.error], schemas[0]
        print(f"migrate status: {status_s:.1f}s; {by_kind(s3)}", flush=True)

        added = [*MIGRATIONS, "ALTER TABLE t ADD COLUMN w TEXT"]
        migrating = Settings(tenant="operator", data_dir=work / "operator", lease_ttl=15)

        async def migrate(name: str) -> str:
            async with gate:
                return (await migrate_tenant(migrating, bucket, name, added)).outcome

        began = time.monotonic()
        outcomes = collections.Counter(await asyncio.gather(*(migrate(n) for n in names)))
        migrate_s = time.monotonic() - began
        assert outcomes == {"migrated": tenants}, outcomes
        print(f"migrate run (one added column): {migrate_s:.1f}s; {by_kind(s3)}", flush=True)

        await create_tenant(bucket, "big", prefix=PREFIX, lease_ttl=15)
        put_gate = asyncio.Semaphore(16)

        async def put(index: int) -> None:
            async with put_gate:
                key = f"{PREFIX}big/log/00000001/{index:012d}.seg"
                await bucket.put(key, b"x" * 100, if_none_match="*")

        await asyncio.gather(*(put(i) for i in range(1, objects + 1)))
        s3.requests()
        started = time.monotonic()
        receipt = await purge_tenant(bucket, "big", prefix=PREFIX)
        purge_s = time.monotonic() - started
        print(f"purge of {receipt.keys} objects: {purge_s:.1f}s; {by_kind(s3)}", flush=True)
    scale = 1000 / tenants
    print(
        f"ratio: per 1,000 tenants, query --all cold {cold * scale:.0f}s (goal 60), warm "
        f"{warm * scale:.0f}s (goal 10); migrate status {status_s * scale:.0f}s (goal 10), "
        f"migrate run of one added column {migrate_s * scale:.0f}s (goal 120); purge of "
        f"{objects} objects {purge_s:.0f}s (goal 30 for 10,000)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args(argv)
    with S3Server() as s3, tempfile.TemporaryDirectory(prefix="bench-fleet-") as work:
        asyncio.run(measure(s3, args.tenants, args.objects, args.parallel, Path(work)))


if __name__ == "__main__":
    main()
