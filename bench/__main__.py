"""``python -m bench``: run every benchmark, one process each, then repeat their ratio lines.

Each benchmark is also runnable alone (``python -m bench.bench_overhead`` ...) and prints
its ratio line last. ``python -m bench overhead restore`` runs only those two. The exit
status is non-zero when a benchmark failed to run (not when it missed its goal).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from bench.common import ROOT, machine

BENCHMARKS = {
    "routing": "bench.bench_routing",
    "overhead": "bench.bench_overhead",
    "restore": "bench.bench_restore",
    "lease_ops": "bench.bench_lease_ops",
    "log": "bench.bench_log",
    "durability": "bench.bench_durability",
    "takeover": "bench.bench_takeover",
    "wake": "bench.bench_wake",
    "idle": "bench.bench_idle",
    "fleet": "bench.bench_fleet",
    "encryption": "bench.bench_encryption",
    "cost": "bench.bench_cost",
    "replicas": "bench.bench_replicas",
}


def run(module: str) -> tuple[int, str]:
    """Run one benchmark, echoing its output; return its exit code and last line."""
    process = subprocess.Popen(
        [sys.executable, "-m", module], cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert process.stdout is not None
    last = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.strip():
            last = line.strip()
    return process.wait(), last


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks (all by default) and summarize their ratios."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(BENCHMARKS)} (default: all)")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    summary: list[str] = []
    failed = 0
    for name in names:
        module = BENCHMARKS[name]
        print(f"\n== python -m {module}", flush=True)
        started = time.monotonic()
        code, last = run(module)
        took = time.monotonic() - started
        if code != 0:
            failed += 1
            last = f"FAILED (exit code {code})"
        summary.append(f"{name:<10} {last}  [{took:.0f}s]")
    print(f"\n== summary ({machine()})")
    for line in summary:
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
