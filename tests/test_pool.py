"""ConnectionPool: a long holder costs the other borrowers nothing, and a pool that cannot
lend in time says so (PoolBusyError, ``stalled()``) instead of leaving them waiting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosqlite
import pytest

from tenantdb.connections.pool import ConnectionPool
from tenantdb.errors import PoolBusyError


async def test_one_long_held_connection_adds_no_wait_to_other_borrowers(tmp_path: Path) -> None:
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=8)  # grow_after: the default 100 ms
    held = await pool.acquire()  # a websocket, a streamed response, a background task
    await asyncio.sleep(pool.grow_after * 1.5)  # it has held its turn long: not a quick one
    seen: set[aiosqlite.Connection] = set()
    started = time.monotonic()
    for _ in range(10):
        conn = await pool.acquire()
        seen.add(conn)
        await pool.release(conn)
    took = time.monotonic() - started
    # Before, each borrow waited for the 100 ms grow timer: 10 borrows took over 1 s.
    assert took < 0.5, f"10 borrows beside a long holder took {took:.2f}s"
    assert held not in seen
    assert len(seen) == 1  # the borrowers still take turns on one connection
    await pool.release(held)
    await pool.close()


async def test_borrowers_beside_a_young_turn_still_wait_for_it(tmp_path: Path) -> None:
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=8, grow_after=10)
    first = await pool.acquire()
    order: list[str] = []

    async def second() -> None:
        conn = await pool.acquire()
        order.append("second lent")
        await pool.release(conn)

    waiter = asyncio.create_task(second())
    await asyncio.sleep(0.05)
    order.append("first released")
    await pool.release(first)
    await asyncio.wait_for(waiter, 5)
    # The second borrower went after the first (one writer at a time), not beside it.
    assert order == ["first released", "second lent"]
    await pool.close()


async def test_a_pool_that_cannot_lend_in_time_refuses_and_reports_the_stall(
    tmp_path: Path,
) -> None:
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=2, grow_after=0.01, lend_timeout=0.2)
    assert pool.stalled() is None
    holders = [await pool.acquire()]
    await asyncio.sleep(0.02)
    holders.append(await pool.acquire())  # beside the first, which held its turn long
    await asyncio.sleep(0.02)
    with pytest.raises(PoolBusyError, match=r"within 0.2s \(2 lent") as refused:
        await pool.acquire()
    assert refused.value.held == 2
    reason = pool.stalled()
    assert reason is not None
    assert "p.sqlite3" in reason
    await pool.release(holders.pop())
    async with pool.connection():
        pass  # lent in time again: the stall is over
    assert pool.stalled() is None
    await pool.release(holders.pop())
    await pool.close()


async def test_at_work_counts_young_and_waiting_borrowers_not_parked_or_long_ones(
    tmp_path: Path,
) -> None:
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=8, grow_after=1.0)
    quiet: list[bool] = []
    pool.when_quiet(lambda: quiet.append(pool.at_work()))
    assert not pool.at_work()
    first = await pool.acquire()
    assert pool.at_work()  # a young borrower: a commit may follow within milliseconds
    waiting = asyncio.ensure_future(pool.acquire())  # its turn comes after first's
    await asyncio.sleep(0.01)
    async with pool.parked(first):  # first only waits for the bucket now
        second = await asyncio.wait_for(waiting, 1)
        assert pool.at_work()
        await pool.release(second)
        assert quiet == [False]  # the last turn ended: the group commit is told
        assert not pool.at_work()
    await asyncio.sleep(pool.grow_after * 1.5)
    assert not pool.at_work()  # a long holder (a websocket) may not commit for long
    await pool.release(first)
    await pool.close()
