"""The local side of S3 transfers: file windows as request bodies, positional writes, threads.

Shared by the uploads (``s3_upload``) and the downloads (``s3_download``); nothing here
speaks to the bucket.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tenantdb.storage.s3_errors import local_error

__all__ = ["FileSlice", "gather_or_cancel", "preallocate", "pwrite", "run_local"]

T = TypeVar("T")


class FileSlice(io.RawIOBase):
    """A read-only, seekable window onto part of an open file, read with ``os.pread``.

    Upload bodies are passed to botocore as these instead of bytes so that aiohttp streams
    them from disk in small chunks: a part in flight costs kilobytes, not its size. It has
    no ``fileno`` on purpose, so nobody sizes it from the whole file. ``os.pread`` keeps its
    own offset, so many slices share one descriptor safely across threads. A failed read is
    remembered in ``error`` because the SDK may wrap it as a network failure.
    """

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._length = length
        self._pos = 0
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        try:
            data = os.pread(self._fd, size, self._start + self._pos)
        except OSError as exc:
            self.error = exc
            raise
        if not data:
            self.error = OSError(errno.EIO, "file shrank while it was being uploaded")
            raise self.error
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


async def gather_or_cancel(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines concurrently; on the first failure cancel the rest and re-raise it.

    Unlike ``asyncio.TaskGroup`` this raises the original exception, not an
    ``ExceptionGroup``, so error translation stays a plain ``except``.
    """
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def run_local(operation: str, key: str, path: Path, fn: Callable[[], T]) -> T:
    """Run blocking local-file work in a thread; its OSErrors become LocalDiskError."""
    try:
        return await asyncio.to_thread(fn)
    except OSError as exc:
        raise local_error(exc, path=path, operation=operation, key=key) from exc


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front, so a full disk fails before any download."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def pwrite(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
