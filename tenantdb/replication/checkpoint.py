"""tenantdb as the only checkpointer of its databases: connections, and safe checkpoints.

Every connection tenantdb opens has ``wal_autocheckpoint=0``; the shipper folds the WAL
into the database file only while every frame in it is shipped, so that a WAL restart
(new salts) drops nothing the bucket lacks. These functions run in a thread; the shipper
decides when (see ``Shipper._checkpoint_if_large``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tenantdb.replication.wal import WALPosition, wal_index_frames, wal_start

__all__ = [
    "CHECKPOINT_STALL_FACTOR",
    "CHECKPOINT_WAL_BYTES",
    "CONNECTION_PRAGMAS",
    "checkpoint_everything",
    "checkpoint_shipped",
    "open_connection",
    "pin_snapshot",
    "wal_bytes",
]

# Checkpoint once the WAL holds this much shipped data; it restarts from the top after.
CHECKPOINT_WAL_BYTES = 4 << 20
# Past this many times CHECKPOINT_WAL_BYTES, writes are held off for one publication so
# that a checkpoint can take everything (see Shipper._checkpoint_if_large).
CHECKPOINT_STALL_FACTOR = 4
# SQLite truncates the WAL file to this size when it restarts it after a checkpoint.
JOURNAL_SIZE_LIMIT = 16 << 20

# Every connection tenantdb opens to a tenant database: WAL, and no automatic checkpoint.
CONNECTION_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA wal_autocheckpoint=0",
    f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}",
    "PRAGMA busy_timeout=5000",
)


def open_connection(path: Path) -> sqlite3.Connection:
    """A connection to a tenant database with tenantdb's pragmas."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in CONNECTION_PRAGMAS:
        conn.execute(pragma)
    return conn


def pin_snapshot(reader: sqlite3.Connection) -> None:
    """Begin a read transaction on ``reader`` and read, so that it holds a snapshot: until
    it ends, no checkpoint backfills a frame committed after it, nor restarts the WAL, and
    no other connection's close deletes the WAL (blocking call)."""
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM sqlite_master").fetchone()


def wal_bytes(wal_path: Path, shm_path: Path) -> int:
    """How many bytes of frames the current WAL holds (its file may be larger)."""
    start = wal_start(wal_path)
    frames = wal_index_frames(shm_path, start.salts) if start else None
    return 0 if start is None or frames is None else frames * (start.page_size + 24)


def checkpoint_shipped(
    reader: sqlite3.Connection,
    checkpointer: sqlite3.Connection,
    shm_path: Path,
    shipped: WALPosition,
) -> bool | None:
    """Fold shipped frames into the database file, blocking no writer (blocking call).

    The checkpoint runs while ``reader`` holds a read transaction begun when every
    committed frame was shipped: SQLite backfills no frame past a reader's snapshot, and
    restarts the WAL only once every frame is backfilled. So a restart can never drop a
    frame that was not shipped, and writers go on meanwhile. Returns whether the WAL's
    next restart is expected (everything shipped was folded in), or None when a commit
    landed since ``shipped`` and nothing was done.
    """
    reader.execute("BEGIN")
    try:
        reader.execute("SELECT count(*) FROM sqlite_master").fetchone()  # pins a snapshot
        # Read after pinning: the snapshot holds at most this many frames.
        committed = wal_index_frames(shm_path, shipped.salts)
        if committed is None or committed > shipped.frames:
            return None  # a commit landed since the last sync (or the index is unsure)
        _busy, frames, done = checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return bool(frames == done <= shipped.frames)
    finally:
        reader.execute("ROLLBACK")


def checkpoint_everything(reader: sqlite3.Connection) -> bool:
    """Checkpoint while the caller holds the write lock with everything shipped (blocking).

    Returns whether every frame was folded in (the WAL's next restart is then expected).
    """
    _busy, frames, done = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return bool(frames == done)
