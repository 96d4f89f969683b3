"""CopyConnections: read-only connections to a real SQLite file, kept up to a bound between
reads, never kept when a read left a transaction open or after ``close``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tenantdb.machine.copy_connections import CopyConnections, close_connections


def allow(*_: object) -> int:
    return sqlite3.SQLITE_OK


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    path = tmp_path / "copy.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
    return path


async def test_a_given_back_connection_is_taken_again_and_the_surplus_is_closed(
    copy: Path,
) -> None:
    connections = CopyConnections(copy, keep=1)
    first, second = await connections.take(allow), await connections.take(allow)
    await connections.give_back(first, reusable=True)
    await connections.give_back(second, reusable=True)  # beyond ``keep``: closed
    assert await connections.take(allow) is first
    assert connections.opened == 2
    with pytest.raises(ValueError, match="no active connection"):
        await second.execute("SELECT 1")
    await connections.give_back(first, reusable=True)
    await connections.close()


async def test_a_connection_left_in_a_transaction_or_not_reusable_is_closed(copy: Path) -> None:
    connections = CopyConnections(copy, keep=4)
    in_transaction = await connections.take(allow)
    await in_transaction.execute("BEGIN")
    await connections.give_back(in_transaction, reusable=True)
    marked = await connections.take(allow)
    await connections.give_back(marked, reusable=False)
    assert connections.retire() == []
    assert connections.opened == 2


async def test_the_connections_cannot_write_and_retired_ones_are_not_lent_again(
    copy: Path,
) -> None:
    connections = CopyConnections(copy, keep=4)
    refused = await connections.take(allow)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await refused.execute("INSERT INTO t VALUES (2)")
    await connections.give_back(refused, reusable=True)  # its implicit BEGIN stays open
    connection = await connections.take(allow)
    assert await connection.execute_fetchall("SELECT x FROM t") == [(1,)]
    await connections.give_back(connection, reusable=True)
    retired = connections.retire()
    assert retired == [connection]
    fresh = await connections.take(allow)
    assert fresh is not connection
    await close_connections([*retired, fresh])


async def test_after_close_a_connection_given_back_is_closed_and_none_is_lent(
    copy: Path,
) -> None:
    connections = CopyConnections(copy, keep=4)
    lent = await connections.take(allow)
    await connections.close()
    await connections.give_back(lent, reusable=True)
    with pytest.raises(ValueError, match="no active connection"):
        await lent.execute("SELECT 1")
    with pytest.raises(RuntimeError, match="closed"):
        await connections.take(allow)
