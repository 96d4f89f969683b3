"""Group commit: each waiter returns only once a publication covered its own commit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tenantdb.replication import group_commit
from tenantdb.replication.group_commit import GroupCommit


class Log:
    """Commits counted locally and in the bucket; a publication reads, then uploads."""

    def __init__(self) -> None:
        self.committed = 0
        self.shipped = 0
        self.reading = asyncio.Event()  # set once a publication has read what to ship
        self.upload = asyncio.Event()  # the upload's answer, released by the test

    async def publish(self) -> bool:
        seen = self.committed
        self.reading.set()
        await self.upload.wait()
        if seen <= self.shipped:
            return False
        self.shipped = seen
        return True


async def test_group_commit_waiter_returns_only_after_its_commit_is_shipped() -> None:
    log = Log()
    group = GroupCommit(log.publish, tenant="acme")
    # A first caller starts a publication, which reads the log before the next commit.
    first = asyncio.ensure_future(group.wait(lambda: log.shipped >= 1 or log.reading.is_set()))
    await asyncio.wait_for(log.reading.wait(), 1)
    log.committed += 1  # a commit lands after that read
    target = log.committed
    second = asyncio.ensure_future(group.wait(lambda: log.shipped >= target))
    await asyncio.sleep(0)
    log.upload.set()  # the publication in flight ends, having found nothing
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert log.shipped >= target


async def test_a_publication_begun_after_the_call_that_finds_nothing_ends_the_wait() -> None:
    log = Log()
    log.upload.set()
    group = GroupCommit(log.publish, tenant="acme")
    # A target that can never be checked (no WAL index, say): the empty publication answers.
    await asyncio.wait_for(group.wait(lambda: False), 1)
    assert log.reading.is_set()


class Pool:
    """Writers at work or not, as the test says; it calls back when they fall quiet."""

    def __init__(self) -> None:
        self.working = True
        self.callbacks: list[Callable[[], None]] = []

    def at_work(self) -> bool:
        return self.working

    def when_quiet(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def fall_quiet(self) -> None:
        self.working = False
        for callback in self.callbacks:
            callback()


class TimedLog:
    """Commits counted locally and in the bucket; a publication takes ``took`` seconds."""

    def __init__(self, took: float) -> None:
        self.took = took
        self.committed = 0
        self.shipped = 0
        self.publications: list[float] = []  # when each began reading (loop time)

    async def publish(self) -> bool:
        seen = self.committed
        self.publications.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.took)
        if seen <= self.shipped:
            return False
        self.shipped = seen
        return True

    async def commit_and_wait(self, group: GroupCommit) -> None:
        self.committed += 1
        target = self.committed
        await group.wait(lambda: self.shipped >= target)


async def two_served_then_one_back(
    log: TimedLog, group: GroupCommit
) -> tuple[float, asyncio.Future[None]]:
    """Two callers share a publication; one commits again at once (when, in loop time, and
    its wait). The other comes back later: the test's part."""
    await asyncio.gather(log.commit_and_wait(group), log.commit_and_wait(group))
    return asyncio.get_running_loop().time(), asyncio.ensure_future(log.commit_and_wait(group))


async def test_while_writers_are_at_work_a_publication_waits_past_half_the_last_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(group_commit, "GATHER_MAX_SECONDS", 10.0)  # times the test can see
    log, pool = TimedLog(took=0.2), Pool()
    group = GroupCommit(log.publish, tenant="acme", writers=pool)
    _, first = await two_served_then_one_back(log, group)
    await asyncio.sleep(0.25)  # past half the last publication (0.1 s), within two (0.4 s)
    await asyncio.wait_for(asyncio.gather(first, log.commit_and_wait(group)), 2)
    # The second caller's commit came while the first one's publication was gathering.
    assert len(log.publications) == 2, log.publications


async def test_once_nobody_is_at_work_half_the_last_publication_bounds_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(group_commit, "GATHER_MAX_SECONDS", 10.0)
    log, pool = TimedLog(took=0.2), Pool()
    group = GroupCommit(log.publish, tenant="acme", writers=pool)
    came, first = await two_served_then_one_back(log, group)
    await asyncio.sleep(0.05)  # gathering, while a writer is at work
    pool.fall_quiet()
    await asyncio.wait_for(first, 2)
    assert len(log.publications) == 2
    assert log.publications[1] - came < 0.2  # half a publication (0.1 s), not two (0.4 s)
