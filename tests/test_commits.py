"""CommitTracker on real SQLite connections: commits are seen, reads and rollbacks are not."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tenantdb.commits import CommitTracker

Run = Callable[[Callable[[sqlite3.Connection], object]], bool]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    """Run a function on a traced connection; return whether the tracker saw a commit."""
    conn = sqlite3.connect(tmp_path / "t.sqlite3")  # the sqlite3 module's implicit BEGINs
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (0)")
    conn.commit()
    tracker = CommitTracker(lambda: conn.in_transaction)
    conn.set_trace_callback(tracker.trace)

    def run(body: Callable[[sqlite3.Connection], object]) -> bool:
        tracker.take()
        body(conn)
        return tracker.take()

    yield run
    conn.close()


def test_reads_are_not_commits(run: Run) -> None:
    assert not run(lambda c: c.execute("SELECT * FROM t").fetchall())
    assert not run(lambda c: c.execute("WITH a AS (SELECT 1) SELECT * FROM a").fetchall())
    assert not run(lambda c: c.execute("/* why */ -- how\n  select 1").fetchall())
    assert not run(lambda c: c.execute("PRAGMA user_version").fetchall())


def test_an_insert_committed_by_the_implicit_transaction_is_a_commit(run: Run) -> None:
    def insert_and_commit(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (1)")
        c.commit()

    assert run(insert_and_commit)


def test_a_rolled_back_write_is_not_a_commit(run: Run) -> None:
    def insert_and_roll_back(c: sqlite3.Connection) -> None:
        c.execute("UPDATE t SET x = 2")
        c.rollback()

    assert not run(insert_and_roll_back)


def test_a_write_not_yet_committed_is_not_a_commit_until_it_is(run: Run) -> None:
    assert not run(lambda c: c.execute("DELETE FROM t"))
    assert run(lambda c: c.commit())


def test_autocommit_statements_commit_as_they_complete(run: Run) -> None:
    assert run(lambda c: c.execute("CREATE TABLE u (y)"))  # DDL changes no row, still a write
    assert run(lambda c: c.execute("PRAGMA user_version = 3"))
    assert run(lambda c: c.execute("WITH a AS (SELECT 5) INSERT INTO u SELECT * FROM a"))
    assert run(lambda c: c.executescript("BEGIN; -- c\n INSERT INTO t VALUES (4); COMMIT;"))


def test_savepoints_count_unless_the_whole_transaction_rolls_back(run: Run) -> None:
    assert run(
        lambda c: c.executescript(
            "SAVEPOINT a; INSERT INTO t VALUES (5); ROLLBACK TO a; "
            "INSERT INTO t VALUES (6); RELEASE a;"
        )
    )
    assert not run(
        lambda c: c.executescript("BEGIN; INSERT INTO t VALUES (7); ROLLBACK TRANSACTION;")
    )


def test_take_reports_a_commit_once(run: Run) -> None:
    def two_commits(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (8)")
        c.commit()
        c.execute("INSERT INTO t VALUES (9)")
        c.commit()

    assert run(two_commits)
    assert not run(lambda c: None)
