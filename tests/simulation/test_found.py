"""Bugs the simulation found in tenantdb, each as the short schedule that showed it."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path

import pytest

from tests.simulation import bucket as sim_bucket
from tests.simulation.harness import run_schedule
from tests.simulation.schedule import Schedule, Step


async def test_a_foreign_object_of_the_same_size_at_a_segment_key_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile writer puts random bytes, exactly as long as segment 4, at its key just
    before the holder's upload. The holder took any object of the right size there for its
    own landed upload, stopped carrying the segment in lock.json, and published the
    foreign bytes: after the holder's crash, no machine could open the tenant and no
    restore could read it, with five writes acknowledged."""
    planted: list[str] = []
    put = sim_bucket.SimBucket._put

    def front_run(
        self: sim_bucket.SimBucket,
        client: str,
        operation: str,
        key: str,
        body: bytes,
        if_match: str | None,
        if_none_match: str | None,
    ) -> object:
        if key.endswith("/000000000004.seg") and not planted:
            planted.append(key)
            self.plant(key, random.Random(0).randbytes(len(body)))
        return put(self, client, operation, key, body, if_match, if_none_match)

    monkeypatch.setattr(sim_bucket.SimBucket, "_put", front_run)
    writes = [Step("write", count=1) for _ in range(5)]
    steps = (
        Step("start", machine=0),
        Step("start", machine=1),
        *writes,
        Step("restore_now"),
        Step("crash", machine=0),
        Step("write", count=1),
        Step("restore_now"),
    )
    outcome = await run_schedule(Schedule(0, 2, timedelta(0), steps), tmp_path)
    assert planted
    assert outcome.acked == outcome.writes == 6
    assert "failed" not in outcome.steps[-1]
