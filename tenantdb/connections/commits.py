"""Tell whether a connection committed a change, from SQLite's own counters.

The output gate holds a response only if its request's connection committed something.
Python's sqlite3 has no commit hook, and reading the statements a connection runs (its
trace callback) means parsing SQL, which SQLite's grammar outruns (``ROLLBACK /* c */ TO``)
and which an app's own ``set_trace_callback`` silently switches off. So the tracker asks
SQLite instead, at each look:

- the wal-index's committed frame count and the WAL's salts: every commit in WAL mode
  moves them, whoever makes it; a rolled-back transaction does not;
- the connection's ``data_version``: it moves only when *another* connection committed.

The WAL moved and ``data_version`` did not: this connection committed. Both moved: others
did, and this connection did too if its ``total_changes()`` (rows it changed, rolled back
or not) or the schema or header counters (``schema_version``, ``user_version``,
``application_id``) moved. Doubt falls on the side of "committed": it costs a wait, never
an acknowledged write that is not durable. What remains unseen is a commit that changes
no row, no schema and no header field made while another connection also commits.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite

from tenantdb.replication.wal import wal_index_frames, wal_start

__all__ = ["CommitTracker"]

# One read of the connection's counters (each PRAGMA here reads, and writes nothing).
_COUNTERS = (
    "SELECT d.data_version, total_changes(), s.schema_version, u.user_version, "
    "a.application_id FROM pragma_data_version AS d, pragma_schema_version AS s, "
    "pragma_user_version AS u, pragma_application_id AS a"
)

# (salts, committed frames) of the WAL; None: a wal-index that cannot be trusted.
_WALMark = tuple[tuple[int, int], int] | None
_NO_WAL: _WALMark = ((0, 0), 0)


class CommitTracker:
    """Follows one connection; ``take()`` says whether it committed since the last call."""

    __slots__ = ("_conn", "_counters", "_shm_path", "_wal", "_wal_path")

    def __init__(self, conn: aiosqlite.Connection, db_path: Path) -> None:
        """``conn`` is the tracked connection to the database at ``db_path``."""
        self._conn = conn
        self._wal_path = Path(f"{db_path}-wal")
        self._shm_path = Path(f"{db_path}-shm")
        self._wal: _WALMark = None
        self._counters: tuple[int, ...] | None = None  # None: never read, assume a commit

    async def take(self) -> bool:
        """Whether the connection committed a change since the last call (and reset that)."""
        wal = self._wal_mark()
        if wal is not None and wal == self._wal:
            return False  # nobody committed anything
        try:
            async with self._conn.execute(_COUNTERS) as cursor:
                row = await cursor.fetchone()
        except (sqlite3.Error, ValueError):
            # The counters cannot be read, or aiosqlite's "Connection closed" (the pool
            # closed it under the borrower: the machine steps down): assume a commit, and
            # wait (the wait then fails cleanly).
            row = None
        counters = tuple(int(value) for value in row) if row else None
        # Read after the counters: a commit by another connection in between counts as
        # this one's (a wait), never the other way round.
        wal = self._wal_mark()
        before, self._counters, self._wal = self._counters, counters, wal
        if before is None or counters is None:
            return True
        others_committed = counters[0] != before[0]
        return not others_committed or counters[1:] != before[1:]

    def _wal_mark(self) -> _WALMark:
        start = wal_start(self._wal_path)
        if start is None:
            return _NO_WAL  # a commit would have written a WAL header
        frames = wal_index_frames(self._shm_path, start.salts)
        return None if frames is None else (start.salts, frames)
