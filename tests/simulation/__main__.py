"""Run simulation schedules: ``python -m tests.simulation --seeds N`` or ``--seed S``.

Prints each seed's result, then the totals: steps, faults injected by kind, invariant
checks, and schedules per second. Exits 1 on the first failing seed, with its replay line.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.simulation import tmpfs
from tests.simulation.harness import REAL_DISK_FULL, SimulationFailed, run_schedule
from tests.simulation.mutations import MUTATIONS
from tests.simulation.schedule import make_schedule
from tests.simulation.shrink import keep_steps, shrink

# A RAM disk if there is one: SQLite's fsyncs cost more wall time than the simulation.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the schedules, print the summary; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tests.simulation")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="replay this one seed, step by step")
    which.add_argument("--seeds", type=int, default=10, help="run this many seeds")
    parser.add_argument("--first", type=int, default=1, help="the first of --seeds")
    parser.add_argument("--steps", type=int, default=12, help="steps per schedule")
    parser.add_argument("--verbose", action="store_true", help="show tenantdb's log")
    parser.add_argument(
        "--trace", action="store_true", help="print each run's full trace and its digest"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="run every seed; list the failed ones"
    )
    parser.add_argument(
        "--mutation",
        choices=sorted(MUTATIONS),
        help="revert this past fix first; stop at the first seed that finds it",
    )
    parser.add_argument(
        "--keep", help="with --seed: run only these steps (comma-separated indices)"
    )
    parser.add_argument(
        "--shrink", action="store_true", help="with --seed: find the fewest failing steps"
    )
    args = parser.parse_args(argv)
    if REAL_DISK_FULL:
        tmpfs.enter_namespace()  # before anything starts a thread
    if args.mutation:
        patch = pytest.MonkeyPatch()
        MUTATIONS[args.mutation](patch)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.CRITICAL + 1,
        format="%(asctime)s %(name)s %(message)s",
    )
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    steps, faults, checks, events = 0, Counter[str](), Counter[str](), Counter[str]()
    writes = acked = 0
    peaks: dict[str, float] = {}
    failed_seeds: list[int] = []
    started = time.monotonic()
    for seed in seeds:
        schedule = make_schedule(seed, args.steps)
        if args.keep is not None:
            schedule = keep_steps(schedule, [int(i) for i in args.keep.split(",") if i])
        if args.shrink:
            kept = shrink(schedule, SCRATCH)
            print(f"seed {seed}: {len(kept)} of {len(schedule.steps)} steps still fail:")
            for index in kept:
                print(f"  {index:>3} {schedule.steps[index]}")
            print(
                f"replay: .venv/bin/python -m tests.simulation --seed {seed} "
                f"--steps {args.steps} --keep {','.join(map(str, kept))}"
            )
            return 1
        with tempfile.TemporaryDirectory(prefix=f"tenantdb-sim-{seed}-", dir=SCRATCH) as root:
            try:
                outcome = run_schedule(schedule, Path(root))
            except SimulationFailed as failed:
                print(failed, file=sys.stderr)
                if args.mutation:
                    invariant = getattr(failed.cause, "invariant", type(failed.cause).__name__)
                    print(
                        f"mutation {args.mutation}: found by seed {seed} (seed number "
                        f"{seed - seeds[0] + 1} searched), step {failed.step}, {invariant}"
                    )
                if not args.keep_going:
                    return 1
                failed_seeds.append(seed)
                continue
        steps += len(outcome.steps)
        faults.update(outcome.faults)
        checks.update(outcome.checks)
        events.update(outcome.events)
        writes, acked = writes + outcome.writes, acked + outcome.acked
        for name, value in outcome.peaks.items():
            peaks[name] = max(peaks.get(name, 0), value)
        print(
            f"seed {seed}: ok, {schedule.machines} machines, {len(outcome.steps)} steps, "
            f"{outcome.acked}/{outcome.writes} writes acknowledged, "
            f"{outcome.virtual_seconds:.1f}s simulated in {outcome.iterations} iterations"
        )
        if args.trace:
            print("\n".join(outcome.trace))
            digest = hashlib.sha256("\n".join(outcome.trace).encode()).hexdigest()
            print(f"trace {seed}: {len(outcome.trace)} lines, sha256 {digest}")
        if args.seed is not None:
            for number, line in enumerate(outcome.steps):
                print(f"  {number:>3} {line}")
    took = time.monotonic() - started
    verdict = f"FAILED: {failed_seeds}" if failed_seeds else "all passed"
    print(f"seeds: {len(seeds)} ({seeds[0]}..{seeds[-1]}), {verdict}")
    print(f"steps: {steps}; writes: {acked}/{writes} acknowledged")
    print(f"faults injected: {dict(sorted(faults.items()))}")
    print(f"events: {dict(sorted(events.items()))}")
    print(f"invariants checked: {dict(sorted(checks.items()))}")
    print(f"busiest machine (invariant 6): {peaks}")
    print(f"time: {took:.1f}s, {len(seeds) / took:.2f} schedules/s")
    return 1 if failed_seeds else 0


if __name__ == "__main__":
    sys.exit(main())
