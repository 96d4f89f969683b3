"""ConnectionPool: the aiosqlite connections that requests borrow, one request each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite

from tenantdb.commits import CommitTracker
from tenantdb.errors import TenantDBError
from tenantdb.replication.shipper import CONNECTION_PRAGMAS

__all__ = ["ConnectionPool"]

log = logging.getLogger("tenantdb")


class ConnectionPool:
    """aiosqlite connections to one file, each lent to one request at a time.

    One shared connection would interleave the transactions of concurrent requests, so
    each request borrows its own. SQLite has a single writer, though: connections that
    write at the same time wait for each other in SQLite's busy handler, which sleeps in
    steps of up to 100 ms. So the pool is elastic: it lends one connection while requests
    give it back quickly, and opens another (up to ``size``) only when a request has
    waited ``grow_after`` seconds, as behind a websocket or a slow handler holding one.
    Idle extra connections are closed when they come back.

    A borrower that only waits (for its writes to reach the bucket) *parks* its
    connection: a parked connection runs no statement, so it does not count against
    ``size``, and a request arriving meanwhile gets another connection at once (up to
    ``max_parked`` more). This is what lets a group commit gather many requests.
    With ``track_commits`` each connection has a ``CommitTracker`` (see ``commits``).
    """

    def __init__(
        self,
        path: Path,
        size: int,
        *,
        grow_after: float = 0.1,
        track_commits: bool = False,
        max_parked: int = 256,
    ) -> None:
        self.path = path
        self.size = size
        self.grow_after = grow_after
        self.track_commits = track_commits
        self.max_parked = max_parked
        # Last in, first out: the busiest connection stays warm. None wakes a waiter on close.
        self._idle: asyncio.LifoQueue[aiosqlite.Connection | None] = asyncio.LifoQueue()
        self._opened: list[aiosqlite.Connection] = []
        self._trackers: dict[aiosqlite.Connection, CommitTracker] = {}
        self._reserved = 0  # connections open or being opened
        self._parked = 0
        self._waiting = 0
        self._openers: set[asyncio.Task[None]] = set()
        self.closed = False

    async def _open(self) -> aiosqlite.Connection:
        self._reserved += 1
        try:
            conn = await aiosqlite.connect(self.path)
            try:
                for pragma in (*CONNECTION_PRAGMAS, "PRAGMA synchronous=NORMAL"):
                    await conn.execute(pragma)
                if self.track_commits:
                    tracker = CommitTracker(lambda: conn.in_transaction)
                    await conn.set_trace_callback(tracker.trace)
                    self._trackers[conn] = tracker
                if self.closed:
                    # close() ran while this connection was being made: it never saw it,
                    # and a write on it would land after the final snapshot.
                    raise self._closed_error()
            except BaseException:
                self._trackers.pop(conn, None)
                await conn.close()
                raise
        except BaseException:
            self._reserved -= 1
            raise
        self._opened.append(conn)
        return conn

    @property
    def _active(self) -> int:
        """Connections open or opening that are not parked."""
        return self._reserved - self._parked

    def _may_open(self) -> bool:
        return self._active < self.size and self._reserved < self.size + self.max_parked

    async def acquire(self) -> aiosqlite.Connection:
        """Lend a connection: an idle one, a new one if none is open, else wait for one."""
        if self.closed:
            raise self._closed_error()
        if not self._idle.empty() and self._waiting == 0:  # waiters go first
            lent = self._idle.get_nowait()
        elif self._active == 0 and self._may_open():
            return await self._open()
        else:
            lent = await self._wait_or_grow()
        if lent is None:
            raise self._closed_error()
        return lent

    async def _wait_or_grow(self) -> aiosqlite.Connection | None:
        self._waiting += 1
        try:
            try:
                lent = await asyncio.wait_for(self._idle.get(), self.grow_after)
            except TimeoutError:
                if self._may_open() and not self.closed:
                    return await self._open()
                lent = await self._idle.get()
        finally:
            self._waiting -= 1
        return lent

    def _closed_error(self) -> TenantDBError:
        return TenantDBError(f"the database {self.path.name} is closed (shutting down)")

    def commits(self, conn: aiosqlite.Connection) -> CommitTracker:
        """The commit tracker of a connection this pool lent (with ``track_commits``)."""
        try:
            return self._trackers[conn]
        except KeyError:
            raise TenantDBError("this connection's commits are not tracked") from None

    @contextlib.asynccontextmanager
    async def parked(self) -> AsyncIterator[None]:
        """While a borrower only waits: its connection does not count against ``size``."""
        self._parked += 1
        if (
            self._waiting > self._idle.qsize() + len(self._openers)
            and self._may_open()
            and not self.closed
        ):
            # Someone waits behind this borrower: give them a connection now.
            opener = asyncio.get_running_loop().create_task(self._open_for_waiter())
            self._openers.add(opener)
            opener.add_done_callback(self._openers.discard)
        try:
            yield
        finally:
            self._parked -= 1

    async def _open_for_waiter(self) -> None:
        try:
            conn = await self._open()
        except (TenantDBError, OSError, aiosqlite.Error) as exc:
            if not self.closed:
                log.warning("could not open another connection to %s: %s", self.path.name, exc)
            return
        self._idle.put_nowait(conn)

    async def release(self, conn: aiosqlite.Connection) -> None:
        """Take a connection back; a transaction the request left open is rolled back."""
        if self.closed:
            return
        if conn.in_transaction:
            await conn.rollback()
        if self._waiting == 0 and self._parked == 0 and not self._idle.empty():
            # Nobody waits or will soon: shrink back towards one connection.
            self._opened.remove(conn)
            self._trackers.pop(conn, None)
            self._reserved -= 1
            await conn.close()
            return
        self._idle.put_nowait(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosqlite.Connection]:
        """Borrow a connection for the duration of a ``with`` block."""
        conn = await self.acquire()
        try:
            yield conn
        finally:
            await self.release(conn)

    async def close(self) -> None:
        """Close every connection (uncommitted transactions are rolled back).

        Requests still waiting for a connection get a ``TenantDBError``.
        """
        self.closed = True
        for opener in list(self._openers):
            opener.cancel()
        await asyncio.gather(*self._openers, return_exceptions=True)
        for _ in range(self._waiting):
            self._idle.put_nowait(None)
        for conn in self._opened:
            await conn.close()
        self._opened.clear()
        self._trackers.clear()
