"""The shrinker: the fewest steps of a failing schedule that still fail the same way.

Greedy, as in QuickCheck's and Hypothesis's first pass: drop one step at a time, keep the
drop whenever the rest still fails with the same invariant, until no single step can go.
A dropped step changes what the seeded draws after it give (the bucket's faults come in
call order), so a drop that loses the failure is simply not kept.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.simulation.harness import SimulationFailed, run_schedule
from tests.simulation.schedule import Schedule

__all__ = ["failure_of", "keep_steps", "shrink"]


def keep_steps(schedule: Schedule, kept: list[int]) -> Schedule:
    """``schedule`` with only the steps at the indices ``kept``."""
    return dataclasses.replace(
        schedule,
        steps=tuple(schedule.steps[i] for i in kept),
        numbers=tuple(schedule.number(i) for i in kept),
    )


def failure_of(schedule: Schedule, scratch: str | None) -> str | None:
    """The invariant (or error type) ``schedule`` fails with, or None if it passes."""
    with tempfile.TemporaryDirectory(prefix="tenantdb-shrink-", dir=scratch) as root:
        try:
            run_schedule(schedule, Path(root))
        except SimulationFailed as failed:
            return str(getattr(failed.cause, "invariant", type(failed.cause).__name__))
    return None


def shrink(
    schedule: Schedule,
    scratch: str | None = None,
    fails: Callable[[Schedule, str | None], str | None] = failure_of,
) -> list[int]:
    """The indices of the fewest steps of ``schedule`` that fail as all of them do."""
    wanted = fails(schedule, scratch)
    if wanted is None:
        raise ValueError(f"seed {schedule.seed} does not fail: nothing to shrink")
    kept = list(range(len(schedule.steps)))
    shrunk = True
    while shrunk:
        shrunk = False
        for index in reversed(kept):
            trial = [i for i in kept if i != index]
            if fails(keep_steps(schedule, trial), scratch) == wanted:
                kept, shrunk = trial, True
    return kept
