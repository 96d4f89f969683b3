"""What a tenant costs a month, per scenario: idle, and 1, 50 and 1,000 writes/s in each
durability, with Litestream's figure beside each.

A holder and a warm standby of one tenant (``TenantDB`` on moto's S3, counted at the server
by ``bench.common.S3Server``, as ``bench.bench_idle`` does), ``TENANTDB_IDLE_STOP`` off. In
each scenario the holder takes increments (one of 100 counters) at a steady rate for
``--seconds``: in ``async`` durability each write is answered at its commit; in ``bucket``
durability each waits for the publication that holds it (``sync()``, what the output gate
waits for), so that writes arriving meanwhile share one. Every request the server received
is classed as Tigris bills it (``bench_idle.tigris_class``) and priced at list prices; the
bytes are the bodies sent (``lock.json`` included).

Litestream (https://litestream.io/reference/config/) is a process beside one database, with
no lease and no standby: idle, it sends nothing; with changes, it uploads one object (an
LTX file) per ``sync-interval`` (1 s by default), plus its compactions (not counted here).
Run: ``python -m bench.bench_scenarios [--seconds 20] [--rates 1 50 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from bench.bench_cost import MIGRATIONS, increment
from bench.bench_idle import MINUTES_PER_MONTH, PRICE, tigris_class
from bench.common import MiB, S3Server, machine

BUCKET = "bench-scenarios"
Durability = Literal["async", "bucket"]
# Litestream's default sync-interval: one upload a second while the database changes.
LITESTREAM_PUTS_PER_MINUTE = 60


async def write_at(tdb: object, rate: float, seconds: float, durability: Durability) -> int:
    """Increments at ``rate`` a second for ``seconds``, each answered as ``durability``
    answers it (open loop: a write starts on time even while others wait)."""
    from tenantdb.machine.database import TenantDB

    assert isinstance(tdb, TenantDB)
    done = 0

    async def one() -> None:
        nonlocal done
        await increment(tdb)
        if durability == "bucket":
            await tdb.sync()
        done += 1

    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate) + 1
        tasks += [asyncio.create_task(one()) for _ in range(due - n)]
        n = due
        await asyncio.sleep(min(0.01, 1 / rate))
    await asyncio.gather(*tasks)
    return done


async def scenario(
    s3: S3Server, work: Path, durability: Durability, rate: float, seconds: float
) -> dict[str, float]:
    """One scenario's billed requests a minute (A, B), bytes sent a minute and writes/s."""
    from tenantdb import TenantDB
    from tenantdb.config import Secret, Settings

    name = f"{durability}-{rate:g}"
    base = Settings(
        tenant=name,
        bucket_name=BUCKET,
        endpoint_url=s3.endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key=Secret("testing"),
        idle_stop=0,
        metrics_port=0,
        durability=durability,
    )
    machines = []
    for role in ("holder", "standby"):
        settings = base.with_overrides(machine_id=role, data_dir=work / name / role)
        tdb = TenantDB(settings, migrations=MIGRATIONS)
        await tdb.start(standby=True)
        machines.append(tdb)
    holder = machines[0]
    await asyncio.sleep(2 * base.follow_interval + 1.5)  # catch-up and first collection done
    s3.requests(reset=True)
    started = time.monotonic()
    writes = await write_at(holder, rate, seconds, durability) if rate else 0
    if not rate:
        await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    seen = s3.requests(reset=True)
    for tdb in reversed(machines):
        await tdb.stop()
    per_minute = 60 / elapsed
    billed = collections.Counter(tigris_class(r) for r in seen)
    return {
        "A": billed["A"] * per_minute,
        "B": billed["B"] * per_minute,
        "sent": sum(r.body_bytes for r in seen if r.method in ("PUT", "POST")) * per_minute,
        "writes_per_s": writes / elapsed,
    }


def dollars(a: float, b: float) -> float:
    """A month of ``a`` class A and ``b`` class B requests a minute, at list prices."""
    return (a * PRICE["A"] + b * PRICE["B"]) * MINUTES_PER_MONTH


async def run(seconds: float, rates: Sequence[float]) -> None:
    with S3Server() as s3, tempfile.TemporaryDirectory() as tmp:
        s3.create_bucket(BUCKET)
        print(
            "| scenario | writes/s done | billed requests/min (A, B) | sent/min "
            "| a month | Litestream: PUT/min, a month |"
        )
        print("|---|---|---|---|---|---|")
        runs: list[tuple[str, Durability, float]] = [("idle", "async", 0.0)]
        runs += [(f"{r:g} writes/s, {d}", d, r) for r in rates for d in ("async", "bucket")]
        for label, durability, rate in runs:
            got = await scenario(s3, Path(tmp), durability, rate, seconds)
            lite = LITESTREAM_PUTS_PER_MINUTE if rate else 0
            print(
                f"| {label} (holder + standby) | {got['writes_per_s']:.0f} "
                f"| A {got['A']:.1f}, B {got['B']:.1f} | {got['sent'] / MiB:.3f} MiB "
                f"| ${dollars(got['A'], got['B']):.2f} | {lite}, ${dollars(lite, 0):.2f} |",
                flush=True,
            )
    print(machine())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_scenarios")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 50.0, 1000.0])
    args = parser.parse_args(argv)
    asyncio.run(run(args.seconds, args.rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
