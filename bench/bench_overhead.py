"""Request overhead: the counter demo with TenantDBMiddleware vs the same app without it.

Over HTTP, uvicorn processes serve on loopback (all with ``--no-access-log``):

- candidates: ``example_app:app``, the counter demo behind ``TenantDBMiddleware`` (this
  machine's tenant, embedded local bucket, ``async`` durability: the cost of waiting for
  the bucket is ``bench_durability``'s subject), once per ``--pool-sizes``
  entry (``TENANTDB_POOL_SIZE``; default ``8,1``: the default pool, and a single
  connection). The first one is the figure; it runs once more with log shipping off
  (``TENANTDB_SYNC_INTERVAL`` of a day), for the cost of shipping;
- baseline: ``bench.bench_overhead:baseline_app``, the same Starlette routes and the same
  ``visit`` handler, with one aiosqlite connection (same PRAGMAs) opened in its lifespan
  and used by one request at a time (an ``asyncio.Lock``: see ``serialized_visit``).

All answer ``GET /customers/bench`` with ``UPDATE counter ... RETURNING count`` + commit.
The load generator (``wrk -t1 -c32``, or a raw asyncio HTTP/1.1 keep-alive client when
wrk is missing or with ``--client asyncio``) keeps 32 requests in flight on each server in
turn, the order alternating over the rounds; every request must answer 200 and count.

In process, without HTTP, the middleware's own cost is measured: calling it with a
prepared scope and a trivial inner app (which only sends a 2-byte response) against
calling the trivial app directly, in alternating chunks of 1,000 calls, in µs per
request; the pool's acquire+release alone, and again while another borrower holds a
connection throughout (the ratio of the two: a long holder must not slow the others down);
and a FastAPI route taking the connection
from ``Depends(tenant_db)`` (a plain function, which FastAPI runs in a worker thread)
against ``Depends(tenant_db_dependency)`` (async, on the event loop). Medians are
printed, the ratio line last.
Run: ``python -m bench.bench_overhead``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from bench.common import ROOT, alternate, child_env, machine, median
from example_app.app import MIGRATIONS, visit
from tests.support.servers import UvicornProcess

TENANT = "bench"
PATH = f"/customers/{TENANT}"
GOAL_RATIO = 0.97
GOAL_MIDDLEWARE_US = 10.0
# A borrow beside a long holder against one with nothing held (before: 101 ms against 0.05).
GOAL_HELD_RATIO = 2.0
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000")


# -- the baseline app: one connection of its own, opened in its lifespan ----------------------


def _create_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            conn.executescript(f"{MIGRATIONS[0]}; PRAGMA user_version = 1;")
    finally:
        conn.close()


async def _open(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path)
    for pragma in PRAGMAS:  # what ConnectionPool sets on each of its connections
        await conn.execute(pragma)
    return conn


@contextlib.asynccontextmanager
async def _baseline_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    path = Path(os.environ["BENCH_BASELINE_DB"])
    _create_schema(path)
    db = await _open(path)
    try:
        # Lifespan state reaches every request as request.state.db / .tenant, so the demo's
        # own ``visit`` handler runs unchanged.
        yield {"db": db, "tenant": TENANT, "lock": asyncio.Lock()}
    finally:
        await db.close()


async def serialized_visit(request: Request) -> Response:
    """The demo's ``visit``, one request at a time on the one connection.

    Without the lock, concurrent requests interleave on the shared connection and about a
    third of them fail with "cannot commit transaction - SQL statements in progress" (one
    request's commit lands while another's ``RETURNING`` cursor is still open).
    """
    async with request.state.lock:
        return await visit(request)


async def healthz(request: Request) -> Response:
    """What the middleware answers at /healthz, for the baseline without it."""
    return PlainTextResponse("ok\n")


baseline_app = Starlette(
    routes=[Route("/healthz", healthz), Route("/customers/{tenant}", serialized_visit)],
    lifespan=_baseline_lifespan,
)


# -- servers and load --------------------------------------------------------------------------


class Server(UvicornProcess):
    """``uvicorn <app>`` on loopback in its own process, access log off."""

    def __init__(self, name: str, app: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        super().__init__(
            app,
            child_env(env),
            log,
            uvicorn_args=["--no-access-log", "--log-level", "warning"],
            inherit_environ=False,
        )

    def count(self) -> int:
        request = urllib.request.Request(
            f"{self.url}{PATH}", headers={"Accept": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(json.load(response)["count"])


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    """One ``wrk`` run: requests, seconds, failures, p50/p99/max latency in ms."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            "--timeout",
            "30s",
            "--latency",
            "-H",
            "Accept: application/json",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    latency = re.search(r"Latency\s+[\d.]+\w+\s+[\d.]+\w+\s+([\d.]+)(us|ms|s|m)\b", out)
    p50 = re.search(r"\b50%\s+([\d.]+)(us|ms|s|m)\b", out)
    p99 = re.search(r"\b99%\s+([\d.]+)(us|ms|s|m)\b", out)
    if not (match and latency and p50 and p99):
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    not_ok = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failures = not_ok + (sum(int(n) for n in errors.groups()) if errors else 0)
    return {
        "ok": int(match[1]) - not_ok,
        "seconds": float(match[2]) / (1000 if match[3] == "ms" else 1),
        "failures": failures,
        "p50_ms": _ms(p50[1], p50[2]),
        "p99_ms": _ms(p99[1], p99[2]),
        "max_ms": _ms(latency[1], latency[2]),
    }


