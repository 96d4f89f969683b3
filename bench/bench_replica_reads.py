"""What a read served by a replica costs: this code's replica beside a ``--baseline``
commit's, both following one holder, in the same run.

Three uvicorn machines of one tenant (``tests.support.replica_app``, the embedded bucket):
m1 holds it with ``--rows`` notes; m2 runs this checkout and m3 the baseline's (from a git
worktree), both with replica reads on. In each round (ABBA order) ``--clients`` clients
send ``--reads`` point reads (``GET /customers/acme/notes?token=...``, no bookmark) to one
replica and then the other, straight to it; every answer must come from that replica. With
``--writes-per-s`` m1 takes writes meanwhile (the copies change under the reads).

Printed per replica: read p50 / p99 over all rounds, reads a second, and the CPU seconds
its process used per 1,000 reads; then this code / baseline. Run:
``python -m bench.bench_replica_reads --baseline <commit>``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.bench_replicas import APP, NOTES, machine_env, percentile
from bench.common import ROOT, alternate, baseline_root, machine
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.dev.ports import free_port
from tests.support.servers import MachineProcesses, UvicornProcess


def cpu_seconds(server: UvicornProcess) -> float:
    """User and system CPU seconds the server's process used so far."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ)


async def read_from(
    url: str, expected: str, tokens: list[str], reads: int, clients: int
) -> tuple[list[float], float]:
    """Send ``reads`` point reads to ``url`` from ``clients`` clients; their latencies and
    the seconds all took. Each answer must come from the machine ``expected``."""
    latencies: list[float] = []

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for i in range(n, reads, clients):
                token = tokens[i % len(tokens)]
                started = time.perf_counter()
                answer = await http.get(NOTES, params={"token": token})
                latencies.append(time.perf_counter() - started)
                answer.raise_for_status()
                if answer.headers.get("tenantdb-served-by") != expected:
                    raise RuntimeError(f"{expected} did not serve the read: {answer.headers}")
                if answer.json()["tokens"] != [token]:
                    raise RuntimeError(f"{expected} read {answer.text}, not {token}")

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies, time.perf_counter() - started


async def writes(url: str, per_s: float, stop: asyncio.Event) -> None:
    """Write to the holder at ``url`` ``per_s`` times a second until ``stop``."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        n, started = 0, time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(max(started + n / per_s - time.monotonic(), 0))
            (await http.post(NOTES, params={"token": f"w{n}-{time.time_ns()}"})).raise_for_status()
            n += 1


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Start the holder and both replicas, fill the tenant and measure every round."""
    ways = {
        "candidate": ROOT,
        "baseline": baseline_root(args.baseline),
    }
    with tempfile.TemporaryDirectory() as tmp, DevDNSServer().run_in_thread() as dns:
        root = Path(tmp)
        env = machine_env(root / "bucket", dns, replica_reads=True, tail_hints=True)
        # Machine ids are ports, so that TENANTDB_HINT_URL can name the machine's address.
        m1, m2, m3 = free_port(), free_port(), free_port()
        names = {"candidate": str(m2), "baseline": str(m3)}
        with MachineProcesses(root) as machines:
            holder = machines.start(APP, str(m1), "acme", env, port=m1)
            tokens = [f"t{n}" for n in range(args.rows)]
            with httpx.Client(base_url=holder.url, timeout=10) as http:
                for token in tokens:
                    http.post(NOTES, params={"token": token}).raise_for_status()
            replicas = {
                way: machines.start(
                    APP, names[way], "acme", env, port=int(names[way]), cwd=checkout
                )
                for way, checkout in ways.items()
            }

            async def main() -> dict[str, dict[str, float]]:
                for way, server in replicas.items():  # warm: the copies caught up
                    deadline = time.monotonic() + 30
                    while True:
                        try:
                            await read_from(server.url, names[way], tokens[-1:], 1, 1)
                            break
                        except (RuntimeError, httpx.HTTPError):
                            if time.monotonic() > deadline:
                                raise
                            await asyncio.sleep(0.2)
                stop = asyncio.Event()
                writer = asyncio.ensure_future(
                    writes(holder.url, args.writes_per_s, stop)
                    if args.writes_per_s
                    else stop.wait()
                )
                latencies: dict[str, list[float]] = {way: [] for way in ways}
                rates: dict[str, list[float]] = {way: [] for way in ways}
                cpu: dict[str, list[float]] = {way: [] for way in ways}
                for _, order in alternate(args.rounds, list(ways)):
                    for way in order:
                        server = replicas[way]
                        before = cpu_seconds(server)
                        taken, took = await read_from(
                            server.url, names[way], tokens, args.reads, args.clients
                        )
                        cpu[way].append(1000 * (cpu_seconds(server) - before) / args.reads)
                        latencies[way] += taken
                        rates[way].append(args.reads / took)
                stop.set()
                await writer
                return {
                    way: {
                        "p50_ms": 1000 * statistics.median(latencies[way]),
                        "p99_ms": 1000 * percentile(latencies[way], 0.99),
                        "reads_per_s": statistics.median(rates[way]),
                        "cpu_s_per_1000": statistics.median(cpu[way]),
                    }
                    for way in ways
                }

            return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline", required=True, metavar="COMMIT", help="the other replica's code"
    )
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=1000, help="per replica per round")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--writes-per-s", type=float, default=0.0)
    args = parser.parse_args()
    print(machine())
    result = run(args)
    for way, figures in result.items():
        print(
            f"{way}: read p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, "
            f"{figures['reads_per_s']:.0f} reads/s, "
            f"{figures['cpu_s_per_1000']:.2f} CPU s per 1,000 reads"
        )
    new, old = result["candidate"], result["baseline"]
    print(
        f"candidate / baseline ({args.baseline}): p50 {new['p50_ms'] / old['p50_ms']:.2f}x, "
        f"p99 {new['p99_ms'] / old['p99_ms']:.2f}x, "
        f"reads/s {new['reads_per_s'] / old['reads_per_s']:.2f}x, "
        f"CPU per read {new['cpu_s_per_1000'] / old['cpu_s_per_1000']:.2f}x"
    )


if __name__ == "__main__":
    main()
