"""tenantdb as the only checkpointer of its databases: connections, and safe checkpoints.

Every connection tenantdb opens has ``wal_autocheckpoint=0``; the shipper folds the WAL
into the database file only while every frame in it is shipped, so that a WAL restart
(new salts) drops nothing the bucket lacks. Nor does SQLite shorten the WAL file: the
shipper cuts its stale tail itself, once it no longer needs it as proof (``trim_wal``).
These functions run in a thread; the shipper decides when (see
``Shipper._checkpoint_if_large``).
"""

from __future__ import annotations

import os
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
    "trim_wal",
    "wal_bytes",
]

# Checkpoint once the WAL holds this much shipped data; it restarts from the top after.
CHECKPOINT_WAL_BYTES = 4 << 20
# Past this many times CHECKPOINT_WAL_BYTES, writes are held off for one publication so
# that a checkpoint can take everything (see Shipper._checkpoint_if_large).
CHECKPOINT_STALL_FACTOR = 4
# The shipper cuts the WAL file down to this size (or to its frames' end) after a restart.
WAL_FILE_BYTES = 16 << 20

# Every connection tenantdb opens to a tenant database: WAL, and no automatic checkpoint.
# Nor a journal_size_limit: SQLite cuts the WAL file down to it at the first commit after
# a restart, before the shipper reads that restart, and the file past the shipped position
# is its only proof that the restart dropped no commit (``restart_dropped_frames``). A
# limit of 16 MiB was the very size at which the shipper holds writes off to checkpoint
# everything (CHECKPOINT_WAL_BYTES * CHECKPOINT_STALL_FACTOR): each of those restarts cost
# a full snapshot. ``trim_wal`` cuts the file instead, once the proof is read.
CONNECTION_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA wal_autocheckpoint=0",
    "PRAGMA journal_size_limit=-1",
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


def trim_wal(
    writer: sqlite3.Connection, wal_path: Path, shm_path: Path, shipped: WALPosition
) -> None:
    """Cut the WAL file down to WAL_FILE_BYTES, or to the end of its frames (blocking).

    Only while ``shipped`` is in the current WAL, and never below its committed frames (so
    never below ``shipped``): until the shipper has read a restart, the file past its
    position is the proof that the restart dropped nothing. The cut is made holding the
    write lock, so that no frame is being written past the end; readers and checkpoints
    use no frame past it either. The write lock is taken only when there is a tail to cut.
    """
    if _keep_bytes(wal_path, shm_path, shipped) is None:
        return
    writer.execute("BEGIN IMMEDIATE")
    try:
        keep = _keep_bytes(wal_path, shm_path, shipped)  # again: a commit may have landed
        if keep is not None:
            os.truncate(wal_path, keep)
    finally:
        writer.execute("ROLLBACK")


def _keep_bytes(wal_path: Path, shm_path: Path, shipped: WALPosition) -> int | None:
    """The size to cut the WAL file down to, or None if it is not to be cut."""
    try:
        if os.path.getsize(wal_path) <= WAL_FILE_BYTES:
            return None  # the common case, known without reading the WAL or the wal-index
    except FileNotFoundError:
        return None  # no WAL
    start = wal_start(wal_path)
    if start is None or start.salts != shipped.salts:
        return None  # no WAL, or a restart the shipper has not read yet
    frames = wal_index_frames(shm_path, start.salts)
    if frames is None:
        return None
    keep = max(WAL_FILE_BYTES, start.offset + frames * (start.page_size + 24))
    return keep if os.path.getsize(wal_path) > keep else None


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
