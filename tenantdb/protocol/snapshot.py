"""Consistent SQLite snapshots: make, verify, upload, publish, restore.

A snapshot is made with SQLite's online backup API from a connection to the live
database, so rows still in the WAL are included and writers are never blocked. It is
checked with ``PRAGMA quick_check`` and its sha256 is recorded in ``lock.json``; a restore
verifies both before an atomic rename puts it in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tenantdb.errors import (
    LocalDiskError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    SnapshotError,
    StorageError,
)
from tenantdb.localfiles import fsync_dir, remove_side_files
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LockRecord, LogPointer, SchemaVersion, SnapshotRef, now_iso
from tenantdb.storage.base import Bucket

__all__ = [
    "SnapshotFile",
    "copy_database",
    "file_sha256",
    "publish_snapshot",
    "remove_stray_temp_files",
    "check_download",
    "download_snapshot",
    "install_database",
    "temp_restore_path",
    "temp_snapshot_path",
    "verify_database",
]

_log = logging.getLogger("tenantdb.snapshot")

_CHUNK = 1 << 20
_TEMP_SNAPSHOT = ".snapshot-"
_TEMP_RESTORE = ".restore-"


@dataclass(frozen=True)
class SnapshotFile:
    """A consistent, verified copy of a database on local disk."""

    path: Path
    sha256: str
    size: int


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_database(path: Path, *, key: str = "") -> None:
    """Raise ``SnapshotError`` unless ``path`` is a SQLite database passing quick_check."""
    what = key or str(path)
    try:
        # immutable=1: read the file as it is, create no -wal/-shm beside it.
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise SnapshotError(f"{what} is not a usable SQLite database: {exc}", key=key) from exc
    if rows != [("ok",)]:
        problems = "; ".join(str(row[0]) for row in rows[:3])
        raise SnapshotError(f"{what} failed PRAGMA quick_check: {problems}", key=key)


@contextlib.contextmanager
def _snapshot_errors(dest: Path) -> Iterator[None]:
    """Remove a half-made ``dest`` and turn what went wrong into a tenantdb error."""
    try:
        yield
    except sqlite3.Error as exc:
        dest.unlink(missing_ok=True)
        raise SnapshotError(f"could not make a snapshot in {dest.parent}: {exc}") from exc
    except OSError as exc:
        dest.unlink(missing_ok=True)
        raise LocalDiskError(
            f"could not write a snapshot in {dest.parent}: {exc.strerror or exc}",
            operation="snapshot",
        ) from exc
    except SnapshotError:
        dest.unlink(missing_ok=True)
        raise


def copy_database(source: sqlite3.Connection, dest: Path) -> None:
    """The consistent copy: SQLite's backup API (WAL rows included), then fsync."""
    with _snapshot_errors(dest):
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()
        with open(dest, "rb+") as f:
            os.fsync(f.fileno())


def _check_snapshot(dest: Path) -> SnapshotFile:
    """quick_check the copy, then record its sha256 and size."""
    with _snapshot_errors(dest):
        verify_database(dest)
        return SnapshotFile(dest, file_sha256(dest), dest.stat().st_size)


def temp_snapshot_path(work_dir: Path) -> Path:
    """A new path for a snapshot copy in ``work_dir``, cleaned up after a crash."""
    return work_dir / f"{_TEMP_SNAPSHOT}{uuid.uuid4().hex}.sqlite3"


async def publish_snapshot(
    lease: Lease,
    bucket: Bucket,
    copy: Path,
    *,
    log: LogPointer,
    taken_ms: int,
    schema: SchemaVersion | Literal["unchanged"] | None = "unchanged",
) -> LockRecord:
    """Upload a snapshot copy to a new immutable key, then CAS ``lock.json`` onto it.

    ``log`` is the pointer the snapshot starts: no segments yet, and the state of the copy;
    ``taken_ms`` is when the copy was made (Unix ms), after every commit it holds; ``schema``
    the copy's (None: unknown), unless it is the one lock.json records. A 412 on
    the CAS raises ``LeaseLostError``: the uploaded object is then an orphan. Old snapshots
    are the garbage collector's (see ``replication.history``).
    """
    key = lease.next_snapshot_key(base=log.base, taken_ms=taken_ms)
    snap = await _upload_while_checking(bucket, key, copy)
    ref = SnapshotRef(key, snap.sha256, snap.size, now_iso())
    record = await lease.publish(ref, log, schema=schema)
    _log.info("tenant %s: published snapshot %s (%d bytes)", lease.tenant, key, snap.size)
    return record


