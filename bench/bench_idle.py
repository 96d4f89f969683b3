"""What an idle tenant costs: the bucket requests per minute of an idle holder and standby.

A holder (``TenantDB`` on moto's S3, counted at the server by ``bench.common.S3Server``)
serves a tenant nobody uses, with ``TENANTDB_IDLE_STOP`` off so that it stays up, and a
warm standby follows it. For ``--seconds`` the server records every request: the holder's
are the writes of ``lock.json`` (its renewals), the standby's the reads (its polls). Each
request is classed as Tigris bills it (https://www.tigrisdata.com/docs/pricing/): A for
PUT/POST/LIST, B for GET/HEAD, nothing for DELETE and for 304 and 412 answers. Beside the
server's count: what each machine's cost meter (``tenantdb_bucket_requests_total``) counted.

The last line is the ratio of the holder's class A requests to its lease's need (one
renewal per TTL/3). Run: ``python -m bench.bench_idle [--seconds 60] [--ttl 15]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import Request, S3Server, machine

BUCKET = "bench-idle"
# Tigris's list prices, dollars per request (https://www.tigrisdata.com/docs/pricing/).
PRICE = {"A": 0.005 / 1000, "B": 0.0005 / 1000}
MINUTES_PER_MONTH = 30 * 24 * 60


def tigris_class(request: Request) -> str:
    """The class Tigris bills a request in: A, B, or free."""
    if request.method == "DELETE" or request.status in (304, 409, 412):
        return "free"
    if request.method in ("PUT", "POST") or request.kind == "ListObjectsV2":
        return "A"
    return "B"


def meter(metrics: object) -> collections.Counter[str]:
    """A machine's cost meter, by class."""
    from tenantdb.metrics import Metrics

    assert isinstance(metrics, Metrics)
    counts: collections.Counter[str] = collections.Counter()
    for price_class in ("A", "B", "free"):
        value = metrics.registry.get_sample_value(
            "tenantdb_bucket_requests_total", {"tenant": "idle", "class": price_class}
        )
        counts[price_class] = int(value or 0)
    return counts


async def measure(s3: S3Server, seconds: float, ttl: float, work: Path) -> None:
    """Run the idle holder and standby for ``seconds``; print requests per minute."""
    from example_app import MIGRATIONS
    from tenantdb import TenantDB
    from tenantdb.config import Secret, Settings
    from tenantdb.metrics import Metrics
    from tenantdb.storage import open_bucket
    from tenantdb.storage.metered import MeteredBucket

    base = Settings(
        tenant="idle",
        bucket_name=BUCKET,
        endpoint_url=s3.endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key=Secret("testing"),
        lease_ttl=ttl,
        idle_stop=0,
        metrics_port=0,
    )
    machines = []
    for name in ("holder", "standby"):
        settings = base.with_overrides(machine_id=name, data_dir=work / name)
        metrics = Metrics()
        bucket = MeteredBucket(open_bucket(settings), metrics, tenant="idle")
        await bucket.__aenter__()
        tdb = TenantDB(settings, migrations=MIGRATIONS, bucket=bucket, metrics=metrics)
        await tdb.start(standby=True)
        machines.append((tdb, bucket, metrics))
    (holder, _, holder_metrics), (standby, _, standby_metrics) = machines
    if (holder.state, standby.state) != ("serving", "standby"):
        raise RuntimeError(f"expected a holder and a standby, got {holder!r} and {standby!r}")
    await asyncio.sleep(2 * base.follow_interval + 1)  # the standby's first catch-up is done
    s3.requests(reset=True)
    before = (meter(holder_metrics), meter(standby_metrics))
    await asyncio.sleep(seconds)
    requests = s3.requests(reset=True)
    after = (meter(holder_metrics), meter(standby_metrics))
    for tdb, bucket, _ in reversed(machines):
        await tdb.stop()
        await bucket.__aexit__(None, None, None)

    per_minute = 60 / seconds
    roles = {
        "idle holder": [r for r in requests if r.method != "GET" and r.method != "HEAD"],
        "idle standby": [r for r in requests if r.method in ("GET", "HEAD")],
    }
    meters = {"idle holder": after[0] - before[0], "idle standby": after[1] - before[1]}
    print(f"{seconds:g} s idle, lease TTL {ttl:g} s, standby poll {base.follow_interval:g} s")
    print("| machine | requests/min at the server | billed by Tigris /min | meter /min | $/month |")
    print("|---|---|---|---|---|")
    for role, seen in roles.items():
        kinds = collections.Counter(f"{r.kind} {r.status}" for r in seen)
        billed = collections.Counter(tigris_class(r) for r in seen)
        dollars = sum(billed[c] * PRICE[c] for c in PRICE) * per_minute * MINUTES_PER_MONTH
        described = ", ".join(f"{k} x{v * per_minute:.1f}" for k, v in sorted(kinds.items()))
        counted = meters[role]
        print(
            f"| {role} | {len(seen) * per_minute:.1f} ({described}) "
            f"| A {billed['A'] * per_minute:.1f}, B {billed['B'] * per_minute:.1f} "
            f"| A {counted['A'] * per_minute:.1f}, B {counted['B'] * per_minute:.1f}, "
            f"free {counted['free'] * per_minute:.1f} | {dollars:.2f} |"
        )
    holder_a = sum(1 for r in roles["idle holder"] if tigris_class(r) == "A") * per_minute
    needed = 60 / (ttl / 3)
    print(
        f"ratio: idle holder class A {holder_a:.1f}/min vs one renewal per TTL/3 "
        f"{needed:.1f}/min = {holder_a / needed:.2f}x"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ttl", type=float, default=15.0)
    args = parser.parse_args(argv)
    print(machine())
    with S3Server() as s3, tempfile.TemporaryDirectory() as work:
        s3.create_bucket(BUCKET)
        asyncio.run(measure(s3, args.seconds, args.ttl, Path(work)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
