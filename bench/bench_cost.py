"""What a tenant's changes cost in the bucket: bytes and requests, candidate vs baseline.

Against moto's S3 server in its own process (``bench.common.S3Server``, which records every
request with its body size), each variant runs in a child process of its own:
the candidate is this checkout, the baseline the ``--baseline`` commit (a detached git
worktree, put first on the child's ``PYTHONPATH``). Three measurements, each variant alike:

1. **Bytes per minute** at each ``--sizes`` MiB: the tenant grows through its log (1 MiB
   random blobs, one segment each, the daily snapshot default: no snapshot to start from),
   the shipper finishes what the growth left (merges, snapshots) and ``--warmup`` seconds of
   the writes run unmeasured (both reported apart), then ``--rate`` small writes/s (an
   increment of one of 100 counters) for ``--seconds``.
   Every byte sent is counted (``lock.json`` included). Printed: the bytes per minute as a
   share of the database, without and with the snapshots taken (at most one is due: the
   log since the base outgrew the database), and against the distinct changed pages (the
   pages of the single segments published, 4 KiB each).
2. **Requests per write** in ``bucket`` durability at 1, 8 and 32 writers (``--writers``),
   each writing as fast as it is answered for ``--write-seconds``; with the writes per
   second and each write's latency (its commit and the sync the output gate would wait
   for), p50 and p99.
3. **Requests per sync** under ``--rate`` async writes/s: all requests over the segments
   published (lock.json's tail moved by that many).

With ``--rounds N`` the two variants run N times each, alternating, and the medians of
the requests per write and per sync (and their figures) are printed; the bytes are the
first round's. Ratios (candidate/baseline) are printed last. Run:
``python -m bench.bench_cost [--sizes 32 256] [--seconds 60] [--baseline 66195f7]``
(``--sizes`` with no size measures only requests per write and per sync).

``--idle-standby SECONDS`` measures only an idle standby's bucket requests per minute, tail
hints (``TENANTDB_TAIL_HINTS``) off and on in one run: two uvicorn machines of one tenant
(``tests.support.replica_app``, the default TTL of 15 s), nothing written, the standby's own
count (its ``/metrics``) over ``SECONDS``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    CONTROL_PATH,
    ROOT,
    MiB,
    Request,
    S3Server,
    baseline_root,
    child_env,
    machine,
)
from tenantdb.dev.ports import free_port
from tests.support.servers import MachineProcesses

MIGRATIONS = [
    "CREATE TABLE counter (id INTEGER PRIMARY KEY, count INTEGER NOT NULL);"
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 100) "
    "INSERT INTO counter SELECT x, 0 FROM n;"
    "CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB)",
]
INCREMENT = "UPDATE counter SET count = count + 1 WHERE id = ?"


# -- the child: one variant's measurements, printed as one JSON line ------------------------


def requests_now(endpoint: str) -> list[Request]:
    """The requests the server received since the last call (which resets them)."""
    with urllib.request.urlopen(f"{endpoint}{CONTROL_PATH}?reset=1", timeout=600) as response:
        return [Request(**item) for item in json.load(response)]


async def requests(endpoint: str) -> list[Request]:
    """``requests_now`` off the event loop: moto serves one request at a time, and one
    that the blocked loop had begun to send (its body not sent yet) would hold moto, and
    moto this call, for good (a run of 2026-12-07 hung so)."""
    return await asyncio.to_thread(requests_now, endpoint)


def sent_bytes(seen: list[Request]) -> int:
    """Bytes sent to the bucket: the bodies of writes (PUT, POST) and their requests."""
    return sum(r.body_bytes for r in seen if r.method in ("PUT", "POST"))


def settings(env: dict[str, str], work: Path, name: str, **overrides: Any) -> Any:
    from tenantdb.config import Settings

    return Settings.from_env(
        env, tenant=name, machine_id=name, data_dir=work / name, idle_stop=0, **overrides
    )


async def increment(tdb: Any) -> None:
    async with tdb.connection() as db:
        await db.execute(INCREMENT, (random.randint(1, 100),))
        await db.commit()


async def steady(tdb: Any, rate: float, seconds: float) -> int:
    """Increments at ``rate`` per second for ``seconds``; return how many."""
    writes, started = 0, time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        await increment(tdb)
        writes += 1
        await asyncio.sleep(max(0.0, writes / rate - elapsed))
    return writes


async def tail(tdb: Any) -> int:
    record = tdb.lease.record
    return record.log.tail if record is not None and record.log is not None else 0


async def settle(endpoint: str, quiet: float = 5.0, longest: float = 180.0) -> dict[str, Any]:
    """Wait until the shipper wrote no log object nor snapshot for ``quiet`` seconds: what
    the growth left to do (merges, snapshots) is done. Return what it sent meanwhile."""
    started = time.monotonic()
    seen = await requests(endpoint)
    while time.monotonic() - started < longest:
        await asyncio.sleep(quiet)
        more = await requests(endpoint)
        seen += more
        if not any(r.method in ("PUT", "POST") and "/log/" in r.path for r in more) and not any(
            "/snapshots/" in r.path for r in more
        ):
            break
    snapshots = {r.path for r in seen if r.method == "PUT" and "/snapshots/" in r.path}
    return {
        "seconds": time.monotonic() - started,
        "bytes": sent_bytes(seen),
        "snapshots": len(snapshots),
    }


async def packed_segment(bucket: Any, objects: list[Request], index: int) -> bytes | None:
    """Segment ``index`` from the pack uploaded with it, if one was (a baseline has none)."""
    for request in objects:
        name = request.path.rsplit("/", 1)[-1]
        if not name.endswith(".pack"):
            continue
        first, last = (int(n) for n in name.removesuffix(".pack").split("-"))
        if first <= index <= last:
            from tenantdb.replication.packs import decode_pack

            key = request.path.split("/", 2)[2]
            body = (await bucket.get(key)).body
            tenant = key.split("/")[1]
            return decode_pack(body, key=key, tenant=tenant, first=first, last=last)[index - first]
    return None


async def bytes_per_minute(
    env: dict[str, str], work: Path, size_mib: int, rate: float, seconds: float, warmup: float
) -> dict[str, Any]:
    from tenantdb.machine.database import TenantDB
    from tenantdb.replication.segment import decode_segment
    from tenantdb.storage import open_bucket

    endpoint = env["AWS_ENDPOINT_URL_S3"]
    name = f"grown{size_mib}"
    config = settings(env, work, name, durability="async", sync_interval=1.0)
    async with open_bucket(config) as bucket, TenantDB(config, migrations=MIGRATIONS) as tdb:
        for _ in range(size_mib):  # grown through the log: one 1 MiB segment per commit
            async with tdb.connection() as db:
                await db.execute("INSERT INTO blobs (body) VALUES (randomblob(1048576))")
                await db.commit()
            await tdb.sync()
        settled = await settle(endpoint)
        # The growth's last singles are merged once the small writes' push them over
        # MERGE_SINGLES: part of the growth's cost, sent in this warm-up, reported apart.
        await steady(tdb, rate, warmup)
        settled["warmup"] = sent_bytes(await requests(endpoint))
        first = await tail(tdb)
        started = time.monotonic()
        writes = await steady(tdb, rate, seconds)
        await tdb.sync()
        minutes = (time.monotonic() - started) / 60
        seen = await requests(endpoint)
        db_bytes = tdb.path.stat().st_size
        snapshots = [r for r in seen if r.method == "PUT" and "/snapshots/" in r.path]
        lock = sum(r.body_bytes for r in seen if r.method == "PUT" and r.path.endswith("lock.json"))
        objects = [r for r in seen if r.method == "PUT" and "/log/" in r.path]
        changed = 0
        for index in range(first + 1, await tail(tdb) + 1):  # the pages each segment carries
            key = next((r.path for r in objects if r.path.endswith(f"/{index:012d}.seg")), None)
            body = (await bucket.get(key.split("/", 2)[2])).body if key else None
            if body is None:
                body = await packed_segment(bucket, objects, index)
            if body is None:
                record = tdb.lease.record
                log = record.log if record is not None else None
                body = (log.inline_segment(index) if log is not None else None) or b""
            if body:
                segment = decode_segment(body, key=str(index))
                changed += len(segment.pages) * segment.header.page_size
    total = sent_bytes(seen)
    return {
        "db_bytes": db_bytes,
        "writes": writes,
        "minutes": minutes,
        "total": total / minutes,
        "snapshots": sum(r.body_bytes for r in snapshots) / minutes,
        "snapshot_count": len({r.path for r in snapshots}),
        "settle": settled,
        "lock": lock / minutes,
        "largest_object": max((r.body_bytes for r in objects), default=0),
        "changed": changed / minutes,
        "requests": len(seen) / minutes,
    }


async def past_first_collection() -> None:
    """Wait out the garbage collection a new holder makes once, a sync interval in (a LIST
    and a few GETs per holding, not per write)."""
    await asyncio.sleep(1.5)


async def per_write(
    env: dict[str, str], work: Path, writers: int, seconds: float
) -> dict[str, float]:
    """Requests per write, and each write's latency (commit to durable), at ``writers``."""
    from tenantdb.machine.database import TenantDB

    endpoint = env["AWS_ENDPOINT_URL_S3"]
    config = settings(env, work, f"writers{writers}", durability="bucket")
    async with TenantDB(config, migrations=MIGRATIONS) as tdb:
        await increment(tdb)
        await past_first_collection()
        await requests(endpoint)
        took: list[float] = []
        started = time.monotonic()
        deadline = started + seconds

        async def writer() -> None:
            while (began := time.monotonic()) < deadline:
                await increment(tdb)
                await tdb.sync()  # what the output gate does before answering a write
                took.append(time.monotonic() - began)

        await asyncio.gather(*(writer() for _ in range(writers)))
        elapsed = time.monotonic() - started
        seen = await requests(endpoint)
    percentiles = statistics.quantiles(took, n=100)
    return {
        "requests": len(seen) / len(took),
        "writes_per_s": len(took) / elapsed,
        "p50_ms": statistics.median(took) * 1000,
        "p99_ms": percentiles[98] * 1000,
    }


