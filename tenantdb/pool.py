"""ConnectionPool: the aiosqlite connections that requests borrow, one request each."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite

from tenantdb.commits import CommitTracker
from tenantdb.errors import TenantDBError
from tenantdb.replication.shipper import CONNECTION_PRAGMAS

__all__ = ["ConnectionPool"]


class ConnectionPool:
    """aiosqlite connections to one file, each lent to one request at a time.

    One shared connection would interleave the transactions of concurrent requests, so
    each request borrows its own. SQLite has a single writer, though: connections that
    write at the same time wait for each other in SQLite's busy handler, which sleeps in
    steps of up to 100 ms. So borrowers take turns: the pool lends while no other borrower
    is *active*, and lets a borrower go beside an active one (up to ``size`` active) only
    once it has waited ``grow_after`` seconds, as behind a websocket or a slow handler.
    Idle extra connections are closed when they come back.

    A borrower that only waits (for its writes to reach the bucket) *parks* its
    connection: a parked connection runs no statement, so it is not active, and the next
    borrower's turn comes at once, on another connection (up to ``max_parked`` of them).
    This is what lets a group commit gather many requests' commits, one after the other.
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
        self._idle: list[aiosqlite.Connection] = []  # a stack: the busiest stays warm
        self._opened: list[aiosqlite.Connection] = []
        self._trackers: dict[aiosqlite.Connection, CommitTracker] = {}
        self._active = 0  # lent (or being opened for a borrower) and not parked
        self._parked = 0
        self._turns: deque[asyncio.Future[None]] = deque()  # borrowers waiting, in order
        self._turn_started = 0.0  # loop time the newest active borrower got its turn
        self._grow_timer: asyncio.TimerHandle | None = None
        self.closed = False

    async def _open(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path)
        try:
            for pragma in (*CONNECTION_PRAGMAS, "PRAGMA synchronous=NORMAL"):
                await conn.execute(pragma)
            if self.track_commits:
                self._trackers[conn] = CommitTracker(conn, self.path)
            if self.closed:
                # close() ran while this connection was being made: it never saw it,
                # and a write on it would land after the final snapshot.
                raise self._closed_error()
        except BaseException:
            self._trackers.pop(conn, None)
            await conn.close()
            raise
        self._opened.append(conn)
        return conn

    async def acquire(self) -> aiosqlite.Connection:
        """Lend a connection once it is this borrower's turn (see the class docstring)."""
        if self.closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        if self._active > 0 or self._turns:
            turn: asyncio.Future[None] = loop.create_future()
            self._turns.append(turn)
            self._arm_grow_timer()
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._next_turn()  # given the turn while leaving: pass it on
                elif turn in self._turns:
                    self._turns.remove(turn)
                raise
            if self.closed:
                raise self._closed_error()
        self._active += 1
        self._turn_started = loop.time()
        try:
            return self._idle.pop() if self._idle else await self._open()
        except BaseException:
            self._active -= 1
            self._next_turn()
            raise

    def _next_turn(self) -> None:
        """Wake the first waiting borrower if nobody is active (or all, the pool closed)."""
        if self._active > 0 and not self.closed:
            return
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)
                if not self.closed:
                    return

    def _arm_grow_timer(self, delay: float | None = None) -> None:
        if self._grow_timer is None and self._turns:
            self._grow_timer = asyncio.get_running_loop().call_later(
                self.grow_after if delay is None else delay, self._grow
            )

    def _grow(self) -> None:
        """The grow timer: if one borrower has held its turn ``grow_after``, go beside it."""
        self._grow_timer = None
        if not self._turns:
            return
        held_for = asyncio.get_running_loop().time() - self._turn_started
        if self._active == 0:
            self._next_turn()
        elif held_for >= self.grow_after and self._active < self.size:
            self._turns.popleft().set_result(None)
            held_for = 0.0
        self._arm_grow_timer(max(self.grow_after - held_for, 0.001))

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
        """While a borrower only waits, the next borrower's turn comes (see the class)."""
        if self._parked >= self.max_parked:
            yield  # enough connections wait already: this one stays counted as active
            return
        self._parked += 1
        self._active -= 1
        self._next_turn()
        try:
            yield
        finally:
            self._parked -= 1
            self._active += 1

    async def release(self, conn: aiosqlite.Connection) -> None:
        """Take a connection back; a transaction the request left open is rolled back."""
        if self.closed:
            return
        self._active -= 1
        try:
            if conn.in_transaction:
                await conn.rollback()
            if not self._turns and self._parked == 0 and self._idle:
                # Nobody waits or will soon: shrink back towards one connection.
                self._opened.remove(conn)
                self._trackers.pop(conn, None)
                await conn.close()
            else:
                self._idle.append(conn)
        finally:
            self._next_turn()

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

        Borrowers still waiting for their turn get a ``TenantDBError``.
        """
        self.closed = True
        if self._grow_timer is not None:
            self._grow_timer.cancel()
        self._next_turn()
        for conn in self._opened:
            await conn.close()
        self._opened.clear()
        self._idle.clear()
        self._trackers.clear()
