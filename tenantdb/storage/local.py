"""The embedded bucket: a local directory with S3's conditional-write semantics.

Layout under the root directory::

    .lock              flock: writers exclusive, readers shared (across processes)
    keys/<key>         a small JSON pointer {"etag", "size", "blob", "last_modified",
                       "boot_id", "boottime"}
    blobs/<id>         the object's bytes, immutable once written

A write streams its bytes into a new blob (fsync, then fsync of blobs/) outside the lock,
then under the exclusive lock checks the condition and renames a new pointer into place.
The pointer rename is the commit point, so a reader never sees half a write and a crash
leaves at most an orphan blob. Every write gets a fresh random ETag.

Ages are measured as S3 measures them, on one clock that all writers share, but here that
clock is the kernel's CLOCK_BOOTTIME rather than the wall clock, which NTP may step: a
pointer records the boot id and CLOCK_BOOTTIME of its write, and a reader's
``server_date`` is the write's wall time plus the CLOCK_BOOTTIME elapsed since. A local
bucket is one machine's directory, so every writer shares that clock.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, TypeVar

from tenantdb.errors import (
    BucketConfigurationError,
    LocalDiskError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageError,
)
from tenantdb.localfiles import fsync_dir
from tenantdb.storage.base import DELETE_BATCH, ObjectInfo, SmallObject

__all__ = ["LocalBucket"]

T = TypeVar("T")
_CHUNK = 1 << 20
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# How old an object written before the last reboot looks: older than any lease.
_AGE_AFTER_REBOOT = timedelta(days=3650)


@cache
def _boot_id() -> str | None:
    """The kernel's id of this boot (fixed for a process's lifetime), or None off Linux."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def _boottime() -> float | None:
    """Seconds on CLOCK_BOOTTIME: never stepped, counts suspend; None where it is missing."""
    clock: int | None = getattr(time, "CLOCK_BOOTTIME", None)
    return None if clock is None else time.clock_gettime(clock)


def _clock_stamp() -> dict[str, Any]:
    """The pointer fields that let a reader measure the write's age without the wall clock."""
    boot_id, boottime = _boot_id(), _boottime()
    if boot_id is None or boottime is None:
        return {}
    return {"boot_id": boot_id, "boottime": boottime}


def _server_date(pointer: dict[str, Any], last_modified: datetime) -> datetime:
    """Now, as the write's wall time plus the time elapsed since on CLOCK_BOOTTIME."""
    written_boot, written_at = pointer.get("boot_id"), pointer.get("boottime")
    boot_id, now = _boot_id(), _boottime()
    if (
        not isinstance(written_boot, str)
        or not isinstance(written_at, int | float)
        or boot_id is None
        or now is None
    ):
        # Written before pointers carried the stamp, or on a kernel without it.
        return datetime.now(UTC)
    if written_boot != boot_id:
        # CLOCK_BOOTTIME restarted at the reboot and cannot measure across it. The reboot
        # ended every process that could have written this (the bucket is this machine's),
        # so whatever the object claims, a lease above all, is long dead: make it look so.
        return max(datetime.now(UTC), last_modified + _AGE_AFTER_REBOOT)
    return last_modified + timedelta(seconds=now - written_at)


# What to do about a local bucket the file system refuses.
_WRITABLE = "set TENANTDB_LOCAL_BUCKET to a writable directory, or BUCKET_NAME for a real bucket"
_ADVICE = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space"}