async def per_sync(env: dict[str, str], work: Path, rate: float, seconds: float) -> float:
    from tenantdb.machine.database import TenantDB

    endpoint = env["AWS_ENDPOINT_URL_S3"]
    config = settings(env, work, "async", durability="async", sync_interval=1.0)
    async with TenantDB(config, migrations=MIGRATIONS) as tdb:
        await increment(tdb)
        await tdb.sync()
        await past_first_collection()
        await requests(endpoint)
        first = await tail(tdb)
        await steady(tdb, rate, seconds)
        await tdb.sync()
        seen = await requests(endpoint)
        syncs = await tail(tdb) - first
    return len(seen) / max(syncs, 1)


async def child(args: argparse.Namespace) -> None:
    import tenantdb

    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {"tenantdb": str(Path(tenantdb.__file__).parent.parent)}
        result["bytes"] = {
            str(size): await bytes_per_minute(env, work, size, args.rate, args.seconds, args.warmup)
            for size in args.sizes
        }
        result["per_write"] = {
            str(n): await per_write(env, work, n, args.write_seconds) for n in args.writers
        }
        result["per_sync"] = await per_sync(env, work, args.rate, args.write_seconds)
    print(json.dumps(result), flush=True)


# -- the parent: both variants, then the table and the ratios -------------------------------


