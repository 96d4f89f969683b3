"""CopyConnections: a replica's read-only connections to its copy, kept between the
follower's writes.

Opening a connection costs an aiosqlite thread start and SQLite's open, about three times a
point read, and the start holds the event loop until the new thread runs, which under load
can take a while. So a read gives its connection back, and the next read takes it.

A connection to the copy is opened with ``immutable=1`` (the follower writes the pages in
place, under SQLite's feet: no locks, no -shm), and such a connection trusts its page cache
and its idea of the file's size: one that was open across a write of the follower could read
stale pages. So the follower retires every idle connection (``retire``) before it changes a
page, while the ``CopyLock`` keeps reads out, and none is lent across a write. A connection
whose read left anything behind (a transaction, a temp table, a pragma, an attachment) is
closed rather than kept: the next read starts as on a new connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

import aiosqlite

__all__ = ["PURE_READS", "Authorizer", "CopyConnections", "close_connections"]

Authorizer = Callable[[int, object, object, str | None, object], int]

# SQLite authorizer actions that leave nothing behind on the connection.
PURE_READS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)


class CopyConnections:
    """Read-only connections to the file at ``path``: up to ``keep`` idle ones are kept."""

    def __init__(self, path: Path, keep: int) -> None:
        if keep < 0:
            raise ValueError(f"keep must be at least 0, not {keep}")
        self._uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        self._keep = keep
        self._idle: list[aiosqlite.Connection] = []
        self._closed = False
        self.opened = 0  # connections opened so far (a reused one is not counted again)

    async def take(self, authorizer: Authorizer) -> aiosqlite.Connection:
        """An idle connection, or a new one, that asks ``authorizer`` about each action."""
        if self._closed:
            raise RuntimeError("CopyConnections is closed")
        connection = self._idle.pop() if self._idle else await self._open()
        try:
            await connection.set_authorizer(authorizer)
        except BaseException:
            await close_connections([connection])
            raise
        return connection

    async def give_back(self, connection: aiosqlite.Connection, *, reusable: bool) -> None:
        """End a read: keep ``connection`` for the next one, or close it."""
        keep = reusable and not self._closed and len(self._idle) < self._keep
        if keep and not connection.in_transaction:
            self._idle.append(connection)
            return
        await close_connections([connection])

    def retire(self) -> list[aiosqlite.Connection]:
        """Take the idle connections out of use (the copy is about to change under them);
        the caller closes them (``close_connections``) once it no longer holds the reads out."""
        retired, self._idle = self._idle, []
        return retired

    async def close(self) -> None:
        """Close the idle connections; the ones lent out now are closed when given back."""
        self._closed = True
        await close_connections(self.retire())

    async def _open(self) -> aiosqlite.Connection:
        connection = await aiosqlite.connect(self._uri, uri=True)
        try:
            await connection.execute("PRAGMA query_only = 1")
        except BaseException:
            await close_connections([connection])
            raise
        self.opened += 1
        return connection


async def close_connections(connections: Iterable[aiosqlite.Connection]) -> None:
    """Close ``connections`` (those ``retire`` took out of use, say) at once."""
    # Each close ends a thread that keeps the process alive: they run to the end even when
    # the task is cancelled meanwhile (the cancellation is raised after).
    closing = [asyncio.ensure_future(connection.close()) for connection in connections]
    if closing:
        await asyncio.shield(asyncio.gather(*closing, return_exceptions=True))
