"""Group commit: many callers wait for their commits to be in the bucket; one upload serves all.

A caller of ``GroupCommit.wait`` joins the publication in flight, or starts the next one
as soon as the previous ended. Each publication carries every commit made before it
started, so the number of uploads follows the round trips, not the requests.

Before starting a publication, the first caller waits a moment for the callers the last
one answered: a client that was just answered usually commits again within milliseconds,
and without the wait its commit would miss the upload that starts at once and wait for
two round trips instead of one. The wait ends as soon as as many callers wait as were
waiting when the last publication ended, and never lasts longer than ``GATHER_FRACTION``
of the last publication's time (nor ``GATHER_MAX_SECONDS``): a lone writer never waits.

Half a publication is too short when the writers' commits take longer than that: SQLite
has one writer, so 32 callers answered at once commit one after the other (about 0.35 ms
each on a loaded two-core machine, 11 ms for all), and against a bucket that answers in
8 ms a publication left after 4 ms with a third of them; the rest waited for the next one
(about 15 writes a request). So while ``writers`` says that others are at work on a
connection (their commits are on the way), the wait may last up to ``WORKING_FRACTION``
of the last publication's time; once nobody is at work, the half publication bounds it
again (a client answered over the network may still come back). A lone writer still
never waits. Whatever the wait, a caller returns only once a publication that began
reading after its commit covered it (see ``wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from tenantdb.errors import LeaseLostError

__all__ = ["GroupCommit", "Writers", "retrieve_exception"]

GATHER_FRACTION = 0.5
WORKING_FRACTION = 2.0
GATHER_MAX_SECONDS = 0.025


class Writers(Protocol):
    """Who may commit soon: what a publication's gathering asks (the connection pool)."""

    def at_work(self) -> bool:
        """Whether a writer is at work on a connection, or waiting for its turn on one."""
        ...

    def when_quiet(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time nobody is at work any more."""
        ...


class GroupCommit:
    """Shares publications among the callers waiting for their commits to be durable."""

    def __init__(
        self,
        publish: Callable[[], Awaitable[bool]],
        *,
        tenant: str,
        writers: Writers | None = None,
    ) -> None:
        """``publish`` publishes every commit so far; it returns False if there was none.

        ``writers`` tells whether more commits are on the way (None: never known)."""
        self._publish = publish
        self._tenant = tenant
        self._writers = writers
        self._flush: asyncio.Task[tuple[int, bool]] | None = None
        self._begun = 0  # publications that have begun reading what to publish
        self._waiting = 0
        self._arrived = asyncio.Event()  # a caller came, or the writers fell quiet
        if writers is not None:
            writers.when_quiet(self._arrived.set)
        self._last_group = 0  # callers waiting when the last publication ended
        self._last_took = 0.0  # seconds the last publication took
        self.closed = False

    def close(self) -> None:
        """Fail the waiting callers, and stop the publication in flight (it may stall)."""
        self.closed = True
        if self._flush is not None:
            self._flush.cancel()

    async def wait(self, done: Callable[[], bool]) -> None:
        """Return once ``done()`` holds, publishing (shared with others) until it does.

        Also returns once a publication that began after the call found nothing left to
        publish: everything committed before the call was shipped by then. One that began
        earlier proves nothing about the caller's commit, however it ended. A failed
        publication fails every caller waiting on it; a caller that is cancelled never
        cancels the publication others share.
        """
        self._waiting += 1
        self._arrived.set()
        arrived = self._begun
        try:
            while not done():
                if self.closed:
                    raise LeaseLostError(
                        f"tenant {self._tenant}: log shipping stopped before this commit "
                        "was in the bucket",
                        tenant=self._tenant,
                    )
                flush = self._flush
                if flush is None or flush.done():
                    flush = self._flush = asyncio.get_running_loop().create_task(self._gathered())
                    flush.add_done_callback(retrieve_exception)
                await asyncio.wait({flush})  # a waiter's cancellation never cancels it
                if flush.cancelled():
                    continue
                begun, published = flush.result()
                if begun > arrived and not published:
                    return  # read after this caller's commit, and nothing was left
        finally:
            self._waiting -= 1

    async def _gathered(self) -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        answered = now + min(self._last_took * GATHER_FRACTION, GATHER_MAX_SECONDS)
        working = now + min(self._last_took * WORKING_FRACTION, GATHER_MAX_SECONDS)
        while self._waiting < self._last_group:
            at_work = self._writers is not None and self._writers.at_work()
            left = (working if at_work else answered) - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        started = loop.time()
        self._begun += 1
        begun = self._begun
        try:
            return begun, await self._publish()
        finally:
            self._last_took = loop.time() - started
            # Those it served and those that came meanwhile: who will wait for the next.
            self._last_group = self._waiting


def retrieve_exception(task: asyncio.Future[Any]) -> None:
    """A done callback: mark a task's failure as seen (its waiters may all be gone)."""
    # Whoever awaited it may have given up (cancelled): its failure is theirs, not a leak.
    if not task.cancelled():
        task.exception()
