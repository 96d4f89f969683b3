"""Foreign-tenant routing decisions per second: cached vs uncached lookups vs two `dig` calls.

All three ask the dev DNS responder on loopback (running in a background thread), for tenants
served by one machine each:

- cached:   ``MachineLocator.lookup`` answered from its in-process cache;
- uncached: ``MachineLocator.lookup(use_cache=False)``, an AAAA query over UDP (the
            ``_instances.internal`` TXT list that maps its address to a machine id is shared
            by every tenant and fetched again only when stale or missing the address);
- naive:    what a Node demo does per request, two ``dig`` subprocesses
            (``dig AAAA <name> +short`` then ``dig -x <address> +short``).

The three run alternately in every round, in one process; the medians and ratios are printed,
the ratio line last. Run: ``python -m bench.bench_routing --rounds 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.routing import MachineLocator

APP = "benchapp"
KEY = "customer_id"
TENANTS = [f"tenant{n:03d}" for n in range(50)]


def machine_of(tenant: str) -> str:
    """Return the machine id the bench registers for ``tenant``."""
    return f"m{tenant.removeprefix('tenant')}a"


async def rate(decide: Callable[[str], Awaitable[str | None]], seconds: float, batch: int) -> float:
    """Run ``decide`` over the tenants, one at a time, for ``seconds``; return decisions/s."""
    done = 0
    started = time.perf_counter()
    while True:
        for _ in range(batch):
            tenant = TENANTS[done % len(TENANTS)]
            if await decide(tenant) != machine_of(tenant):
                raise AssertionError(f"wrong machine for {tenant}")
            done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


async def dig(*args: str) -> str:
    """Run ``dig`` once and return its first output line."""
    command = ["dig", *args, "+short", "+tries=1", "+time=1"]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await process.communicate()
    return out.decode().strip().splitlines()[0] if out.strip() else ""


def naive_decider(host: str, port: int) -> Callable[[str], Awaitable[str | None]]:
    """Return the two-`dig`-subprocesses-per-request way of finding the machine."""
    server = [f"@{host}", "-p", str(port)]

    async def decide(tenant: str) -> str | None:
        address = await dig(*server, "AAAA", f"{tenant}.{KEY}.kv._metadata.{APP}.internal")
        if not address:
            return None
        target = await dig(*server, "-x", address)
        return target.split(".", 1)[0] or None

    return decide


async def measure(rounds: int, seconds: float, host: str, port: int) -> dict[str, list[float]]:
    """Run the three ways alternately for ``rounds`` rounds; return decisions/s per way."""
    # A TTL longer than the bench, so "cached" measures cache hits only.
    cached = MachineLocator(APP, KEY, (host, port), positive_ttl=3600)
    uncached = MachineLocator(APP, KEY, (host, port))
    for tenant in TENANTS:
        await cached.lookup(tenant)

    async def fresh(tenant: str) -> str | None:
        return await uncached.lookup(tenant, use_cache=False)

    ways: dict[str, tuple[Callable[[str], Awaitable[str | None]], int]] = {
        "cached": (cached.lookup, 10_000),
        "uncached": (fresh, 50),
        "naive": (naive_decider(host, port), 5),
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    for n in range(1, rounds + 1):
        line = []
        for name, (decide, batch) in ways.items():
            results[name].append(await rate(decide, seconds, batch))
            line.append(f"{name} {results[name][-1]:>12,.0f}/s")
        print(f"round {n}: " + "  ".join(line), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print medians, then the ratios."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_routing", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="seconds per way per round (default 1)"
    )
    args = parser.parse_args(argv)
    if shutil.which("dig") is None:
        print("dig is missing: apt-get install -y dnsutils", file=sys.stderr)
        return 2
    server = DevDNSServer(APP, host="127.0.0.1", port=0)
    for tenant in TENANTS:
        server.set_machine(machine_of(tenant), {KEY: tenant})
    with server.run_in_thread():
        print(
            f"routing decisions per second, {len(TENANTS)} tenants, dev DNS responder on "
            f"127.0.0.1:{server.port}, {args.rounds} rounds of {args.seconds:g}s per way"
        )
        results = asyncio.run(measure(args.rounds, args.seconds, server.host, server.port))
        queries = server.query_count()
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(
        "median decisions/s: "
        + "  ".join(f"{name} {value:,.0f}" for name, value in medians.items())
        + f"  ({queries:,} DNS queries answered)"
    )
    print(
        f"ratios: cached/naive {medians['cached'] / medians['naive']:,.0f}x  "
        f"uncached/naive {medians['uncached'] / medians['naive']:,.1f}x  "
        f"cached/uncached {medians['cached'] / medians['uncached']:,.0f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
