"""A schedule: the machines, the bucket's faults and clock, and the steps, from a seed alone."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from tests.simulation.bucket import FaultPlan

__all__ = ["Schedule", "Step", "StepKind", "make_schedule"]

StepKind = Literal[
    "write",
    "checkpoint",
    "stop",
    "start",
    "crash",
    "pause",
    "restore_at",
    "restore_now",
    "faults",
    "hostile",
    "suspend",
    "clock_jump",
    "outside_checkpoint",
    "disk_full",
    "rollback",
]


@dataclass(frozen=True)
class Step:
    """One step: what happens, to which machine, with which numbers."""

    kind: StepKind
    machine: int = 0  # index into the schedule's machines
    count: int = 0  # writes in a ``write`` step, or during a ``crash`` or ``disk_full``
    seconds: float = 0.0  # a pause's or a full disk's length; a clock jump's size
    iterations: int = 0  # how many loop iterations into its writes a crash lands
    fraction: float = 0.0  # where in the run so far a point-in-time restore looks...
    # ``seconds``, if set, says instead how many seconds ago (for hand-written schedules)
    plan: FaultPlan | None = None  # the faults from a ``faults`` step on

    def __str__(self) -> str:
        match self.kind:
            case "write":
                return f"write x{self.count} (on any machine that says it serves)"
            case "pause" | "suspend":
                when = " after its next lease write" if self.count else ""
                return f"{self.kind} m{self.machine + 1}{when} for {self.seconds:.2f}s"
            case "clock_jump":
                return f"clock_jump m{self.machine + 1} {self.seconds:+.1f}s"
            case "disk_full":
                return f"disk_full m{self.machine + 1} {self.seconds:.2f}s, {self.count} writes"
            case "rollback":
                return f"rollback to {self.fraction:.2f} of the run so far"
            case "restore_at" if self.seconds:
                return f"restore_at {self.seconds:.2f}s ago"
            case "restore_at" if self.count:
                return f"restore_at just before commit {self.fraction:.3f} of those so far"
            case "restore_at":
                return f"restore_at {self.fraction:.2f} of the run so far"
            case "faults":
                return f"faults {self.plan}"
            case "crash" if self.count:
                return (
                    f"crash m{self.machine + 1} {self.iterations} iterations into "
                    f"{self.count} writes"
                )
            case "restore_now" | "hostile" | "checkpoint":
                return self.kind
            case _:
                return f"{self.kind} m{self.machine + 1}"


@dataclass(frozen=True)
class Schedule:
    """Everything a run does, derived from ``seed``; the run's own randomness is seeded too."""

    seed: int
    machines: int
    skew: timedelta
    steps: tuple[Step, ...] = field(default=())
    # Each step's number in the schedule it was cut from (``shrink.keep_steps``): the
    # seed of its own draws, so that dropping one step leaves the others' draws alone.
    numbers: tuple[int, ...] | None = None

    def number(self, index: int) -> int:
        """The number of the step at ``index`` (its draws' seed)."""
        return self.numbers[index] if self.numbers is not None else index

    def fault_seed(self) -> str:
        """The seed of the bucket's per-attempt fault draws (str seeds hash the same in every
        process, unlike ``hash()`` of a tuple)."""
        return f"faults:{self.seed}"


# (kind, weight): writes dominate, as in a real tenant's life.
_WEIGHTS: tuple[tuple[StepKind, int], ...] = (
    ("write", 10),
    ("checkpoint", 2),
    ("stop", 2),
    ("start", 3),
    ("crash", 2),
    ("pause", 1),
    ("restore_at", 3),
    ("restore_now", 2),
    ("faults", 2),
    ("hostile", 1),
    ("suspend", 1),
    ("clock_jump", 1),
    ("outside_checkpoint", 2),
    ("disk_full", 1),
    ("rollback", 1),
)


def _plan(rng: random.Random) -> FaultPlan:
    if rng.random() < 0.2:
        return FaultPlan()
    return FaultPlan(
        fail_before=rng.choice((0.0, 0.03, 0.1)),
        slow_down=rng.choice((0.0, 0.03, 0.1)),
        lose_answer=rng.choice((0.0, 0.03, 0.1)),
        delay=rng.choice((0.0, 0.1, 0.3)),
        max_delay=rng.choice((0.01, 0.05, 0.3)),
    )


def make_schedule(seed: int, steps: int = 12) -> Schedule:
    """The schedule of ``seed``: 2 or 3 machines, the first faults and two starts, then
    ``steps`` steps."""
    rng = random.Random(seed)
    machines = rng.choice((2, 3))
    skew = timedelta(seconds=round(rng.uniform(-1.5, 1.5), 3))
    kinds, weights = zip(*_WEIGHTS, strict=True)
    chosen = [Step("faults", plan=_plan(rng)), Step("start", machine=0), Step("start", machine=1)]
    # Which machines the schedule means to be running: stops and crashes pick one of them,
    # starts one of the others, and a schedule never stays without a machine for long.
    running = {0, 1}
    while len(chosen) < steps + 3:
        kind: StepKind = rng.choices(kinds, weights)[0]
        if not running or (kind == "start" and len(running) == machines):
            kind = "start" if not running else "write"
        if kind in ("stop", "crash") and len(running) == 1 and rng.random() < 0.5:
            kind = "pause"
        if kind in ("suspend", "clock_jump", "outside_checkpoint", "disk_full") and not running:
            kind = "start"
        pick = sorted(set(range(machines)) - running if kind == "start" else running)
        machine = rng.choice(pick)
        match kind:
            case "write":
                chosen.append(Step(kind, count=rng.randint(1, 4)))
            case "pause" | "suspend":
                seconds = rng.choice((0.4, 1.3, 2.6))
                # count 1: stopped right after its next lease write lands
                chosen.append(
                    Step(kind, machine=machine, seconds=seconds, count=rng.choice((0, 1)))
                )
            case "clock_jump":
                jump = rng.choice((-2.0, -0.5, 0.5, 3.0))
                chosen.append(Step(kind, machine=machine, seconds=jump))
            case "disk_full":
                seconds = rng.choice((0.2, 1.0))
                chosen.append(Step(kind, machine=machine, seconds=seconds, count=rng.randint(1, 3)))
            case "restore_at":
                # count 1: just before a commit, picked by ``fraction``
                near = rng.choice((0, 1))
                chosen.append(Step(kind, fraction=round(rng.random(), 3), count=near))
            case "rollback":
                chosen.append(Step(kind, fraction=round(rng.random(), 3)))
            case "faults":
                chosen.append(Step(kind, plan=_plan(rng)))
            case "start":
                running.add(machine)
                chosen.append(Step(kind, machine=machine))
            case "crash":
                # Often in the middle of client writes: SIGKILL lands at any await.
                running.discard(machine)
                count = rng.choice((0, 2, 4))
                iterations = rng.randrange(400)
                chosen.append(Step(kind, machine=machine, count=count, iterations=iterations))
            case "stop":
                running.discard(machine)
                chosen.append(Step(kind, machine=machine))
            case _:
                chosen.append(Step(kind, machine=machine))
    return Schedule(seed, machines, skew, tuple(chosen))
