"""Run simulation schedules: ``python -m tests.simulation --seeds N`` or ``--seed S``.

Prints each seed's result, then the totals: steps, faults injected by kind, invariant
checks, and schedules per second. Exits 1 on the first failing seed, with its replay line.
``--jobs N`` runs the seeds in N processes (one per core pays: a schedule is CPU-bound);
the output is the same, in seed order.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter

from tests.simulation.mutations import MUTATIONS
from tests.simulation.run import SCRATCH, run_seeds, schedule_of, set_up
from tests.simulation.shrink import shrink


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the schedules, print the summary; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tests.simulation")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="replay this one seed, step by step")
    which.add_argument("--seeds", type=int, default=10, help="run this many seeds")
    parser.add_argument("--first", type=int, default=1, help="the first of --seeds")
    parser.add_argument("--steps", type=int, default=12, help="steps per schedule")
    parser.add_argument("--jobs", type=int, default=1, help="run the seeds in this many processes")
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
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    if args.jobs == 1 or args.shrink:
        set_up(args.mutation, args.verbose)
    if args.shrink:
        seed = seeds[0]
        schedule = schedule_of(seed, args.steps, args.keep)
        kept = shrink(schedule, SCRATCH)
        print(f"seed {seed}: {len(kept)} of {len(schedule.steps)} steps still fail:")
        for index in kept:
            print(f"  {index:>3} {schedule.steps[index]}")
        print(
            f"replay: .venv/bin/python -m tests.simulation --seed {seed} "
            f"--steps {args.steps} --keep {','.join(map(str, kept))}"
        )
        return 1
    steps, faults, checks, events = 0, Counter[str](), Counter[str](), Counter[str]()
    writes = acked = 0
    peaks: dict[str, float] = {}
    failed_seeds: list[int] = []
    started = time.monotonic()
    results = run_seeds(
        seeds,
        steps=args.steps,
        keep=args.keep,
        jobs=args.jobs,
        mutation=args.mutation,
        verbose=args.verbose,
    )
    ran: list[int] = []
    try:
        for result in results:
            seed, outcome = result.seed, result.outcome
            ran.append(seed)
            if outcome is None:
                print(result.failure, file=sys.stderr)
                if args.mutation:
                    print(
                        f"mutation {args.mutation}: found by seed {seed} (seed number "
                        f"{seed - seeds[0] + 1} searched), step {result.step}, {result.invariant}"
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
                f"seed {seed}: ok, {result.machines} machines, {len(outcome.steps)} steps, "
                f"{outcome.acked}/{outcome.writes} writes acknowledged, "
                f"{outcome.virtual_seconds:.1f}s simulated in {outcome.iterations} iterations",
                flush=True,
            )
            if args.trace:
                print("\n".join(outcome.trace))
                digest = hashlib.sha256("\n".join(outcome.trace).encode()).hexdigest()
                print(f"trace {seed}: {len(outcome.trace)} lines, sha256 {digest}")
            if args.seed is not None:
                for number, line in enumerate(outcome.steps):
                    print(f"  {number:>3} {line}")
    except KeyboardInterrupt:
        interrupted = True  # Ctrl-C: the totals of the seeds that ran, as a run that ended
    else:
        interrupted = False
    took = time.monotonic() - started
    verdict = f"FAILED: {failed_seeds}" if failed_seeds else "all passed"
    if interrupted:
        verdict = f"interrupted; {verdict}"
    span = f"{ran[0]}..{ran[-1]}" if ran else "none"
    print(f"seeds: {len(ran)} of {len(seeds)} ({span}), {verdict}")
    print(f"steps: {steps}; writes: {acked}/{writes} acknowledged")
    print(f"faults injected: {dict(sorted(faults.items()))}")
    print(f"events: {dict(sorted(events.items()))}")
    print(f"invariants checked: {dict(sorted(checks.items()))}")
    print(f"busiest machine (invariant 6): {peaks}")
    print(f"time: {took:.1f}s, {len(ran) / took:.2f} schedules/s with {args.jobs} jobs")
    if interrupted:
        return 130  # as a shell reports a command Ctrl-C ended
    return 1 if failed_seeds else 0


if __name__ == "__main__":
    sys.exit(main())
