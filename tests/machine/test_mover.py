"""The mover: only the table's moves, the loops of a role left behind are stopped.

The first tests drive the ``Mover`` with stand-in roles (one per state, each running a
loop); the last runs a real ``TenantDB`` through standby, takeover, fencing and stop on a
local bucket and checks after each move that only the current role's loops run.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

import pytest

from tenantdb.config import Settings
from tenantdb.machine.database import TenantDB
from tenantdb.machine.mover import (
    MOVES,
    Failing,
    Mover,
    MoveRefusedError,
    Role,
    TenantState,
)
from tenantdb.storage import Bucket

STATES: tuple[TenantState, ...] = get_args(TenantState)


class Counted:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def task_failed(self, task: str) -> None:
        self.failed.append(task)


async def forever() -> None:
    await asyncio.Event().wait()


class StandIn(Role):
    """A role of any state that runs one endless loop named after it."""

    def __init__(self, mover: Mover, state: TenantState, *, inherited: tuple[str, ...] = ()):
        super().__init__(mover)
        self.state = state  # type: ignore[misc]  # a class variable in the real roles
        self._inherited = inherited

    def enter(self) -> None:
        self.spawn(f"{self.state} loop", forever, "restart")

    def inherits(self, task: str) -> bool:
        return task in self._inherited


class StandInFailed(Failing):
    state = "failed"

    def __init__(self, mover: Mover, reason: str) -> None:
        super().__init__(mover)
        self.reason = reason
        self.finished = False

    async def finish(self) -> None:
        await self.mover.supervisor.cancel()
        self.finished = True


def make_mover() -> Mover:
    mover: Mover

    def failed(reason: str) -> Failing:
        return StandInFailed(mover, reason)

    mover = Mover("acme", failures=Counted(), failed=failed)
    return mover


def path_to(state: TenantState) -> list[TenantState]:
    """The states from "stopped" to ``state`` by the table's moves (breadth first)."""
    paths: dict[TenantState, list[TenantState]] = {"stopped": []}
    queue: deque[TenantState] = deque(["stopped"])
    while queue:
        here = queue.popleft()
        for there in sorted(MOVES[here]):
            if there not in paths:
                paths[there] = [*paths[here], there]
                queue.append(there)
    return paths[state]


def moved_to(state: TenantState) -> Mover:
    """A mover in ``state`` by the table's moves, its role a stand-in running its loop."""
    mover = make_mover()
    for step in path_to(state) if state != "stopped" else ["starting", "stopped"]:
        mover.move(StandIn(mover, step))
    assert mover.state == state
    return mover


def live(mover: Mover) -> set[asyncio.Task[None]]:
    return {task for task in mover.supervisor.tasks if not task.done()}


def every_pair(allowed: bool) -> Iterator[tuple[TenantState, TenantState]]:
    for here in STATES:
        for there in STATES:
            if (there in MOVES[here]) == allowed:
                yield here, there


def test_the_table_names_every_state_and_reaches_each_from_stopped() -> None:
    assert set(MOVES) == set(STATES)
    assert all(moves <= set(STATES) for moves in MOVES.values())
    assert all(path_to(state) or state == "stopped" for state in STATES)


@pytest.mark.parametrize(("here", "there"), list(every_pair(allowed=False)))
async def test_a_move_outside_the_table_is_refused_and_changes_nothing(
    here: TenantState, there: TenantState
) -> None:
    mover = moved_to(here)
    role, tasks = mover.role, dict(mover.role.tasks)
    with pytest.raises(MoveRefusedError, match=f"tenant acme: no move from {here} to {there}$"):
        mover.move(StandIn(mover, there))
    assert mover.role is role
    assert mover.state == here
    await asyncio.sleep(0)
    assert role.tasks == tasks
    assert all(not task.done() for task in tasks.values())
    await mover.supervisor.cancel()


@pytest.mark.parametrize(("here", "there"), list(every_pair(allowed=True)))
async def test_a_move_in_the_table_is_made_and_stops_the_loops_of_the_role_left(
    here: TenantState, there: TenantState
) -> None:
    mover = moved_to(here)
    left = set(mover.role.tasks.values())
    assert left, "the stand-in role runs a loop"
    mover.move(StandIn(mover, there))
    assert mover.state == there
    assert mover.serving_now.is_set() == (there == "serving")
    await asyncio.sleep(0)
    assert all(task.cancelled() for task in left)
    assert live(mover) == set(mover.role.tasks.values())
    await mover.supervisor.cancel()


