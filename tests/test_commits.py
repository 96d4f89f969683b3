"""CommitTracker on real SQLite connections: commits are seen, reads and rollbacks are not."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiosqlite
import pytest

from tenantdb.connections.commits import CommitTracker
from tenantdb.replication.shipper import CONNECTION_PRAGMAS

Body = Callable[[aiosqlite.Connection], Awaitable[object]]
Run = Callable[[Body], Awaitable[bool]]


async def connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path)
    for pragma in CONNECTION_PRAGMAS:
        await conn.execute(pragma)
    return conn


@pytest.fixture
async def conns(tmp_path: Path) -> AsyncIterator[tuple[aiosqlite.Connection, aiosqlite.Connection]]:
    """A tracked connection (the sqlite3 module's implicit BEGINs) and another one."""
    path = tmp_path / "t.sqlite3"
    conn, other = await connect(path), await connect(path)
    await conn.execute("CREATE TABLE t (x)")
    await conn.execute("INSERT INTO t VALUES (0)")
    await conn.commit()
    yield conn, other
    await other.close()
    await conn.close()


@pytest.fixture
def run(conns: tuple[aiosqlite.Connection, aiosqlite.Connection], tmp_path: Path) -> Run:
    """Run a function on the tracked connection; return whether the tracker saw a commit."""
    conn, _ = conns
    tracker = CommitTracker(conn, tmp_path / "t.sqlite3")

    async def run(body: Body) -> bool:
        await tracker.take()
        await body(conn)
        return await tracker.take()

    return run


def execute(sql: str) -> Body:
    async def body(c: aiosqlite.Connection) -> None:
        await (await c.execute(sql)).close()

    return body


async def test_reads_are_not_commits(run: Run) -> None:
    assert not await run(execute("SELECT * FROM t"))
    assert not await run(execute("WITH a AS (SELECT 1) SELECT * FROM a"))
    assert not await run(execute("PRAGMA user_version"))


async def test_an_insert_committed_by_the_implicit_transaction_is_a_commit(run: Run) -> None:
    async def insert_and_commit(c: aiosqlite.Connection) -> None:
        await c.execute("INSERT INTO t VALUES (1)")
        await c.commit()

    assert await run(insert_and_commit)


async def test_a_rolled_back_write_is_not_a_commit(run: Run) -> None:
    async def update_and_roll_back(c: aiosqlite.Connection) -> None:
        await c.execute("UPDATE t SET x = 2")
        await c.rollback()

    assert not await run(update_and_roll_back)


async def test_a_write_not_yet_committed_is_not_a_commit_until_it_is(run: Run) -> None:
    assert not await run(execute("DELETE FROM t"))

    async def commit(c: aiosqlite.Connection) -> None:
        await c.commit()

    assert await run(commit)


async def test_writes_that_change_no_row_are_commits(run: Run) -> None:
    assert await run(execute("CREATE TABLE u (y)"))
    assert await run(execute("PRAGMA user_version = 3"))


async def test_savepoints_count_unless_the_whole_transaction_rolls_back(run: Run) -> None:
    def script(sql: str) -> Body:
        async def body(c: aiosqlite.Connection) -> None:
            await c.executescript(sql)

        return body

    assert await run(
        script(
            "SAVEPOINT a; INSERT INTO t VALUES (5); ROLLBACK TO a; "
            "INSERT INTO t VALUES (6); RELEASE a;"
        )
    )
    assert not await run(script("BEGIN; INSERT INTO t VALUES (7); ROLLBACK TRANSACTION;"))


async def test_a_commit_after_rollback_with_a_comment_before_to_is_seen(run: Run) -> None:
    async def body(c: aiosqlite.Connection) -> None:
        await c.executescript(
            "BEGIN; INSERT INTO t VALUES (1); SAVEPOINT sp; INSERT INTO t VALUES (2); "
            "ROLLBACK /* c */ TO sp; COMMIT;"
        )

    assert await run(body)


async def test_an_app_trace_callback_does_not_hide_commits(run: Run) -> None:
    seen: list[str] = []

    async def body(c: aiosqlite.Connection) -> None:
        await c.set_trace_callback(seen.append)  # the app's own tracing
        await c.execute("INSERT INTO t VALUES (3)")
        await c.commit()

    assert await run(body)
    assert seen


async def test_another_connections_commit_is_not_this_ones(
    run: Run, conns: tuple[aiosqlite.Connection, aiosqlite.Connection]
) -> None:
    _, other = conns

    async def read_while_another_writes(c: aiosqlite.Connection) -> None:
        await other.execute("INSERT INTO t VALUES (9)")
        await other.commit()
        await (await c.execute("SELECT count(*) FROM t")).close()

    assert not await run(read_while_another_writes)

    async def both_write(c: aiosqlite.Connection) -> None:
        await c.execute("INSERT INTO t VALUES (10)")
        await c.commit()
        await other.execute("INSERT INTO t VALUES (11)")
        await other.commit()

    assert await run(both_write)


async def test_take_reports_a_commit_once(run: Run) -> None:
    async def two_commits(c: aiosqlite.Connection) -> None:
        for value in (8, 9):
            await c.execute("INSERT INTO t VALUES (?)", (value,))
            await c.commit()

    assert await run(two_commits)

    async def nothing(c: aiosqlite.Connection) -> None:
        return None

    assert not await run(nothing)


async def test_a_connection_closed_under_its_borrower_counts_as_committed(
    conns: tuple[aiosqlite.Connection, aiosqlite.Connection], tmp_path: Path
) -> None:
    """Simulation seed 11108: a holder stepping down closed its pool while a request's
    answer was being set aside; aiosqlite's ValueError escaped the request (a 500). In
    doubt, a commit: the output gate then waits for a sync that fails cleanly."""
    conn, other = conns
    tracker = CommitTracker(conn, tmp_path / "t.sqlite3")
    await tracker.take()
    await other.execute("INSERT INTO t VALUES (5)")  # the WAL moves: the counters are read
    await other.commit()
    await conn.close()
    assert await tracker.take()


def test_sqlite_accepts_a_comment_between_rollback_and_to(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "g.sqlite3", isolation_level=None)
    try:
        conn.executescript("CREATE TABLE t (x); SAVEPOINT sp; ROLLBACK /* c */ TO sp; RELEASE sp;")
    finally:
        conn.close()
