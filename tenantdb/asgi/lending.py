"""RequestConnection: a request's database connection, borrowed only while it is used.

A request that held a pooled connection from its first byte to its last would hold it
while it waits on its client: a slow upload, an idle websocket, a client that reads its
answer slowly. Eight such clients would hold every connection and stop the tenant. So the
connection a request sees (``request.state.db``, ``tenant_db(request)``) is an
``aiosqlite.Connection`` that has none of its own: every call it makes goes through
``_execute``, which borrows one of the pool's connections at the first statement, and the
middleware gives that one back (``set_aside``) whenever the request waits on its client
with nothing open on it: no transaction, no statement running, no cursor still open.
Settings the request made (``row_factory``, ``text_factory``, ``isolation_level``) go
with it to the next connection it borrows; a function, trace callback, authorizer or
extension it installs pins the connection to the request until it ends.

With ``track_commits`` the request's commits are gathered across the connections it
borrowed, for the output gate (``take``).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
from aiosqlite.context import contextmanager as _result

from tenantdb.connections.pool import ConnectionPool
from tenantdb.errors import TenantDBError

__all__ = ["RequestConnection"]

# sqlite3.Connection methods whose effect stays on the connection: a request that calls
# one keeps its connection to the end.
_PINNING = frozenset(
    {
        "create_function",
        "create_aggregate",
        "create_window_function",
        "create_collation",
        "set_trace_callback",
        "set_authorizer",
        "set_progress_handler",
        "enable_load_extension",
        "load_extension",
    }
)
_DEFAULTS: dict[str, Any] = {"row_factory": None, "text_factory": str, "isolation_level": ""}


class _Deferred:
    """A method of the connection not borrowed yet, looked up again once it is."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Unlent:
    """``_conn`` before a connection is borrowed: its methods are ``_Deferred``."""

    def __getattr__(self, name: str) -> _Deferred:
        return _Deferred(name)


_UNLENT = _Unlent()


def _setting(name: str) -> Any:
    """A connection setting the request keeps across the connections it borrows."""

    def get(self: RequestConnection) -> Any:
        return self._settings.get(name, _DEFAULTS[name])

    def set_(self: RequestConnection, value: Any) -> None:
        self._settings[name] = value
        if self._lent is not None:
            setattr(self._lent, name, value)

    return property(get, set_)


