"""The simulation finds real bugs: each past fix of tenantdb, reverted (mutations.py),
fails the seed that found it, which passes on the intact code. The search itself (how
many seeds each needs) runs with ``make simulate-mutations``; docs/development.md keeps
its figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.simulation.harness import SimulationFailed, run_schedule
from tests.simulation.mutations import MUTATIONS
from tests.simulation.schedule import make_schedule

STEPS = 12
# mutation -> (the first seed from 1 that found it, the invariant it violated)
FOUND = {
    "group_commit_join": (31, "acknowledged_writes_survive"),
    "double_wal_restart": (2, "acknowledged_writes_survive"),
    "inline_segments_dropped": (14, "published_objects_present"),
    "lease_from_answer": (2, "one_machine_serves_at_a_time"),
    "segment_time_rounded_down": (60, "restore_matches_model"),
    "rollback_clock": (205, "restore_matches_model"),
    "rollback_comment": (5, "acknowledged_writes_survive"),
}


@pytest.mark.parametrize("mutation", sorted(FOUND))
def test_the_seed_that_found_a_reverted_fix_fails_with_it(
    mutation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed, invariant = FOUND[mutation]
    MUTATIONS[mutation](monkeypatch)
    with pytest.raises(SimulationFailed) as failed:
        run_schedule(make_schedule(seed, STEPS), tmp_path)
    assert getattr(failed.value.cause, "invariant", None) == invariant, failed.value
    assert f"--seed {seed} --steps {STEPS}" in str(failed.value)


@pytest.mark.parametrize("mutation", sorted(FOUND))
def test_the_seed_that_found_a_reverted_fix_passes_with_the_fix(
    mutation: str, tmp_path: Path
) -> None:
    seed, invariant = FOUND[mutation]
    outcome = run_schedule(make_schedule(seed, STEPS), tmp_path)
    assert outcome.checks[invariant] > 0
