"""Each invariant is honest: a deliberately broken protocol violates it in a short
schedule, and the same schedule passes on the intact code."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tenantdb.machine.database import TenantDB
from tenantdb.machine.mover import Mover
from tenantdb.machine.standby import Standby
from tenantdb.protocol import lease as lease_module
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LockRecord, LogChunk
from tenantdb.replication import follower, pitr, uploads
from tenantdb.replication.follower import Follower
from tenantdb.replication.garbage import GarbageCollector
from tenantdb.replication.shipper import Shipper
from tests.simulation import invariants
from tests.simulation.harness import SimulationFailed, run_schedule
from tests.simulation.schedule import Schedule, Step


def schedule(*steps: Step) -> Schedule:
    return Schedule(seed=0, machines=2, skew=timedelta(0), steps=steps)


START_BOTH = (Step("start", machine=0), Step("start", machine=1))


def acknowledge_before_shipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """sync() answers at once, and the shipper never ships: acks before the bucket has it."""

    async def sync(self: TenantDB) -> None:
        return None

    async def idle(self: Shipper, interval: float, snapshot_interval: float) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(TenantDB, "sync", sync)
    monkeypatch.setattr(Shipper, "run", idle)


def restore_an_older_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point-in-time walk compares segment times with a moment a minute too early."""
    init = pitr._Walk.__init__

    def early(self: Any, *args: Any) -> None:
        init(self, *args)
        self.at -= timedelta(minutes=1)

    monkeypatch.setattr(pitr._Walk, "__init__", early)


def ignore_a_live_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """A standby judges every lease it reads expired, and takes it."""
    monkeypatch.setattr(Lease, "expires_in", lambda self, observed: -1.0)


def serve_with_a_dead_shipper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipper dies, and the machine does not fail stop."""

    async def dies(self: Shipper, interval: float, snapshot_interval: float) -> None:
        raise RuntimeError("the shipper died")

    monkeypatch.setattr(Shipper, "run", dies)
    monkeypatch.setattr(Mover, "fail_stop", lambda self, reason: None)


def publish_without_uploading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log objects are reported uploaded without being written: lock.json stops carrying
    segments whose objects never reach the bucket."""

    async def skipped(bucket: object, key: str, body: bytes) -> None:
        return None

    monkeypatch.setattr(uploads, "put_log_object", skipped)


def poll_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A standby polls lock.json again as soon as each answer is in: a request storm."""

    async def pause(self: Standby, seconds: float, *, hinted: bool = False) -> None:
        await asyncio.sleep(0)

    monkeypatch.setattr(Standby, "_pause", pause)


def vouch_for_a_copy_without_applying(monkeypatch: pytest.MonkeyPatch) -> None:
    """A follower takes the segments it downloaded as applied without writing them (and
    so finds its copy matching lock.json): it vouches for a state the log never had."""

    async def skipped(
        self: Follower, copy: Any, record: LockRecord, chunks: list[LogChunk], overlap: bool
    ) -> Any:
        if chunks:
            self._copy = copy = replace(copy, tail=chunks[-1].last)
        return copy

    monkeypatch.setattr(Follower, "_apply", skipped)
    monkeypatch.setattr(follower, "_matches", lambda hashes, record: True)


CASES = {
    "acknowledged_writes_survive": (
        acknowledge_before_shipping,
        schedule(
            *START_BOTH, Step("write", count=3), Step("crash", machine=0), Step("write", count=1)
        ),
    ),
    "restore_matches_model": (
        restore_an_older_moment,
        schedule(
            *START_BOTH,
            Step("write", count=3),
            Step("write", count=2),
            Step("pause", machine=1, seconds=0.5),  # the standby's: time passes
            Step("restore_at", seconds=0.2),
        ),
    ),
    "one_live_lease_at_a_time": (
        ignore_a_live_lease,
        schedule(*START_BOTH, Step("write", count=2), Step("write", count=2)),
    ),
    "published_objects_present": (
        publish_without_uploading,
        schedule(
            *START_BOTH,
            Step("write", count=2),
            Step("pause", machine=1, seconds=0.6),  # the standby's: time passes
            Step("checkpoint"),
            Step("pause", machine=1, seconds=0.6),
            Step("restore_at", seconds=0.9),  # between the writes and the snapshot
        ),
    ),
    "work_stays_bounded": (
        poll_without_waiting,
        schedule(
            *START_BOTH,
            Step("write", count=2),
            Step("disk_full", machine=0, seconds=2.0),  # no writes: time passes
            Step("write", count=2),
        ),
    ),
    "standby_copies_are_published_states": (
        vouch_for_a_copy_without_applying,
        schedule(
            *START_BOTH,
            Step("write", count=2),
            Step("pause", machine=0, seconds=0.3),  # the holder's: the standby follows
            Step("write", count=2),
            Step("pause", machine=0, seconds=0.3),
        ),
    ),
    "serving_has_its_loops": (
        serve_with_a_dead_shipper,
        schedule(Step("start", machine=0), Step("write", count=4)),
    ),
}


@pytest.mark.parametrize("invariant", sorted(CASES))
def test_a_broken_protocol_violates_the_invariant(
    invariant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaks, steps = CASES[invariant]
    breaks(monkeypatch)
    with pytest.raises(SimulationFailed) as failed:
        run_schedule(steps, tmp_path)
    assert getattr(failed.value.cause, "invariant", None) == invariant, failed.value
    assert "--seed 0" in str(failed.value)


@pytest.mark.parametrize("invariant", sorted(CASES))
def test_the_same_schedule_passes_on_the_intact_protocol(invariant: str, tmp_path: Path) -> None:
    _breaks, steps = CASES[invariant]
    outcome = run_schedule(steps, tmp_path)
    assert outcome.checks[invariant] > 0
    # Every write answered, but those in async durability (told nothing of the bucket).
    assert outcome.acked == outcome.writes - outcome.events["async write committed"] > 0


def test_a_machine_that_spins_breaks_the_bound_on_loop_callbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipper's loop is watched by polling, not awaited: a callback every iteration."""
    run = Shipper.run

    async def spinning(self: Shipper, interval: float, snapshot_interval: float) -> None:
        shipping = asyncio.ensure_future(run(self, interval, snapshot_interval))
        while not shipping.done():
            await asyncio.sleep(0)

    monkeypatch.setattr(Shipper, "run", spinning)
    with pytest.raises(SimulationFailed, match=r"loop callbacks in simulated second"):
        run_schedule(CASES["work_stays_bounded"][1], tmp_path)