class RequestConnection(aiosqlite.Connection):
    """An ``aiosqlite.Connection`` that borrows from ``pool`` only while it is used."""

    # aiosqlite.Connection.__init__ is not called on purpose: it would make a thread and a
    # queue for every request, and every call runs on the lent connection's thread anyway.
    def __init__(self, pool: ConnectionPool, *, track_commits: bool) -> None:
        self._pool = pool
        self._track = track_commits
        self._lent: aiosqlite.Connection | None = None
        self._lending: asyncio.Lock | None = None  # made on the first borrow (most need none)
        self._busy = 0  # calls running on the lent connection
        self._pinned = False
        self._cursors: weakref.WeakSet[aiosqlite.Cursor] | None = None  # open ones, if any
        self._settings: dict[str, Any] = {}
        self._committed = False
        self.refusal: TenantDBError | None = None  # why the pool lent nothing, if it did not
        self.borrowed = False  # a pooled connection was lent to the request at some point
        # What aiosqlite.Connection's own methods read.
        self._running = True
        self._connection = None
        self._iter_chunk_size = 64

    def __repr__(self) -> str:
        return f"RequestConnection({self._pool.path.name!r}, lent={self._lent is not None})"

    @property
    def _conn(self) -> Any:
        return _UNLENT if self._lent is None else self._lent._conn

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self._busy += 1
        try:
            lent = self._lent or await self._borrow()
            if isinstance(fn, _Deferred):
                fn = getattr(lent._conn, fn.name)
            name = getattr(fn, "__name__", "")
            if name in _PINNING:
                self._pinned = True
            elif name == "close" and self._cursors:
                closing = getattr(fn, "__self__", None)
                for cursor in [c for c in self._cursors if c._cursor is closing]:
                    self._cursors.discard(cursor)
            return await lent._execute(fn, *args, **kwargs)  # type: ignore[no-untyped-call]
        finally:
            self._busy -= 1

    def _opened(self, cursor: aiosqlite.Cursor) -> aiosqlite.Cursor:
        """Note a cursor the request may still read from: it keeps the connection lent
        until it is closed or dropped (its statement runs on that connection)."""
        if self._cursors is None:
            self._cursors = weakref.WeakSet()
        self._cursors.add(cursor)
        return cursor

    @_result
    async def execute(self, sql: str, parameters: Any = None) -> aiosqlite.Cursor:
        """See ``aiosqlite.Connection.execute``."""
        return self._opened(await super().execute(sql, parameters))

    @_result
    async def executemany(self, sql: str, parameters: Any) -> aiosqlite.Cursor:
        """See ``aiosqlite.Connection.executemany``."""
        return self._opened(await super().executemany(sql, parameters))

    @_result
    async def executescript(self, sql_script: str) -> aiosqlite.Cursor:
        """See ``aiosqlite.Connection.executescript``."""
        return self._opened(await super().executescript(sql_script))

    @_result
    async def cursor(self) -> aiosqlite.Cursor:
        """See ``aiosqlite.Connection.cursor``."""
        return self._opened(await super().cursor())

    async def _borrow(self) -> aiosqlite.Connection:
        if self._lending is None:
            self._lending = asyncio.Lock()
        async with self._lending:  # two tasks of one request: one connection
            if self._lent is None:
                try:
                    conn = await self._pool.acquire()
                except TenantDBError as exc:
                    self.refusal = exc
                    raise
                if self._track:
                    await self._pool.commits(conn).take()  # what earlier borrowers committed
                for name, value in self._settings.items():
                    setattr(conn, name, value)
                self._lent = conn
                self.borrowed = True
            return self._lent

    in_transaction = property(lambda self: self._lent is not None and self._lent.in_transaction)
    total_changes = property(lambda self: self._lent.total_changes if self._lent else 0)
    row_factory = _setting("row_factory")
    text_factory = _setting("text_factory")
    isolation_level = _setting("isolation_level")

    async def interrupt(self) -> None:
        """Interrupt the statement running on the borrowed connection, if any."""
        if self._lent is not None:
            await self._lent.interrupt()

    async def close(self) -> None:
        """Give the connection back now; the next call borrows one again."""
        if self._lent is not None and not self._busy:
            await self._give_back(self._lent)

    @property
    def holding(self) -> bool:
        """Whether a pooled connection is lent to this request right now."""
        return self._lent is not None

    async def set_aside(self) -> None:
        """Give the connection back while the request waits, if nothing is open on it."""
        conn = self._lent
        if conn is None or self._busy or self._pinned:
            return
        if self._pool.closed or not (conn.in_transaction or self._cursors):
            await self._give_back(conn)

    @contextlib.asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        """While the request only waits: its connection set aside, or else parked."""
        await self.set_aside()
        conn = self._lent
        if conn is None:
            yield
            return
        async with self._pool.parked(conn):
            yield

    async def take(self) -> bool:
        """Whether the request committed a change since the last call (for the gate)."""
        if self._track and self._lent is not None and await self._pool.commits(self._lent).take():
            self._committed = True
        committed, self._committed = self._committed, False
        return committed

    async def end(self) -> None:
        """The request is over: give back its connection (an open transaction is rolled
        back)."""
        if self._lent is not None:
            await self._give_back(self._lent)

    async def _give_back(self, conn: aiosqlite.Connection) -> None:
        self._lent = None
        self._pinned = False
        self._cursors = None
        if self._pool.closed:
            # The pool closed it under the request (the machine steps down): nothing to
            # reset or return. Count a commit, so that the gate waits for a sync, which
            # fails cleanly, rather than answer for a write the bucket may not have.
            self._committed = True
            return
        if self._track and await self._pool.commits(conn).take():
            self._committed = True
        for name in self._settings:
            setattr(conn, name, _DEFAULTS[name])
        await self._pool.release(conn)