class LocalBucket:
    """A bucket kept in a local directory, safe to share between processes.

    Why ~330 lines: it is the whole Bucket protocol, each operation with the file locking and
    atomic renames that make a directory behave like S3's conditional writes.
    """

    kind: Literal["local"] = "local"

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        # A reader (``tenantdb status`` in the wrong directory, say) must not create one.
        self.create = create
        self._keys = self.root / "keys"
        self._blobs = self.root / "blobs"

    def __repr__(self) -> str:
        return f"LocalBucket({str(self.root)!r})"

    async def __aenter__(self) -> Self:
        await self._run("open", "", self._create_dirs if self.create else self._check_exists)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def _check_exists(self) -> None:
        if not (self._keys.is_dir() and (self.root / ".lock").is_file()):
            raise BucketConfigurationError(
                f"no local bucket at {str(self.root.absolute())!r}: run this where your app "
                "runs (its working directory holds .tenantdb/bucket), or set "
                "TENANTDB_LOCAL_BUCKET to the bucket's directory, or BUCKET_NAME for S3",
                operation="open",
            )

    def _create_dirs(self) -> None:
        for directory in (self._keys, self._blobs):
            directory.mkdir(parents=True, exist_ok=True)
        (self.root / ".lock").touch(exist_ok=True)

    async def _run(self, operation: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except StorageError:
            raise
        except OSError as exc:
            kind = (
                LocalDiskError
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
                else (StorageError)
            )
            what = f"{operation} of {key!r}" if key else operation
            raise kind(
                f"local bucket {what} failed: {exc.filename or self.root}: "
                f"{exc.strerror or exc} (the local bucket is the directory "
                f"{str(self.root.absolute())!r}: {_ADVICE.get(exc.errno or 0, _WRITABLE)})",
                key=key,
                operation=operation,
            ) from exc

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with open(self.root / ".lock", "rb") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _pointer_path(self, key: str) -> Path:
        # S3 keys are opaque strings; a directory can only hold the ones that map 1:1 to paths.
        parts = key.split("/")
        if "\x00" in key or any(part in ("", ".", "..") for part in parts):
            raise BucketConfigurationError(f"invalid object key {key!r}", key=key)
        return self._keys.joinpath(*parts)

    def _read_pointer(self, key: str) -> dict[str, Any]:
        try:
            with open(self._pointer_path(key), "rb") as f:
                pointer: dict[str, Any] = json.load(f)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(
                f"no object {key!r} in the local bucket", key=key, operation="read"
            ) from None
        return pointer

    def _info(self, key: str, pointer: dict[str, Any]) -> ObjectInfo:
        last_modified = datetime.fromtimestamp(pointer["last_modified"], UTC)
        return ObjectInfo(
            key=key,
            etag=pointer["etag"],
            size=pointer["size"],
            last_modified=last_modified,
            server_date=_server_date(pointer, last_modified),
        )

    def _new_blob(self, write: Callable[[IO[bytes]], object]) -> tuple[str, int]:
        blob_id = uuid.uuid4().hex
        path = self._blobs / blob_id
        try:
            with open(path, "xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            # The blob's directory entry must be durable before a pointer names it: else a
            # crash after the commit could leave a committed pointer to a vanished blob.
            fsync_dir(self._blobs)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return blob_id, size

    def _commit(
        self,
        key: str,
        blob_id: str,
        size: int,
        if_match: str | None,
        if_none_match: str | None,
        operation: str,
    ) -> ObjectInfo:
        pointer_path = self._pointer_path(key)
        with self._locked(exclusive=True):
            try:
                current: dict[str, Any] | None = self._read_pointer(key)
            except ObjectNotFoundError:
                current = None
            if if_none_match == "*" and current is not None:
                raise PreconditionFailedError(
                    f"{key!r} already exists (If-None-Match: *)", key=key, operation=operation
                )
            if if_match is not None and (current is None or current["etag"] != if_match):
                raise PreconditionFailedError(
                    f"{key!r} changed since it was read (If-Match)",
                    key=key,
                    operation=operation,
                )
            pointer = {
                "etag": f'"{uuid.uuid4().hex}"',
                "size": size,
                "blob": blob_id,
                # Wall time for display and as the base of ages; the stamp measures them.
                "last_modified": datetime.now(UTC).timestamp(),
                **_clock_stamp(),
            }
            pointer_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = pointer_path.with_name(f".{pointer_path.name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "w") as f:
                json.dump(pointer, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, pointer_path)
            fsync_dir(pointer_path.parent)
        if current is not None:
            (self._blobs / current["blob"]).unlink(missing_ok=True)
        return self._info(key, pointer)

    def _write(
        self,
        key: str,
        write: Callable[[IO[bytes]], object],
        if_match: str | None = None,
        if_none_match: str | None = None,
        operation: str = "put",
    ) -> ObjectInfo:
        self._pointer_path(key)  # validate before writing any bytes
        blob_id, size = self._new_blob(write)
        try:
            return self._commit(key, blob_id, size, if_match, if_none_match, operation)
        except BaseException:
            (self._blobs / blob_id).unlink(missing_ok=True)
            raise

    def _open_blob(
        self, key: str, max_size: int | None = None, operation: str = "get"
    ) -> tuple[dict[str, Any], IO[bytes]]:
        """The object's pointer and its open blob; ObjectTooLargeError before opening it if
        the pointer's size (what this bucket announces, as S3 its Content-Length) is over."""
        with self._locked(exclusive=False):
            pointer = self._read_pointer(key)
            if max_size is not None and pointer["size"] > max_size:
                raise ObjectTooLargeError(
                    key=key, size=pointer["size"], limit=max_size, operation=operation
                )
            return pointer, open(self._blobs / pointer["blob"], "rb")

    @staticmethod
    def _copy_capped(
        src: IO[bytes], out: IO[bytes], key: str, limit: int | None, operation: str
    ) -> None:
        """Copy ``src`` into ``out``, never more than ``limit`` bytes: the blob may have
        grown past its pointer's size, which was checked already."""
        copied = 0
        while chunk := src.read(_CHUNK if limit is None else min(_CHUNK, limit + 1 - copied)):
            copied += len(chunk)
            if limit is not None and copied > limit:
                raise ObjectTooLargeError(key=key, size=copied, limit=limit, operation=operation)
            out.write(chunk)

    def _read_small(
        self, key: str, pointer: dict[str, Any], f: IO[bytes], limit: int | None
    ) -> SmallObject:
        # One byte more than the limit at most: the blob may have outgrown its pointer.
        body = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(body) > limit:
            raise ObjectTooLargeError(key=key, size=len(body), limit=limit)
        return SmallObject(self._info(key, pointer), body)

    async def get(self, key: str, *, max_size: int | None = None) -> SmallObject:
        """Read a small object whole; ObjectTooLargeError, unread, if above ``max_size``."""

        def read() -> SmallObject:
            pointer, f = self._open_blob(key, max_size)
            with f:
                return self._read_small(key, pointer, f, max_size)

        return await self._run("get", key, read)

    async def get_if_changed(
        self, key: str, etag: str, *, max_size: int | None = None
    ) -> SmallObject | None:
        """Read a small object whole unless its ETag is still ``etag``: None then, no body."""

        def read() -> SmallObject | None:
            with self._locked(exclusive=False):
                pointer = self._read_pointer(key)
                if pointer["etag"] == etag:
                    return None
            # Changed: read it whole (it may change again meanwhile; then that version).
            pointer, f = self._open_blob(key, max_size)
            with f:
                return self._read_small(key, pointer, f, max_size)

        return await self._run("get", key, read)

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        """Write a small object, optionally only if its ETag matches or it does not exist."""
        return await self._run(
            "put", key, lambda: self._write(key, lambda f: f.write(body), if_match, if_none_match)
        )

    async def head(self, key: str) -> ObjectInfo:
        """Describe an object without reading it."""

        def head() -> ObjectInfo:
            with self._locked(exclusive=False):
                return self._info(key, self._read_pointer(key))

        return await self._run("head", key, head)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete an object; deleting a missing object is not an error."""
        await self._run("delete", key, lambda: self._delete(key, if_match))

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete up to ``DELETE_BATCH`` objects; missing ones are not an error."""
        _check_batch(keys)

        def delete() -> None:
            for key in keys:
                self._delete(key, None)

        await self._run("delete", keys[0] if keys else "", delete)

    def _delete(self, key: str, if_match: str | None) -> None:
        with self._locked(exclusive=True):
            try:
                pointer = self._read_pointer(key)
            except ObjectNotFoundError:
                if if_match is not None:
                    raise PreconditionFailedError(
                        f"{key!r} does not exist (If-Match)", key=key, operation="delete"
                    ) from None
                return
            if if_match is not None and pointer["etag"] != if_match:
                raise PreconditionFailedError(
                    f"{key!r} changed since it was read (If-Match)",
                    key=key,
                    operation="delete",
                )
            self._pointer_path(key).unlink()
        (self._blobs / pointer["blob"]).unlink(missing_ok=True)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """List the objects whose keys start with ``prefix``, sorted by key."""

        def list_keys() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            with self._locked(exclusive=False):
                for dirpath, _dirs, files in os.walk(self._keys):
                    for name in files:
                        if name.startswith("."):
                            continue
                        key = Path(dirpath, name).relative_to(self._keys).as_posix()
                        if key.startswith(prefix):
                            found.append(self._info(key, self._read_pointer(key)))
            return sorted(found, key=lambda info: info.key)

        return await self._run("list", prefix, list_keys)

    async def download_file(
        self, key: str, dest: Path, *, max_size: int | None = None
    ) -> ObjectInfo:
        """Stream an object into ``dest`` (created or truncated) with bounded memory; see
        ``Bucket.download_file`` for ``max_size``."""

        def download() -> ObjectInfo:
            pointer, src = self._open_blob(key, max_size, "download")
            with src, open(dest, "wb") as out:
                self._copy_capped(src, out, key, max_size, "download")
            return self._info(key, pointer)

        return await self._run("download", key, download)

    async def upload_file(
        self, key: str, src: Path, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """Stream ``src`` into a new object with bounded memory, optionally only if absent."""

        def copy(out: IO[bytes]) -> None:
            with open(src, "rb") as f:
                shutil.copyfileobj(f, out, _CHUNK)

        return await self._run(
            "upload",
            key,
            lambda: self._write(key, copy, if_none_match=if_none_match, operation="upload"),
        )

    async def copy(
        self, src: str, dst: str, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """Copy ``src`` to ``dst``: a new blob, so the two objects never share bytes."""

        def copy() -> ObjectInfo:
            _pointer, source = self._open_blob(src, operation="copy")
            with source:
                return self._write(
                    dst,
                    lambda out: shutil.copyfileobj(source, out, _CHUNK),
                    if_none_match=if_none_match,
                    operation="copy",
                )

        return await self._run("copy", dst, copy)


def _check_batch(keys: Sequence[str]) -> None:
    if len(keys) > DELETE_BATCH:
        raise ValueError(f"{len(keys)} keys: one batch deletes at most {DELETE_BATCH}")
