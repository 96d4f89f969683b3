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

Each round wakes both (the order flips every round) and stops each again by idleness. The
figure is the time from starting the process, which Fly's proxy does when the request
arrives, to the first 200 of ``GET /customers/<tenant>``. That includes the interpreter's
start, and the first answer's write being made durable. Fly's own VM start is not in it.
The last lines give the ratios. Run: ``python -m bench.bench_wake [--sizes 16 256]
[--rounds 3]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.bench_takeover import seed
from bench.common import MiB, S3Server, alternate, child_env, fill_database_in_child, machine
from bench.common import median as median_of
from tests.support.servers import UvicornProcess

BUCKET = "bench-wake"
GOAL_WAKE = 1.0  # seconds, with a volume at 256 MiB (issue 26)
IDLE_STOP = 1.0
WAYS = ("volume", "no volume")


class Sleeper:
    """One tenant's machine, started on demand and stopping itself when idle."""

    def __init__(self, work: Path, env: dict[str, str], tenant: str, *, volume: bool) -> None:
        self.work = work
        self.env = env
        self.tenant = tenant
        self.volume = volume
        self.starts = 0

    def wake(self) -> float:
        """Start the machine, as the proxy does on a request; seconds to its first 200.

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
        }
        log = self.work / f"{self.tenant}-{self.starts}.log"
        started = time.monotonic()
        server = UvicornProcess(
            "example_app:app",
            child_env(env),
            log,
            uvicorn_args=["--no-access-log"],
            inherit_environ=False,
        )
        try:
            took = first_200(server, self.tenant) - started
            if server.proc.wait(timeout=120) != 0:
                raise RuntimeError(f"{self.tenant}: the idle stop failed:\n{server.log()[-3000:]}")
        finally:
            server.close()
        return took


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


def run_size(s3: S3Server, work: Path, size_mib: int, rounds: int) -> dict[str, list[float]]:
    """The wake times of both ways for one database size."""
    env = s3.settings_env(BUCKET)
    source = work / f"seed-{size_mib}.sqlite3"
    fill_database_in_child(source, size_mib * MiB)
    sleepers = {}
    for way in WAYS:
        tenant = f"w{size_mib}-{'vol' if way == 'volume' else 'novol'}"
        seed(s3, source, tenant, ttl=15)
        sleepers[way] = Sleeper(work, env, tenant, volume=way == "volume")
    source.unlink()
    first = sleepers["volume"].wake()  # the volume's first start restores: not measured
    print(f"{size_mib} MiB: first start of the volume machine (a restore) {first:.2f}s")
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for n, order in alternate(rounds, WAYS):
        for way in order:
            times[way].append(sleepers[way].wake())
        figures = "  ".join(f"{way} {times[way][-1]:.2f}s" for way in WAYS)
        print(f"{size_mib} MiB round {n}: {figures}", flush=True)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the figures, then the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256], metavar="MIB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(machine())
    results: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-wake-") as tmp, S3Server() as s3:
        s3.create_bucket(BUCKET)
        for size in args.sizes:
            results[size] = run_size(s3, Path(tmp), size, args.rounds)
    print()
    for size, times in results.items():
        vol, novol = median_of(times["volume"]), median_of(times["no volume"])
        goal = f" (goal at 256 MiB: <= {GOAL_WAKE:g}s)" if size == 256 else ""
        print(
            f"{size} MiB, median wake to first answer: volume {vol:.2f}s{goal}, "
            f"no volume {novol:.2f}s; no volume / volume = {novol / vol:.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
