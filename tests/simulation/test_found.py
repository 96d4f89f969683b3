"""Bugs the simulation found in tenantdb, each as the short schedule that showed it."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from pathlib import Path

import pytest

from tenantdb.replication import carrier
from tenantdb.replication.takeovers import takeover_key
from tests.simulation import bucket as sim_bucket
from tests.simulation.harness import PREFIX, TENANT, Simulation, run_schedule, simulate
from tests.simulation.schedule import Schedule, Step


def test_a_foreign_object_of_the_same_size_at_a_segment_key_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile writer puts random bytes, exactly as long as a log object, at its key just
    before the holder's upload. The holder took any object of the right size there for its
    own landed upload, stopped carrying the segment in lock.json, and published the
    foreign bytes: after the holder's crash, no machine could open the tenant and no
    restore could read it, with five writes acknowledged."""
    planted: list[str] = []
    put = sim_bucket.SimBucket._put
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 1)  # every segment packed after its CAS

    def front_run(
        self: sim_bucket.SimBucket,
        client: str,
        operation: str,
        key: str,
        body: bytes,
        if_match: str | None,
        if_none_match: str | None,
    ) -> object:
        # The first log object: a pack of the first segment.
        if "/log/" in key and not planted:
            planted.append(key)
            self.plant(key, random.Random(0).randbytes(len(body)))
        return put(self, client, operation, key, body, if_match, if_none_match)

    monkeypatch.setattr(sim_bucket.SimBucket, "_put", front_run)
    final = simulate(Schedule(0, 2, timedelta(0), ()), tmp_path, _five_writes_and_a_crash)
    assert planted
    assert final.startswith("6 tokens, 6 required"), final


async def _five_writes_and_a_crash(sim: Simulation) -> str:
    m1, m2 = sim.machines
    assert await m1.start() == "serving"
    assert await m2.start() == "standby"
    for _ in range(5):
        assert await sim.write(m1, "sync")  # one segment each
    await sim._restore_now("restore 1")
    await m1.crash()
    assert m2 in await sim._wait_serving()
    assert await sim.write(m2, "sync")
    final = await sim._restore_now("restore 2")
    await m2.stop()
    return final


def test_a_junk_takeover_record_a_later_one_replaces_does_not_stop_restores(
    tmp_path: Path,
) -> None:
    """Seed 6: junk planted at the next generation's takeover record. The next holder moved
    on to the generation after, whose record says it ``replaces`` the junk one, yet every
    point-in-time restore (and every garbage collection) kept failing on the junk."""
    simulate(Schedule(0, 2, timedelta(0), ()), tmp_path, _junk_takeover_record)


async def _junk_takeover_record(sim: Simulation) -> None:
    m1, m2 = sim.machines
    assert await m1.start() == "serving"
    assert await m2.start() == "standby"
    sim.sim.plant(takeover_key(PREFIX, TENANT, 2), b'{"generation": "not a number"}')
    assert await sim.write(m1, "sync")
    assert await m1.stop() == "stopped"
    assert "acknowledged on m2" in await sim._write_step(1)
    assert sim.sim.objects[takeover_key(PREFIX, TENANT, 3)].body.count(b'"replaces": 2') == 1
    await asyncio.sleep(0.3)
    found = await sim._restore_at(Step("restore_at", seconds=0.1))
    assert found.startswith("2 tokens"), found
    await m2.stop()


def test_a_holder_resumed_from_a_suspend_does_not_serve_beside_the_new_holder(
    tmp_path: Path,
) -> None:
    """Seeds 4, 28, 70, 78 and 85: Fly's suspend restores a snapshot of the machine, whose
    monotonic clock did not count the time it was away. The holder judged its lease on
    that clock alone: resumed 2.6 s later (TTL 1 s), it served, beside the standby that had
    taken the tenant over meanwhile."""
    steps = (
        Step("start", machine=0),
        Step("start", machine=1),
        Step("write", count=2),
        Step("suspend", machine=0, seconds=2.6),
        Step("write", count=2),
    )
    outcome = run_schedule(Schedule(0, 2, timedelta(0), steps), tmp_path)
    assert outcome.checks["one_machine_serves_at_a_time"] == len(steps) + 1
    assert "acknowledged on m2" in outcome.steps[-2]
