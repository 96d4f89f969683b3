"""Durability: the demo's increment in ``bucket`` durability vs ``async``, on a 20 ms S3.

Two uvicorn processes serve ``example_app:app`` (two tenants, two data directories) on one
moto S3 server reached through the tests' fault proxy, which holds every S3 request
``--latency-ms`` (20 ms: about a regional object store's PUT) before forwarding it:

- candidate: ``TENANTDB_DURABILITY=bucket``: each answer that follows a commit waits until
  the bucket has the commit (one segment PUT and one ``lock.json`` CAS, shared by every
  request waiting: group commit);
- baseline: ``TENANTDB_DURABILITY=async``: answers at once, ships every second.

``wrk`` (one thread, keep-alive) drives ``GET /customers/<tenant>`` at each of
``--concurrency`` (1, 8, 32, 128 clients), the two servers alternating over the rounds.
Printed per level: requests/s, p50/p99 latency, S3 requests per acknowledged write, and
writes per uploaded segment (bucket); then the ratio lines: bucket/async throughput, and
bucket p99 against async p99 + 3 upload round trips (the round trip is measured: a PUT
through the proxy, median of 20). Run: ``python -m bench.bench_durability``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.bench_overhead import Server, run_wrk
from bench.common import S3Server, alternate, machine, median
from tests.support.fault_proxy import Fault, FaultProxy

BUCKET = "bench-durability"
MODES = ("bucket", "async")
GOALS = {128: 0.7, 32: 0.3}  # bucket/async throughput at that many clients
GOAL_WRITES_PER_UPLOAD_32 = 10.0


def upload_round_trip(s3: S3Server, proxy: FaultProxy) -> float:
    """Median seconds of one small PUT through the proxy (what one upload costs)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=proxy.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    times = []
    for n in range(20):
        started = time.perf_counter()
        client.put_object(Bucket=BUCKET, Key=f"probe/{n}", Body=b"x" * 8192)
        times.append(time.perf_counter() - started)
    client.close()
    return median(times)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table and ratio lines."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_durability")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    with (
        S3Server() as s3,
        FaultProxy(s3.endpoint, seed=1) as proxy,
        tempfile.TemporaryDirectory(prefix="bench-durability-") as tmp,
    ):
        s3.create_bucket(BUCKET)
        proxy.add(Fault.delay(args.latency_ms / 1000))
        rtt = upload_round_trip(s3, proxy)
        print(f"one upload round trip through the proxy: {rtt * 1000:.1f} ms")
        work = Path(tmp)
        env = {**s3.settings_env(BUCKET), "AWS_ENDPOINT_URL_S3": proxy.url}
        servers = {
            mode: Server(
                mode,
                "example_app:app",
                {
                    **env,
                    "TENANT_ID": f"bench-{mode}",
                    "FLY_MACHINE_ID": f"bench-{mode}",
                    "TENANTDB_DATA_DIR": str(work / mode),
                    "TENANTDB_DURABILITY": mode,
                },
                work / f"{mode}.log",
            )
            for mode in MODES
        }
        try:
            for server in servers.values():
                server.wait_ready()
            table = {}
            for clients in args.concurrency:
                table[clients] = measure(servers, s3, clients, args)
        finally:
            for server in servers.values():
                server.stop()
    print("\nclients  mode    writes/s   p50 ms   p99 ms  S3 req/write  writes/upload")
    for clients, rows in table.items():
        for mode in MODES:
            row = rows[mode]
            per_upload = f"{row['per_upload']:13.1f}" if mode == "bucket" else f"{'':>13}"
            print(
                f"{clients:>7}  {mode:<6} {row['rate']:>9,.0f} {row['p50']:>8.1f} "
                f"{row['p99']:>8.1f} {row['s3_per_write']:>13.2f} {per_upload}"
            )
    bound = 3 * rtt * 1000
    print(f"\np99 bound: async p99 + 3 upload round trips ({bound:.0f} ms)")
    ratios = []
    for clients, rows in table.items():
        ratio = rows["bucket"]["rate"] / rows["async"]["rate"]
        goal = GOALS.get(clients)
        p99_ok = rows["bucket"]["p99"] <= rows["async"]["p99"] + bound
        mark = f" (goal {goal})" if goal else ""
        print(
            f"{clients} clients: bucket/async throughput {ratio:.2f}{mark}, bucket p99 "
            f"{rows['bucket']['p99']:.0f} ms vs bound "
            f"{rows['async']['p99'] + bound:.0f} ms: {'ok' if p99_ok else 'OVER'}"
        )
        ratios.append(f"{clients}c {ratio:.2f}")
    writes_32 = table.get(32, {}).get("bucket", {}).get("per_upload")
    if writes_32 is not None:
        print(
            f"writes per upload at 32 clients: {writes_32:.1f} (goal {GOAL_WRITES_PER_UPLOAD_32})"
        )
    print("bucket/async throughput: " + ", ".join(ratios))
    return 0


def measure(
    servers: dict[str, Server], s3: S3Server, clients: int, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Load each server at ``clients`` for the rounds; medians of rate and latency."""
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    p50: dict[str, list[float]] = {mode: [] for mode in MODES}
    p99: dict[str, list[float]] = {mode: [] for mode in MODES}
    writes = dict.fromkeys(MODES, 0)
    requests = dict.fromkeys(MODES, 0)
    segments = dict.fromkeys(MODES, 0)
    for mode in MODES:  # warm-up, and the first visit waits for the new tenant
        run_wrk(f"{servers[mode].url}/customers/bench-{mode}", 1.0, clients)
    for _n, order in alternate(args.rounds, MODES):
        for mode in order:
            s3.requests(reset=True)
            result = run_wrk(f"{servers[mode].url}/customers/bench-{mode}", args.seconds, clients)
            if result["failures"]:
                raise RuntimeError(f"{mode}: {result['failures']:.0f} requests failed")
            # Requests made during the run, or shortly after for async's last sync.
            seen = s3.requests(reset=True)
            rates[mode].append(result["ok"] / result["seconds"])
            p50[mode].append(result["p50_ms"])
            p99[mode].append(result["p99_ms"])
            writes[mode] += int(result["ok"])
            requests[mode] += len(seen)
            segments[mode] += sum(
                1 for r in seen if r.kind == "PutObject" and r.path.endswith(".seg")
            )
    rows = {
        mode: {
            "rate": median(rates[mode]),
            "p50": median(p50[mode]),
            "p99": median(p99[mode]),
            "s3_per_write": requests[mode] / max(writes[mode], 1),
            "per_upload": writes[mode] / max(segments[mode], 1),
        }
        for mode in MODES
    }
    print(
        f"{clients} clients: "
        + "  ".join(
            f"{mode} {rows[mode]['rate']:,.0f}/s p50 {rows[mode]['p50']:.1f} ms "
            f"p99 {rows[mode]['p99']:.1f} ms"
            for mode in MODES
        ),
        flush=True,
    )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
