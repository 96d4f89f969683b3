"""CI's simulation runs: a fixed set of short seeded schedules, and every seed that once
failed (tests/simulation/corpus.txt). ``make simulate SEEDS=N`` runs many more."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


def _real_disk_run(seed: int) -> str:
    env = {**os.environ, "TENANTDB_SIM_REAL_DISK_FULL": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.simulation", "--seed", str(seed), "--trace"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode and "unshare" in done.stderr:
        pytest.skip(f"no user and mount namespace here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_a_real_full_disk_keeps_every_invariant_and_the_run_deterministic() -> None:
    """Seed 1 fills m1's own tmpfs for a second while it takes writes: SQLite meets
    ENOSPC from the filesystem (tmpfs.py). Twice: the same trace."""
    first, second = _real_disk_run(1), _real_disk_run(1)
    assert "'real_disk_full': 1" in first
    assert "0/3 acknowledged while full; now serving" in first
    digest = re.compile(r"^trace 1: \d+ lines, sha256 \w+$", re.M)
    assert digest.findall(first) == digest.findall(second) != []
