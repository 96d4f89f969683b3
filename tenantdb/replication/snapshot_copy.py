"""A consistent copy of a live tenant database, and the WAL position it matches.

A snapshot is only a new base for the log if the shipper knows exactly which commits the
copy holds: it goes on shipping from the WAL position the copy ends at. The copy is made
under a pinned read snapshot so that writers go on, and under the write lock only when
the pinned snapshot's end cannot be established.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tenantdb.errors import ReplicationError
from tenantdb.protocol.snapshot import copy_database
from tenantdb.replication.checksum import PageHashes, database_page_size
from tenantdb.replication.wal import WALPosition, read_committed, wal_index_frames, wal_start

__all__ = ["MAX_FRAMES_PER_SEGMENT", "copy_consistent", "read_to"]

# Frames read into one segment at most (a transaction longer than this is shipped whole).
MAX_FRAMES_PER_SEGMENT = 4096


def copy_consistent(
    reader: sqlite3.Connection | None,
    writer: sqlite3.Connection | None,
    db_path: Path,
    dest: Path,
) -> tuple[WALPosition | None, PageHashes, bool]:
    """Copy the database consistently to ``dest``; return the WAL end it matches (blocking).

    Usually under a pinned read snapshot, so that writers go on: the copy is then the
    state at the wal-index's committed frame count, read unchanged before and after
    pinning. If that cannot be established, the copy is made holding the write lock.
    The flag says whether the position is the WAL's end under the write lock.
    """
    if reader is None or writer is None:
        raise ReplicationError(f"the connections to {db_path} are not open")
    wal_path, shm_path = Path(f"{db_path}-wal"), Path(f"{db_path}-shm")
    pinned = _copy_pinned(reader, wal_path, shm_path, dest)
    if pinned is not None:
        return (*pinned, False)
    writer.execute("BEGIN IMMEDIATE")
    try:
        copy_database(reader, dest)
        # No writer can commit meanwhile: the copy is the state at the end of the WAL.
        position = read_to(wal_path, shm_path, wal_start(wal_path), None)
    finally:
        writer.execute("ROLLBACK")
    return position, PageHashes.of_file(dest, database_page_size(dest)), True


def _copy_pinned(
    reader: sqlite3.Connection, wal_path: Path, shm_path: Path, dest: Path
) -> tuple[WALPosition | None, PageHashes] | None:
    """The copy under a pinned read snapshot, or None if its WAL end is not certain."""
    for _ in range(5):
        start = wal_start(wal_path)
        if start is None:
            return None
        salts = start.salts
        before = wal_index_frames(shm_path, salts)
        reader.execute("BEGIN")
        try:
            reader.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if before is None or wal_index_frames(shm_path, salts) != before:
                continue  # a commit landed while pinning: the snapshot's end is unknown
            copy_database(reader, dest)
        finally:
            reader.execute("ROLLBACK")
        position = read_to(wal_path, shm_path, start, before)
        return position, PageHashes.of_file(dest, database_page_size(dest))
    return None


def read_to(
    wal_path: Path, shm_path: Path, position: WALPosition | None, frames: int | None
) -> WALPosition | None:
    """The position after the last commit of the WAL, or after ``frames`` frames of it."""
    while position is not None:
        read = read_committed(
            wal_path,
            position,
            max_frames=MAX_FRAMES_PER_SEGMENT,
            committed_frames=frames
            if frames is not None
            else wal_index_frames(shm_path, position.salts),
        )
        if read.end == position:
            break
        position = read.end
    return position
