"""CI's simulation runs: a fixed set of short seeded schedules, and every seed that once
failed (tests/simulation/corpus.txt). ``make simulate SEEDS=N`` runs many more."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.simulation.harness import run_schedule
from tests.simulation.invariants import INVARIANTS
from tests.simulation.schedule import make_schedule

CI_SEEDS = range(1001, 1021)
CI_STEPS = 10


def corpus() -> list[tuple[int, int]]:
    """The (seed, steps) pairs of the corpus file."""
    pairs = []
    for line in (Path(__file__).parent / "corpus.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            pairs.append((int(fields[0]), int(fields[1])))
    return pairs


def run_and_check(seed: int, steps: int, root: Path) -> None:
    schedule = make_schedule(seed, steps)
    outcome = run_schedule(schedule, root)
    assert len(outcome.steps) == len(schedule.steps) + 1  # and the final stop and restore
    assert outcome.checks["one_live_lease_at_a_time"] == len(schedule.steps) + 1
    assert set(outcome.checks) <= set(INVARIANTS)


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_seeded_schedule_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    run_and_check(seed, CI_STEPS, tmp_path)


@pytest.mark.parametrize(("seed", "steps"), corpus(), ids=lambda value: str(value))
def test_seed_that_once_failed_keeps_every_invariant(seed: int, steps: int, tmp_path: Path) -> None:
    run_and_check(seed, steps, tmp_path)


def test_a_seed_always_makes_the_same_schedule() -> None:
    assert make_schedule(7) == make_schedule(7)
    assert make_schedule(7) != make_schedule(8)
    # Steps are drawn one after another: a longer schedule begins with the shorter one.
    short = make_schedule(7, 6).steps
    assert make_schedule(7, 20).steps[: len(short)] == short
