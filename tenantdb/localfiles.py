"""Durable local file operations: atomic writes, directory fsync, database removal."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["SIDE_FILES", "fsync_dir", "remove_database", "remove_side_files", "write_atomically"]

# Beside a SQLite database, a rollback journal or a WAL belongs to that file and no other.
SIDE_FILES = ("-journal", "-wal", "-shm")


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old content or the new, whole."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_side_files(db_path: Path) -> None:
    """Delete the journal, WAL and shared-memory files of ``db_path``, durably."""
    for suffix in SIDE_FILES:
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    fsync_dir(db_path.parent)


def remove_database(db_path: Path) -> None:
    """Delete a database together with its side files (never the file alone)."""
    remove_side_files(db_path)
    db_path.unlink(missing_ok=True)
    fsync_dir(db_path.parent)
