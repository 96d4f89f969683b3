"""RequestConnection: borrowed at the first statement, set aside only with nothing open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite

from tenantdb.asgi.lending import RequestConnection
from tenantdb.connections.pool import ConnectionPool


async def test_a_request_connection_borrows_only_while_something_is_open(tmp_path: Path) -> None:
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=2, track_commits=True)
    db = RequestConnection(pool, track_commits=True)
    assert isinstance(db, aiosqlite.Connection)
    assert not db.holding  # nothing borrowed before the first statement
    await db.execute("CREATE TABLE t (x INTEGER)")
    assert db.holding
    assert await db.take()  # the DDL committed (autocommit)
    await db.set_aside()
    assert not db.holding

    await db.execute("INSERT INTO t VALUES (1)")  # opens a transaction
    await db.set_aside()
    assert db.holding, "set aside with a transaction open"
    await db.commit()
    async with db.execute("SELECT x FROM t") as cursor:
        await db.set_aside()
        assert db.holding, "set aside with a cursor open"
        assert await cursor.fetchall() == [(1,)]
    await db.set_aside()  # the cursor was closed at the block's end
    assert not db.holding
    assert await db.take()  # the insert's commit, gathered across the borrow that ended

    db.row_factory = sqlite3.Row  # a setting follows the request to its next connection
    rows = await db.execute_fetchall("SELECT x FROM t")
    assert [row["x"] for row in rows] == [1]
    lent = db._lent
    await db.end()
    assert lent is not None
    assert lent.row_factory is None  # the pool's connection is reset
    await pool.close()


async def test_a_request_whose_connection_the_pool_closed_sets_it_aside_as_committed(
    tmp_path: Path,
) -> None:
    """Simulation seed 304600: the holder stepped down and closed its pool while a request
    was in its app; setting the connection aside before the answer read its transaction
    state and raised aiosqlite's "no active connection", a 500 with no reason."""
    pool = ConnectionPool(tmp_path / "p.sqlite3", size=2, track_commits=True)
    db = RequestConnection(pool, track_commits=True)
    await db.execute("CREATE TABLE t (x INTEGER)")
    assert await db.take()
    await pool.close()
    await db.set_aside()
    assert not db.holding
    assert await db.take()  # a write it may have made: the gate waits, and fails cleanly
    await db.end()
