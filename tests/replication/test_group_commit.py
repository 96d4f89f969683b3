"""Group commit: each waiter returns only once a publication covered its own commit."""

from __future__ import annotations

import asyncio

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