def test_a_callback_that_blocks_the_loop_breaks_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder reads its WAL on the event loop, and works it over at length there."""
    build = Shipper._build

    def on_the_loop(self: Shipper, after: object) -> object:
        busy_until = time.thread_time() + 0.05
        while time.thread_time() < busy_until:
            pass
        return build(self, after)  # type: ignore[arg-type]

    async def ship_once(self: Shipper) -> bool:
        on_the_loop(self, None)
        return False

    monkeypatch.setattr(invariants, "BLOCKED_SECONDS", 0.04)
    monkeypatch.setattr(Shipper, "ship_once", ship_once)
    with pytest.raises(SimulationFailed, match=r"held the event loop"):
        run_schedule(CASES["work_stays_bounded"][1], tmp_path)


COLLECTED_TOO_SOON = schedule(
    *START_BOTH,
    Step("write", count=3),
    Step("checkpoint"),  # a new base: the first one and its segments become garbage
    Step("write", count=2),
    Step("disk_full", machine=0, seconds=2.0),  # no writes: the collector's interval passes
    Step("restore_at", seconds=2.05),  # before the new base, well within the retention
)


def test_a_collector_that_ignores_the_retention_breaks_invariant_5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init = GarbageCollector.__init__

    def no_retention(self: GarbageCollector, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.retention = 0.0

    monkeypatch.setattr(GarbageCollector, "__init__", no_retention)
    with pytest.raises(SimulationFailed) as failed:
        run_schedule(COLLECTED_TOO_SOON, tmp_path)
    assert getattr(failed.value.cause, "invariant", None) == "published_objects_present"
    assert "restore as of" in str(failed.value)


def test_the_collector_keeps_what_a_restore_within_the_retention_reads(tmp_path: Path) -> None:
    outcome = run_schedule(COLLECTED_TOO_SOON, tmp_path)
    assert outcome.checks["restore_matches_model"] == 1


def test_a_read_with_no_size_cap_breaks_the_bound_on_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lock.json is read whole at whatever size it has."""
    monkeypatch.setattr(lease_module, "LOCK_MAX_BYTES", None)
    with pytest.raises(SimulationFailed, match=r"whole with no size cap"):
        run_schedule(CASES["work_stays_bounded"][1], tmp_path)


def test_a_lock_written_without_if_match_breaks_invariant_5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's CAS of lock.json drops its If-Match: it overwrites what it last read."""
    steps = schedule(Step("start", machine=0), Step("write", count=2))
    run_schedule(steps, tmp_path / "intact")
    write = Lease._write

    async def unconditional(
        self: Lease, record: LockRecord, *, if_match: str | None = None, **kwargs: Any
    ) -> LockRecord:
        return await write(self, record, **kwargs)

    monkeypatch.setattr(Lease, "_write", unconditional)
    with pytest.raises(SimulationFailed) as failed:
        run_schedule(steps, tmp_path / "broken")
    assert getattr(failed.value.cause, "invariant", None) == "published_objects_present"
    assert "overwritten without If-Match: m1 put tenants/acme/lock.json" in str(failed.value)
