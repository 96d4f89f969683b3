"""ConnectionPool: the aiosqlite connections that requests borrow, one borrower each."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosqlite

from tenantdb import clock
from tenantdb.connections.commits import CommitTracker
from tenantdb.errors import ConnectionUnavailableError, PoolBusyError, TenantDBError
from tenantdb.replication.shipper import CONNECTION_PRAGMAS

__all__ = ["ConnectionPool"]


# Seconds a stall (a borrower that could not be lent a connection in time) keeps the
# pool reported stalled, unless a connection is lent meanwhile: long enough for a health
# check to see it, short enough that an idle machine does not stay red for nothing.
STALL_MEMORY = 30.0


class ConnectionPool:
    """aiosqlite connections to one file, each lent to one borrower at a time.

    One shared connection would interleave the transactions of concurrent requests, so
    each borrower gets its own. SQLite has a single writer, though: connections that
    write at the same time wait for each other in SQLite's busy handler, which sleeps in
    steps of up to 100 ms. So borrowers take turns: a borrower is lent a connection at once
    while no other borrower had its turn for less than ``grow_after`` seconds (up to
    ``size`` lent at once); beside a *young* borrower it waits for that one to finish, or
    to hold its turn ``grow_after`` seconds, as a websocket or a slow handler does. A
    long holder therefore costs the others nothing. Idle extra connections are closed
    when they come back.

    A borrower that waits longer than ``lend_timeout`` gets ``PoolBusyError`` (the
    middleware answers 503), and ``stalled()`` reports it for a while (health turns red).

    A borrower that only waits (for its writes to reach the bucket) *parks* its
    connection: a parked connection runs no statement, so it is not active, and the next
    borrower's turn comes at once, on another connection (up to ``max_parked`` of them).
    This is what lets a group commit gather many requests' commits, one after the other.
    With ``track_commits`` each connection has a ``CommitTracker`` (see ``commits``).

    ``at_work`` and ``when_quiet`` tell the group commit whether more commits are on
    the way (``replication.group_commit.Writers``).
    """

    def __init__(
        self,
        path: Path,
        size: int,
        *,
        grow_after: float = 0.1,
        lend_timeout: float = 5.0,
        track_commits: bool = False,
        max_parked: int = 256,
    ) -> None:
        self.path = path
        self.size = size
        self.grow_after = grow_after
        self.lend_timeout = lend_timeout
        self.track_commits = track_commits
        self.max_parked = max_parked
        self._idle: list[aiosqlite.Connection] = []  # a stack: the busiest stays warm
        self._opened: list[aiosqlite.Connection] = []
        self._trackers: dict[aiosqlite.Connection, CommitTracker] = {}
        # Active borrowers (lent, or being lent, and not parked), by connection or by the
        # turn that lets them in until they have one: the loop time their turn began.
        self._since: dict[object, float] = {}
        self._parked = 0
        self._turns: deque[asyncio.Future[None]] = deque()  # borrowers waiting, in order
        self._grow_timer: asyncio.TimerHandle | None = None
        self._stall: tuple[float, str] | None = None  # when a borrower gave up, and why
        self._quiet_callbacks: list[Callable[[], None]] = []
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
        """Lend a connection once it is this borrower's turn (see the class docstring).

        Raises ``PoolBusyError`` after ``lend_timeout`` seconds without one.
        """
        if self.closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        ticket: object
        if self._turns or not self._may_lend(loop.time()):
            turn: asyncio.Future[None] = loop.create_future()
            self._turns.append(turn)
            self._arm_grow_timer()
            try:
                async with asyncio.timeout(self.lend_timeout):
                    await turn
            except BaseException as exc:
                if turn.done() and not turn.cancelled():
                    self._since.pop(turn, None)
                    self._next_turn()  # given the turn while leaving: pass it on
                elif turn in self._turns:
                    self._turns.remove(turn)
                if isinstance(exc, TimeoutError):
                    raise self._stalled_error() from None
                raise
            if self.closed:
                raise self._closed_error()
            ticket = turn  # _next_turn counted it as active from the moment it woke it
        else:
            ticket = object()
            self._since[ticket] = loop.time()
        self._stall = None  # lent within the bound: whatever stalled has cleared
        try:
            conn = self._idle.pop() if self._idle else await self._open()
        except BaseException:
            self._since.pop(ticket, None)
            self._next_turn()
            raise
        self._since[conn] = self._since.pop(ticket)
        return conn

    def _may_lend(self, now: float) -> bool:
        """Whether a borrower may be lent a connection now: nobody is active, or every
        active borrower has held its turn ``grow_after`` and the pool is not full."""
        since = self._since
        if not since:
            return True
        return len(since) < self.size and now - max(since.values()) >= self.grow_after

    def at_work(self) -> bool:
        """Whether a borrower waits for its turn, or had it for less than ``grow_after``.

        Such a borrower is likely to commit within milliseconds; a parked one only waits,
        and a long holder (a websocket, a slow handler) may not commit for a long time.
        """
        if self._turns:
            return True
        now = asyncio.get_running_loop().time()
        return any(now - since < self.grow_after for since in self._since.values())

    def when_quiet(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time a turn ends and nobody is at work (see ``at_work``)."""
        self._quiet_callbacks.append(callback)

    def _next_turn(self) -> None:
        """Wake the first waiting borrower if it may be lent one now (or all, once closed)."""
        if self.closed:
            while self._turns:
                turn = self._turns.popleft()
                if not turn.done():
                    turn.set_result(None)
            return
        now = asyncio.get_running_loop().time()
        while self._turns and self._may_lend(now):
            turn = self._turns.popleft()
            if not turn.done():
                self._since[turn] = now
                turn.set_result(None)
                break
        self._arm_grow_timer()
        if not self.at_work():
            for callback in self._quiet_callbacks:
                callback()

    def _arm_grow_timer(self) -> None:
        """Wake the queue once the youngest active borrower has held its turn ``grow_after``."""
        if self._grow_timer is not None or not self._turns or not self._since:
            return
        if len(self._since) >= self.size:
            return  # full: only a connection coming back lets the next borrower in
        loop = asyncio.get_running_loop()
        delay = max(self._since.values()) + self.grow_after - loop.time()
        self._grow_timer = loop.call_later(max(delay, 0.001), self._grow)

    def _grow(self) -> None:
        self._grow_timer = None
        self._next_turn()

    def _stalled_error(self) -> PoolBusyError:
        held = len(self._since) + self._parked
        reason = (
            f"no connection to {self.path.name} came free within {self.lend_timeout:g}s "
            f"({held} lent, at most {self.size} at work at once)"
        )
        self._stall = (clock.monotonic(), reason)
        return PoolBusyError(f"the database is busy: {reason}", held=held)

    def stalled(self) -> str | None:
        """Why a borrower could not be lent a connection in time lately, if one could not.

        A stall is reported until a connection is lent again, or for ``STALL_MEMORY``
        seconds; the health check reads it.
        """
        if self._stall is None:
            return None
        at, reason = self._stall
        if clock.monotonic() - at > STALL_MEMORY:
            self._stall = None
            return None
        return reason

    def _closed_error(self) -> ConnectionUnavailableError:
        return ConnectionUnavailableError(
            f"the database {self.path.name} is closed (shutting down)",
            detail="this machine is shutting down",
        )

    def commits(self, conn: aiosqlite.Connection) -> CommitTracker:
        """The commit tracker of a connection this pool lent (with ``track_commits``)."""
        try:
            return self._trackers[conn]
        except KeyError:
            raise TenantDBError("this connection's commits are not tracked") from None

    @contextlib.asynccontextmanager
    async def parked(self, conn: aiosqlite.Connection) -> AsyncIterator[None]:
        """While ``conn``'s borrower only waits, the next borrower's turn comes (see the class)."""
        if self._parked >= self.max_parked or conn not in self._since:
            yield  # enough connections wait already: this one stays counted as active
            return
        self._parked += 1
        since = self._since.pop(conn)
        self._next_turn()
        try:
            yield
        finally:
            self._parked -= 1
            if not self.closed:
                self._since[conn] = since

    async def release(self, conn: aiosqlite.Connection) -> None:
        """Take a connection back; a transaction the request left open is rolled back."""
        if self.closed:
            return
        self._since.pop(conn, None)
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