async def _asyncio_load(host: str, port: int, requests: int, concurrency: int) -> dict[str, float]:
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    left = requests
    failures = 0
    latencies: list[float] = []

    async def client() -> None:
        nonlocal left, failures
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while left > 0:
                left -= 1
                sent = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    failures += 1
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                latencies.append((time.perf_counter() - sent) * 1e3)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "ok": requests - failures,
        "seconds": elapsed,
        "failures": failures,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[int(len(latencies) * 0.99)],
        "max_ms": latencies[-1],
    }


def run_asyncio_client(url: str, requests: int, concurrency: int) -> dict[str, float]:
    """The raw asyncio keep-alive client, in its own process (as wrk would be)."""
    host, port = url.removeprefix("http://").split(":")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_overhead",
            "--load",
            f"{host}:{port}",
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def candidate_name(pool_size: int) -> str:
    """The label of the candidate server with that pool size."""
    return f"tenantdb pool {pool_size}"


BASELINE = "own connection"
# The first candidate again, with log shipping left off (a sync interval of a day).
NO_SHIPPING = "tenantdb, shipping off"


def http_rounds(
    args: argparse.Namespace, client: str
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Serve the apps, load them alternately; return requests/s per round, and requests."""
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = Path(tmp)
        servers: dict[str, Server] = {}
        for size in args.pool_sizes:
            name = candidate_name(size)
            servers[name] = Server(
                name,
                "example_app:app",
                {
                    "TENANT_ID": TENANT,
                    "TENANTDB_DATA_DIR": str(work / f"data-{size}"),
                    "TENANTDB_LOCAL_BUCKET": str(work / f"bucket-{size}"),
                    "TENANTDB_POOL_SIZE": str(size),
                    "FLY_MACHINE_ID": "bench-machine",
                    "TENANTDB_DURABILITY": "async",
                },
                work / f"candidate-{size}.log",
            )
        servers[NO_SHIPPING] = Server(
            NO_SHIPPING,
            "example_app:app",
            {
                "TENANT_ID": TENANT,
                "TENANTDB_DATA_DIR": str(work / "data-no-shipping"),
                "TENANTDB_LOCAL_BUCKET": str(work / "bucket-no-shipping"),
                "TENANTDB_POOL_SIZE": str(args.pool_sizes[0]),
                "TENANTDB_SYNC_INTERVAL": "86400",
                "FLY_MACHINE_ID": "bench-machine",
                "TENANTDB_DURABILITY": "async",
            },
            work / "candidate-no-shipping.log",
        )
        servers[BASELINE] = Server(
            BASELINE,
            "bench.bench_overhead:baseline_app",
            {"BENCH_BASELINE_DB": str(work / "baseline.sqlite3")},
            work / "baseline.log",
        )
        rates: dict[str, list[float]] = {name: [] for name in servers}
        sent = dict.fromkeys(servers, 0)
        failed = dict.fromkeys(servers, 0)
        p99: dict[str, list[float]] = {name: [] for name in servers}
        worst = dict.fromkeys(servers, 0.0)
        try:
            for server in servers.values():
                server.wait_ready()
            before = {name: server.count() for name, server in servers.items()}

            def load(server: Server, seconds: float) -> dict[str, float]:
                if client == "wrk":
                    return run_wrk(f"{server.url}{PATH}", seconds, args.concurrency)
                return run_asyncio_client(server.url, args.requests, args.concurrency)

            for server in servers.values():  # warm-up: imports, pool, page cache
                load(server, 1.0)
            for n, order in alternate(args.rounds, list(servers)):
                line = []
                for name in order:
                    result = load(servers[name], args.seconds)
                    ok = int(result["ok"])
                    rates[name].append(ok / result["seconds"])
                    sent[name] += ok
                    failed[name] += int(result["failures"])
                    p99[name].append(result["p99_ms"])
                    worst[name] = max(worst[name], result["max_ms"])
                    failures = f", {result['failures']:.0f} FAILED" if result["failures"] else ""
                    line.append(
                        f"{name} {rates[name][-1]:>6,.0f}/s (p99 {result['p99_ms']:.0f} ms, "
                        f"max {result['max_ms']:.0f} ms{failures})"
                    )
                print(f"round {n}: " + "  ".join(line), flush=True)
            after = {name: server.count() for name, server in servers.items()}
            for name in servers:
                # Every measured request was a committed increment (warm-up ones too).
                if after[name] - before[name] < sent[name]:
                    raise RuntimeError(f"{name}: {after[name] - before[name]} increments")
        finally:
            for server in servers.values():
                server.stop()
    for name in servers:
        print(
            f"{name}: {sent[name]:,} requests answered, {failed[name]} failed, median p99 "
            f"{median(p99[name]):.0f} ms, slowest {worst[name]:,.0f} ms"
        )
    return rates, sent


# -- in process ----------------------------------------------------------------------------

_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
_BODY = {"type": "http.response.body", "body": b"ok"}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


async def _lifespan_app(scope: Any, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def trivial_app(scope: Any, receive: Any, send: Any) -> None:
    """The inner app: answers ``ok`` and nothing else."""
    if scope["type"] == "lifespan":
        await _lifespan_app(scope, receive, send)
        return
    await send(_START)
    await send(_BODY)


def http_scope() -> dict[str, Any]:
    """A prepared ASGI scope for ``GET /customers/bench``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"accept", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[None]:
    """Drive an ASGI app's lifespan: startup on entry, shutdown on exit."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(app({"type": "lifespan", "state": {}}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup: {started}")
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


async def interleaved(
    ways: dict[str, Callable[[], Awaitable[None]]], calls: int, chunk: int
) -> dict[str, float]:
    """µs per call of each way: ``calls`` sequential calls each, in alternating chunks.

    Alternating every ``chunk`` calls makes the ways share whatever the (shared, noisy)
    machine is doing at the time.
    """
    spent = dict.fromkeys(ways, 0.0)
    names = list(ways)
    chunks = max(1, calls // chunk)
    for index in range(chunks):
        for name in names if index % 2 == 0 else reversed(names):
            call = ways[name]
            started = time.perf_counter()
            for _ in range(chunk):
                await call()
            spent[name] += time.perf_counter() - started
    return {name: spent[name] / (chunks * chunk) * 1e6 for name in names}


def _settings(work: Path, name: str) -> Any:
    from tenantdb.config import Settings

    return Settings(
        tenant=TENANT,
        data_dir=work / name / "data",
        local_bucket_dir=work / name / "bucket",
        machine_id="bench-machine",
        checkpoint_interval=0,
    )


async def in_process(rounds: int, calls: int) -> dict[str, list[float]]:
    """The middleware's own cost (trivial inner app), the pool's acquire+release, and the
    FastAPI dependency's."""
    from tenantdb import TenantDBMiddleware, tenant_db, tenant_db_dependency
    from tenantdb.asgi.lending import RequestConnection

    results: dict[str, list[float]] = {}

    def record(figures: dict[str, float]) -> None:
        for name, value in figures.items():
            results.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = Path(tmp)
        scope = http_scope()
        # 1. The middleware around a trivial app, against the trivial app alone.
        plain = TenantDBMiddleware(
            trivial_app, migrations=MIGRATIONS, settings=_settings(work, "a")
        )
        async with running(plain):
            tdb = plain.tenantdb
            assert tdb is not None
            pool = tdb.pool

            async def direct() -> None:
                await trivial_app(scope, _receive, _send)

            async def through() -> None:
                await plain(scope, _receive, _send)

            async def borrow() -> None:
                await pool.release(await pool.acquire())

            # 2. A FastAPI route taking the connection as a dependency: a plain function
            # (tenant_db, run in a worker thread) against the async one. The route never
            # runs a statement, so the request's connection borrows nothing.
            with_db = {**scope, "state": {"db": RequestConnection(pool, track_commits=False)}}
            by_thread = fastapi_app(tenant_db)
            on_loop = fastapi_app(tenant_db_dependency)

            async def fastapi_thread() -> None:
                await by_thread(with_db, _receive, _send)

            async def fastapi_loop() -> None:
                await on_loop(with_db, _receive, _send)

            ways: dict[str, Callable[[], Awaitable[None]]] = {
                "direct": direct,
                "through": through,
                "borrow": borrow,
                "fastapi_thread": fastapi_thread,
                "fastapi_loop": fastapi_loop,
            }
            await interleaved(ways, calls // 10, 1000)  # warm-up
            for _ in range(rounds):
                record(await interleaved(ways, calls, 1000))
            # 3. The same borrows while another borrower holds a connection throughout (a
            # websocket, a streamed response, a background task): it must cost them nothing.
            holder = await pool.acquire()
            await asyncio.sleep(pool.grow_after)  # a long holder by now
            try:
                for _ in range(rounds):
                    beside = await interleaved({"borrow": borrow}, calls // 10, 1000)
                    record({"borrow_beside_holder": beside["borrow"]})
            finally:
                await pool.release(holder)
    return results


def fastapi_app(dependency: Callable[..., Any]) -> Any:
    """A FastAPI app whose one route takes the tenant's connection from ``dependency``."""
    from fastapi import Depends, FastAPI

    app = FastAPI()

    @app.get(PATH)
    async def route(db: aiosqlite.Connection = Depends(dependency)) -> Response:  # noqa: B008
        return Response(b"ok")

    return app


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print medians, then the ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_overhead", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="wrk seconds per server per round (default 5)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=10_000,
        help="requests per server per round with the asyncio client (default 10000)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    parser.add_argument(
        "--client",
        choices=["auto", "wrk", "asyncio"],
        default="auto",
        help="load generator: wrk if installed (auto), or the raw asyncio client",
    )
    parser.add_argument(
        "--calls", type=int, default=20_000, help="in-process calls per round (default 20000)"
    )
    parser.add_argument(
        "--pool-sizes",
        default="8,1",
        help="TENANTDB_POOL_SIZE of each candidate; the first is the figure (default 8,1)",
    )
    parser.add_argument("--skip-http", action="store_true", help="in-process figures only")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        host, port = args.load.split(":")
        result = asyncio.run(_asyncio_load(host, int(port), args.requests, args.concurrency))
        print(json.dumps(result), flush=True)
        return 0
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "asyncio"
    elif client == "wrk" and not shutil.which("wrk"):
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        return 2

    args.pool_sizes = [int(size) for size in args.pool_sizes.split(",")]
    main_pool = args.pool_sizes[0]

    print(f"request overhead of TenantDBMiddleware, {args.rounds} rounds")
    print(f"machine: {machine()}")
    local = asyncio.run(in_process(args.rounds, args.calls))
    med = {name: median(values) for name, values in local.items()}
    mw_us = med["through"] - med["direct"]
    print(
        f"in process, median µs/request: trivial app {med['direct']:.2f}, through the "
        f"middleware {med['through']:.2f} -> middleware {mw_us:.2f} µs "
        f"(of which pool acquire+release {med['borrow']:.2f} µs)"
    )
    print(
        f"in process, FastAPI route, median µs/request: Depends(tenant_db) "
        f"{med['fastapi_thread']:.2f} (a worker thread), Depends(tenant_db_dependency) "
        f"{med['fastapi_loop']:.2f} (the event loop) -> "
        f"{med['fastapi_thread'] - med['fastapi_loop']:.2f} µs saved"
    )
    held = med["borrow_beside_holder"] / med["borrow"]
    print(
        f"in process, pool acquire+release with one connection held elsewhere: "
        f"{med['borrow_beside_holder']:.2f} µs -> ratio: beside a holder/alone {held:.2f} "
        f"(goal <= {GOAL_HELD_RATIO:g}): {'met' if held <= GOAL_HELD_RATIO else 'MISSED'}"
    )
    mw_met = mw_us < GOAL_MIDDLEWARE_US
    if args.skip_http:
        print(
            f"ratio: middleware cost {mw_us:.2f} µs/request (goal < {GOAL_MIDDLEWARE_US:g}): "
            f"{'met' if mw_met else 'MISSED'}"
        )
        return 0
    what = (
        f"wrk -t1 -c{args.concurrency} -d{args.seconds:g}s"
        if client == "wrk"
        else f"asyncio client, {args.requests:,} requests, {args.concurrency} in flight"
    )
    print(f"over HTTP (uvicorn, loopback), {what}, per server per round:")
    rates, sent = http_rounds(args, client)
    medians = {name: median(values) for name, values in rates.items()}
    base = medians[BASELINE]
    print(
        "median requests/s: "
        + "  ".join(f"{k} {v:,.0f} ({sent[k]:,} requests in all)" for k, v in medians.items())
    )
    others = "  ".join(
        f"pool {size}: {medians[candidate_name(size)] / base:.3f}" for size in args.pool_sizes[1:]
    )
    ratio = medians[candidate_name(main_pool)] / base
    shipping = medians[candidate_name(main_pool)] / medians[NO_SHIPPING]
    print(f"ratio: shipping on/off requests/s {shipping:.3f} (goal >= 0.95)")
    met = ratio >= GOAL_RATIO and mw_met
    print(
        f"ratio: middleware (pool {main_pool})/own-connection requests/s {ratio:.3f} "
        f"(goal >= {GOAL_RATIO}){'  [' + others + ']' if others else ''}; middleware cost "
        f"{mw_us:.2f} µs/request (goal < {GOAL_MIDDLEWARE_US:g}): {'met' if met else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