async def _upload_once(bucket: Bucket, key: str, path: Path) -> None:
    """Create ``key`` from ``path``; it must not exist, and is never overwritten."""
    try:
        await bucket.upload_file(key, path, if_none_match="*")
    except PreconditionFailedError:
        # The key is new and random: only a retried attempt of this very upload, whose
        # answer was lost, can have created it. Its size says whether it is all there.
        info = await bucket.head(key)
        size = path.stat().st_size
        if info.size != size:
            raise SnapshotError(
                f"snapshot key {key} exists with {info.size} bytes, expected {size}; "
                "it is not published and is left alone",
                key=key,
            ) from None


async def _upload_while_checking(bucket: Bucket, key: str, path: Path) -> SnapshotFile:
    """Upload the copy while a thread runs quick_check and sha256 on it.

    Both read the same (cached) file, so the checks cost no time on the shutdown path. The
    snapshot is only published (the CAS on lock.json) once both succeeded; if the check
    fails, the upload is cancelled (its multipart parts are aborted) or the uploaded object
    is deleted, and the ``SnapshotError`` is raised as before.
    """
    check = asyncio.ensure_future(asyncio.to_thread(_check_snapshot, path))
    upload = asyncio.ensure_future(_upload_once(bucket, key, path))
    try:
        await asyncio.wait({check, upload}, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        upload.cancel()
        # The thread cannot be interrupted: let it finish before the file is removed.
        await asyncio.gather(check, upload, return_exceptions=True)
        raise
    if check.done() and check.exception() is not None:
        upload.cancel()
        await asyncio.gather(upload, return_exceptions=True)
        await _delete_unpublished(bucket, key)
        return check.result()  # raises the check's error
    if upload.exception() is not None:  # wait() returned early: the upload failed
        await asyncio.gather(check, return_exceptions=True)
        upload.result()  # raises the upload's error
    return await check


async def _delete_unpublished(bucket: Bucket, key: str) -> None:
    # Called only before the CAS that would publish ``key`` was sent: a key of its own,
    # never in any lock.json.
    try:
        await bucket.delete(key)
    except StorageError as exc:
        _log.warning("could not delete the unpublished snapshot %s: %s", key, exc)


def temp_restore_path(db_path: Path) -> Path:
    """A new path beside ``db_path`` to assemble a restore in, cleaned up after a crash."""
    return db_path.with_name(f".{db_path.name}{_TEMP_RESTORE}{uuid.uuid4().hex}")


async def download_snapshot(bucket: Bucket, ref: SnapshotRef, dest: Path) -> None:
    """Download ``ref`` into ``dest``; ``check_download`` then verifies it.

    Never more than the size lock.json records is written: an object that says it is larger
    is refused before ``dest`` is opened.
    """
    try:
        await bucket.download_file(ref.key, dest, max_size=ref.size)
    except ObjectTooLargeError as exc:
        raise SnapshotError(
            f"snapshot {ref.key} is {exc.size} bytes, lock.json says {ref.size}: refusing it "
            "unread",
            key=ref.key,
        ) from exc
    except ObjectNotFoundError as exc:
        raise SnapshotError(
            f"snapshot {ref.key} named by lock.json is missing from the bucket; "
            "refusing to start with an empty database",
            key=ref.key,
        ) from exc


def check_download(ref: SnapshotRef, dest: Path) -> None:
    """Raise ``SnapshotError`` unless ``dest`` has the size and sha256 lock.json records."""
    size = dest.stat().st_size
    if size != ref.size:
        raise SnapshotError(
            f"snapshot {ref.key} is {size} bytes, lock.json says {ref.size}: refusing it",
            key=ref.key,
        )
    digest = file_sha256(dest)
    if digest != ref.sha256:
        raise SnapshotError(
            f"snapshot {ref.key} is corrupt: sha256 {digest[:12]}… does not match "
            f"lock.json's {ref.sha256[:12]}…; refusing it",
            key=ref.key,
        )


def install_database(tmp: Path, db_path: Path, *, key: str) -> None:
    """quick_check ``tmp``, then put it in place of ``db_path`` durably (blocking)."""
    verify_database(tmp, key=key)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    # A journal or WAL beside the old file belongs to the old file: replayed onto the new
    # one, it would corrupt it. They go first, and durably, before the new file goes in.
    remove_side_files(db_path)
    os.replace(tmp, db_path)
    fsync_dir(db_path.parent)


def remove_stray_temp_files(directory: Path) -> list[Path]:
    """Delete temporary snapshot and restore files a killed process left; return them.

    Only safe while holding the data directory's lock: no live process owns them then.
    """
    stray = [
        path
        for path in directory.glob(".*")
        if path.name.startswith(_TEMP_SNAPSHOT)
        or _TEMP_RESTORE in path.name
        or path.name.endswith(".tmp")  # write_atomically's
    ]
    for path in stray:
        path.unlink(missing_ok=True)
    return stray