async def test_the_next_role_keeps_only_the_loops_it_inherits() -> None:
    mover = moved_to("starting")

    class Renewing(StandIn):
        def enter(self) -> None:
            self.spawn("renewal", forever, "fail_stop")
            self.spawn("recovery", forever, "restart")

    mover.move(Renewing(mover, "restoring"))
    renewal, recovery = mover.role.tasks["renewal"], mover.role.tasks["recovery"]
    serving = StandIn(mover, "serving", inherited=("renewal",))
    mover.move(serving)
    await asyncio.sleep(0)
    assert recovery.cancelled()
    assert not renewal.done()
    assert serving.tasks == {"renewal": renewal, "serving loop": serving.tasks["serving loop"]}
    assert live(mover) == set(serving.tasks.values())
    await mover.supervisor.cancel()


async def test_the_loop_that_makes_a_move_is_left_to_end_itself() -> None:
    mover = moved_to("starting")
    finished = asyncio.Event()

    class TakingOver(StandIn):
        def enter(self) -> None:
            self.spawn("standby", self._take_over, "restart")

        async def _take_over(self) -> None:
            self.mover.move(StandIn(self.mover, "restoring"))
            await asyncio.sleep(0)  # a cancelled task would stop here
            finished.set()

    mover.move(TakingOver(mover, "standby"))
    await asyncio.wait_for(finished.wait(), 1)
    assert mover.state == "restoring"
    await mover.supervisor.cancel()


async def test_a_role_no_longer_current_cannot_start_loops() -> None:
    mover = moved_to("starting")
    old = mover.role
    mover.move(StandIn(mover, "standby"))
    with pytest.raises(MoveRefusedError, match="is not the current role"):
        old.spawn("late", forever, "restart")
    assert "late" not in {task.get_name().rsplit(" ", 1)[-1] for task in mover.supervisor.tasks}
    await mover.supervisor.cancel()


async def test_a_fail_stop_loop_dying_moves_to_failed_and_stops_every_other_loop() -> None:
    mover = moved_to("serving")
    other = next(iter(mover.role.tasks.values()))

    async def broken() -> None:
        raise ValueError("injected")

    mover.role.spawn("shipper", broken, "fail_stop")
    assert await asyncio.wait_for(mover.failed(), 1) == "the shipper task died (ValueError)"
    assert mover.state == "failed"
    assert isinstance(mover.role, StandInFailed)
    assert mover.role.finished
    assert other.cancelled()
    assert not live(mover)


async def test_a_fail_stop_loop_dying_where_failed_is_no_move_changes_no_role() -> None:
    mover = moved_to("stopping")

    async def broken() -> None:
        raise ValueError("injected")

    task = mover.role.spawn("shipper", broken, "fail_stop")
    await asyncio.wait_for(task, 1)
    assert mover.state == "stopping"
    assert mover.failure is None
    assert mover.failing is None
    await mover.supervisor.cancel()


# A real machine: after each move, the loops that run are exactly the current role's.


def names(tdb: TenantDB) -> set[str]:
    """The loops that run, each of which must be the current role's."""
    role = tdb._mover.role
    running = {task for task in tdb._supervisor.tasks if not task.done()}
    assert running <= set(role.tasks.values()), (tdb.state, running, role.tasks)
    return {name for name, task in role.tasks.items() if task in running}


async def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def settled(tdb: TenantDB, state: TenantState, loops: set[str]) -> Callable[[], bool]:
    """True once ``tdb`` is in ``state`` and exactly ``loops`` (its role's) run."""

    def check() -> bool:
        if tdb.state != state:
            return False
        running = {task for task in tdb._supervisor.tasks if not task.done()}
        return {task.get_name().split(" ", 2)[2] for task in running} == loops

    return check


async def test_each_real_role_runs_only_its_own_loops_and_leaves_none_behind(
    tmp_path: Path, local_bucket: Bucket
) -> None:
    def machine(name: str) -> TenantDB:
        settings = Settings(
            tenant="acme",
            machine_id=name,
            data_dir=tmp_path / name,
            lease_ttl=3,
            follow_interval=0.05,
            checkpoint_interval=0,
        )
        return TenantDB(settings, migrations=["CREATE TABLE t (x)"], bucket=local_bucket)

    holder, standby = machine("m1"), machine("m2")
    await holder.start(standby=False)
    try:
        await standby.start()
        await until(settled(standby, "standby", {"standby"}))
        assert names(standby) == {"standby"}

        await holder.stop()  # the standby takes over: its loop ends, the holder's start
        serving = {"renewal", "shipper", "gc", "idle"}
        await until(settled(standby, "serving", serving))
        assert names(standby) == serving
        holding = set(standby._mover.role.tasks.values())

        standby.lease.step_down("renewals failed (injected)")
        assert standby.state == "fenced"
        # Cancelled by the move itself, before the fenced role's loop has even run.
        assert all(task.cancelling() or task.done() for task in holding)
        await until(settled(standby, "serving", serving))  # it takes its own lease back
        assert names(standby) == serving
        assert all(task.done() for task in holding)
    finally:
        await holder.stop()
        await standby.stop()
    assert not standby._supervisor.tasks
    assert not holder._supervisor.tasks