def run_variant(s3: S3Server, bucket: str, root: Path, args: argparse.Namespace) -> Any:
    s3.create_bucket(bucket)
    env = child_env({**s3.settings_env(bucket), "PYTHONPATH": str(root)})
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--sizes"]
    argv += [str(size) for size in args.sizes]
    argv += ["--seconds", str(args.seconds), "--rate", str(args.rate)]
    argv += ["--write-seconds", str(args.write_seconds), "--warmup", str(args.warmup)]
    argv += ["--writers", *(str(n) for n in args.writers)]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {root} variant failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["tenantdb"]).resolve() != root.resolve():
        raise RuntimeError(f"the child imported tenantdb from {result['tenantdb']}, not {root}")
    return result


def combine(rounds: list[Any]) -> Any:
    """One variant's rounds as one result: the medians of the requests per write and per
    sync and of their figures, the bytes of the first round."""
    result = dict(rounds[0])
    result["per_write"] = {
        n: {key: statistics.median(r["per_write"][n][key] for r in rounds) for key in figures}
        for n, figures in rounds[0]["per_write"].items()
    }
    result["per_sync"] = statistics.median(r["per_sync"] for r in rounds)
    return result


def share(value: float, whole: float) -> str:
    return f"{value / MiB:.3f} MiB ({value / whole:.2%})"


def report(name: str, result: Any, args: argparse.Namespace) -> None:
    print(f"\n{name} ({result['tenantdb']}):")
    for size, b in result["bytes"].items():
        steady = b["total"] - b["snapshots"]
        print(
            f"  {size} MiB grown through the log, {b['writes']} increments in "
            f"{b['minutes'] * 60:.0f} s; per minute: sent {share(b['total'], b['db_bytes'])}, "
            f"of which {b['snapshot_count']} snapshot(s) {b['snapshots'] / MiB:.3f} MiB and "
            f"lock.json {b['lock'] / MiB:.3f} MiB; without snapshots "
            f"{share(steady, b['db_bytes'])}; distinct changed pages {b['changed'] / MiB:.3f} MiB "
            f"(sent/changed without snapshots {steady / max(b['changed'], 1):.2f}x); largest "
            f"log object {b['largest_object'] / MiB:.3f} MiB; {b['requests']:.0f} requests/min"
        )
        print(
            f"    (after the growth, before the writes: {b['settle']['seconds']:.0f} s until "
            f"the shipper was quiet, {b['settle']['bytes'] / MiB:.1f} MiB sent, "
            f"{b['settle']['snapshots']} snapshot(s); then {args.warmup:g} s of the writes "
            f"unmeasured: {b['settle']['warmup'] / MiB:.1f} MiB sent)"
        )
    print("  bucket durability, each writer writing as fast as it is answered:")
    for n, w in result["per_write"].items():
        print(
            f"    {n} writers: {w['requests']:.3f} requests per write "
            f"({1 / w['requests']:.1f} writes per request), {w['writes_per_s']:.0f} writes/s, "
            f"latency p50 {w['p50_ms']:.1f} ms, p99 {w['p99_ms']:.1f} ms"
        )
    print(f"  requests per sync, {args.rate:g} async writes/s: {result['per_sync']:.3f}")


