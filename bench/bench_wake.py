"""Wake after an idle stop: a machine with a volume vs one without, request to first answer.

A holder stops itself after ``TENANTDB_IDLE_STOP`` seconds without a request (final
publish, lease released saying "idle", exit 0). Fly's proxy starts it again on the next
request. Two tenants of ``--sizes`` MiB each (random rows) are published to moto's S3
server (in its own process) and served by uvicorn processes of ``example_app:app``:

- volume: the machine keeps its data directory (a Fly volume). lock.json still names the
  generation of its local file, so it continues from that file and fetches only the log
  since.
- no volume: every start has an empty data directory (a machine's rootfs is reset on
  stop), so it restores the tenant from the bucket.
- with ``--baseline <commit>``, also "volume at <commit>": the volume way, run from a
  detached worktree of that commit (its tenantdb and example_app), in the same rounds.

Each round wakes both (the order flips every round) and stops each again by idleness. The
figure is the time from starting the process, which Fly's proxy does when the request
arrives, to the first 200 of ``GET /customers/<tenant>``. That includes the interpreter's
start, and the first answer's write being made durable. Fly's own VM start is not in it.
Beside it, the CPU seconds the server process had used by then (user + system, all its
threads): on a machine shared with other work the wall time stretches with the load, the
CPU time much less, so the ratios of both are printed.
The last lines give the ratios. Run: ``python -m bench.bench_wake [--sizes 16 256]
[--rounds 3] [--baseline <commit>]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.bench_takeover import seed
from bench.common import (
    ROOT,
    MiB,
    S3Server,
    alternate,
    baseline_root,
    child_env,
    fill_database_in_child,
    machine,
)
from bench.common import median as median_of
from tests.support.servers import UvicornProcess

BUCKET = "bench-wake"
GOAL_WAKE = 1.0  # seconds, with a volume at 256 MiB (issue 26)
IDLE_STOP = 1.0
WAYS = ("volume", "no volume")


def baseline_way(commit: str) -> str:
    return f"volume at {commit}"


class Sleeper:
    """One tenant's machine, started on demand and stopping itself when idle."""

    def __init__(
        self, work: Path, env: dict[str, str], tenant: str, *, volume: bool, root: Path = ROOT
    ) -> None:
        """``root`` is the checkout whose tenantdb and example_app the machine runs."""
        self.work = work
        self.env = env
        self.tenant = tenant
        self.volume = volume
        self.root = root
        self.starts = 0

    def wake(self) -> Wake:
        """Start the machine, as the proxy does on a request; time to its first 200.

        Then let it stop itself by idleness, so that the next wake starts from there.
        """
        self.starts += 1
        data = self.work / f"{self.tenant}-data"
        if not self.volume:
            shutil.rmtree(data, ignore_errors=True)  # the rootfs is reset on stop
        env = {
            **self.env,
            "TENANT_ID": self.tenant,
            "FLY_MACHINE_ID": f"{self.tenant}-machine",
            "TENANTDB_DATA_DIR": str(data),
            "TENANTDB_IDLE_STOP": f"{IDLE_STOP:g}",
            "TENANTDB_METRICS_PORT": "0",
            "PYTHONPATH": str(self.root),
        }
        log = self.work / f"{self.tenant}-{self.starts}.log"
        started = time.monotonic()
        server = UvicornProcess(
            "example_app:app",
            child_env(env),
            log,
            uvicorn_args=["--no-access-log"],
            inherit_environ=False,
            cwd=self.root,
        )
        try:
            took = first_200(server, self.tenant) - started
            cpu = cpu_seconds(server.proc.pid)
            if server.proc.wait(timeout=120) != 0:
                raise RuntimeError(f"{self.tenant}: the idle stop failed:\n{server.log()[-3000:]}")
        finally:
            server.close()
        return Wake(took, cpu)


@dataclass(frozen=True)
class Wake:
    """One wake: seconds from the process's start to its first 200, and its CPU seconds."""

    wall: float
    cpu: float


def cpu_seconds(pid: int) -> float:
    """The user + system CPU seconds process ``pid`` has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_200(server: UvicornProcess, tenant: str, timeout: float = 300) -> float:
    """Ask for the tenant until ``server`` answers 200; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    url = f"{server.url}/customers/{tenant}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers={"accept": "application/json"}, timeout=30).is_success:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        if server.proc.poll() is not None:
            raise RuntimeError(f"{tenant}: the machine exited:\n{server.log()[-3000:]}")
        time.sleep(0.01)
    raise TimeoutError(f"{server.url} did not serve {tenant}:\n{server.log()[-3000:]}")


def run_size(
    s3: S3Server, work: Path, size_mib: int, rounds: int, baseline: str | None
) -> dict[str, list[Wake]]:
    """The wake times of every way for one database size."""
    env = s3.settings_env(BUCKET)
    source = work / f"seed-{size_mib}.sqlite3"
    fill_database_in_child(source, size_mib * MiB)
    sleepers = {}
    for n, way in enumerate(WAYS):
        tenant = f"w{size_mib}-{n}"
        seed(s3, source, tenant, ttl=15, bucket=BUCKET)
        sleepers[way] = Sleeper(work, env, tenant, volume=way == "volume")
    if baseline is not None:
        tenant = f"w{size_mib}-base"
        seed(s3, source, tenant, ttl=15, bucket=BUCKET)
        sleepers[baseline_way(baseline)] = Sleeper(
            work, env, tenant, volume=True, root=baseline_root(baseline)
        )
    source.unlink()
    for way, sleeper in sleepers.items():
        if sleeper.volume:  # the first start of a machine with a volume restores: not measured
            print(f"{size_mib} MiB: first start of {way} (a restore) {sleeper.wake().wall:.2f}s")
    ways = list(sleepers)
    times: dict[str, list[Wake]] = {way: [] for way in ways}
    for n, order in alternate(rounds, ways):
        for way in order:
            times[way].append(sleepers[way].wake())
        figures = "  ".join(
            f"{way} {times[way][-1].wall:.2f}s (cpu {times[way][-1].cpu:.2f}s)" for way in ways
        )
        print(f"{size_mib} MiB round {n}: {figures}", flush=True)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the figures, then the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256], metavar="MIB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="COMMIT", help="also wake this commit's code")
    args = parser.parse_args(argv)
    print(machine())
    results: dict[int, dict[str, list[Wake]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-wake-") as tmp, S3Server() as s3:
        s3.create_bucket(BUCKET)
        for size in args.sizes:
            results[size] = run_size(s3, Path(tmp), size, args.rounds, args.baseline)
    print()
    for size, times in results.items():
        for measure in ("wall", "cpu"):
            med = {way: median_of([getattr(w, measure) for w in times[way]]) for way in times}
            vol, novol = med["volume"], med["no volume"]
            goal = (
                f" (goal at 256 MiB: <= {GOAL_WAKE:g}s)"
                if size == 256 and measure == "wall"
                else ""
            )
            print(
                f"{size} MiB, median {measure} seconds to first answer: volume {vol:.2f}s{goal}, "
                f"no volume {novol:.2f}s; no volume / volume = {novol / vol:.1f}x"
            )
            if args.baseline is not None:
                base = med[baseline_way(args.baseline)]
                print(
                    f"{size} MiB, {measure}: volume at {args.baseline} {base:.2f}s; "
                    f"volume / volume at {args.baseline} = {vol / base:.2f}x"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