def standby_requests(metrics_port: int) -> float:
    """Every bucket request a machine made so far, from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    prefix = "tenantdb_bucket_requests_total{"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def idle_standby(s3: S3Server, seconds: float, hints: bool) -> float:
    """An idle standby's bucket requests per minute, with tail hints on or off."""
    bucket = s3.create_bucket(f"bench-idle-standby-{'on' if hints else 'off'}")
    env = child_env(
        {
            **s3.settings_env(bucket),
            "TENANTDB_IDLE_STOP": "0",
            "TENANTDB_METRICS_PORT": "0",
            "TENANTDB_TAIL_HINTS": "1" if hints else "0",
            # Machine ids are ports: the hint URL names the holder as Fly's private DNS would.
            "TENANTDB_HINT_URL": "http://127.0.0.1:{machine_id}",
        }
    )
    app = "tests.support.replica_app:app"
    with tempfile.TemporaryDirectory() as tmp, MachineProcesses(Path(tmp)) as machines:
        holder_port, standby_port, metrics_port = free_port(), free_port(), free_port()
        machines.start(app, str(holder_port), "acme", env, port=holder_port)
        standby_env = {**env, "TENANTDB_METRICS_PORT": str(metrics_port)}
        standby = machines.start(app, str(standby_port), "acme", standby_env, port=standby_port)
        time.sleep(5)  # the standby restored its copy and settled
        before = standby_requests(metrics_port)
        time.sleep(seconds)
        made = standby_requests(metrics_port) - before
        for line in standby.log().splitlines():
            if "tail hints" in line:
                print(f"  standby: {line}")
        return made * 60 / seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with --child, one variant's measurements)."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_cost")
    parser.add_argument("--sizes", type=int, nargs="*", default=[32, 256])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--write-seconds", type=float, default=15.0)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--baseline", default="66195f7")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--idle-standby", type=float, metavar="SECONDS")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(child(args))
        return 0
    if args.idle_standby:
        with S3Server() as s3:
            off = idle_standby(s3, args.idle_standby, hints=False)
            on = idle_standby(s3, args.idle_standby, hints=True)
        print(
            f"idle standby, bucket requests/min over {args.idle_standby:g} s: tail hints off "
            f"{off:.1f}, on {on:.1f} (goal <= 4); on/off {on / off:.3f}"
        )
        print(machine())
        return 0
    started = time.monotonic()
    roots = {"candidate": ROOT, "baseline": baseline_root(args.baseline)}
    rounds: dict[str, list[Any]] = {name: [] for name in roots}
    with S3Server() as s3:
        for n in range(args.rounds):
            # Alternating, so that a change in the machine's load falls on both alike.
            for name in list(roots) if n % 2 == 0 else list(roots)[::-1]:
                rounds[name].append(run_variant(s3, f"bench-cost-{name}-{n}", roots[name], args))
    candidate, baseline = combine(rounds["candidate"]), combine(rounds["baseline"])
    report("candidate", candidate, args)
    report(f"baseline {args.baseline}", baseline, args)
    print(f"\n{machine()}; took {time.monotonic() - started:.0f} s")
    for size in candidate["bytes"]:
        c, b = candidate["bytes"][size], baseline["bytes"][size]
        steady_c, steady_b = c["total"] - c["snapshots"], b["total"] - b["snapshots"]
        print(
            f"ratio ({size} MiB): bytes/min candidate/baseline {c['total'] / b['total']:.3f}x, "
            f"without snapshots {steady_c / steady_b:.3f}x; candidate "
            f"{steady_c / c['db_bytes']:.2%} of the database (goal <= "
            f"{'3%' if int(size) <= 32 else '0.5%'}), {steady_c / max(c['changed'], 1):.2f}x the "
            f"changed pages (goal <= 2x)"
        )
    for n, c in candidate["per_write"].items():
        b = baseline["per_write"][n]
        print(
            f"ratio ({n} writers): requests per write {c['requests']:.3f} vs "
            f"{b['requests']:.3f} ({c['requests'] / b['requests']:.3f}x), writes/s "
            f"{c['writes_per_s'] / b['writes_per_s']:.3f}x, latency p50 "
            f"{c['p50_ms'] / b['p50_ms']:.3f}x, p99 {c['p99_ms'] / b['p99_ms']:.3f}x"
        )
    print(
        f"ratio: requests per sync candidate {candidate['per_sync']:.3f} vs baseline "
        f"{baseline['per_sync']:.3f} (goal <= 1.05)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
