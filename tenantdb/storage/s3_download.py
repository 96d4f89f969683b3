"""Downloads from S3 into a file: parallel ranged GETs pinned to one ETag, bounded memory."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tenantdb.errors import ObjectTooLargeError, PreconditionFailedError, TransientStorageError
from tenantdb.storage.base import ObjectInfo
from tenantdb.storage.s3_answers import object_info, total_size
from tenantdb.storage.s3_files import gather_or_cancel, preallocate, pwrite, run_local
from tenantdb.storage.s3_sdk import ClientError, status_and_code

__all__ = ["RangedDownloads"]

MiB = 1 << 20
# Each ranged GET body is copied to disk in chunks of this size: memory per stream is bounded.
_READ_CHUNK = MiB


class RangedDownloads:
    """One attempt at downloading an object of one bucket, a few part-sized ranges at a time."""

    def __init__(
        self, bucket: str, client: Callable[[], Any], *, part_size: int, concurrency: int
    ) -> None:
        self._bucket = bucket
        self._client = client
        self._part_size = part_size
        self._concurrency = concurrency

    async def download(self, key: str, dest: Path, max_size: int | None) -> ObjectInfo:
        """Write the object ``key`` into ``dest``; the caller retries and translates errors."""
        first = await self._get_range(key, 0, self._part_size - 1, etag=None)
        if first is None:
            # 416: a zero-byte object has no byte 0 to ask for; fetch it plainly.
            first = await self._client().get_object(Bucket=self._bucket, Key=key)
        total = total_size(first)
        if max_size is not None and total > max_size:
            first["Body"].close()  # unread: drops the connection instead of draining it
            raise ObjectTooLargeError(key=key, size=total, limit=max_size, operation="download")
        info = object_info(self._bucket, key, first, total)
        fd = await run_local(
            "download", key, dest, lambda: os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        )
        try:
            await run_local("download", key, dest, lambda: preallocate(fd, total))
            written = await self._drain(first, fd, 0, key, dest, min(total, self._part_size))
            ranges = [
                (start, min(start + self._part_size, total) - 1)
                for start in range(written, total, self._part_size)
            ]
            pending = iter(ranges)

            async def worker() -> None:
                for start, end in pending:
                    response = await self._get_range(key, start, end, etag=info.etag)
                    if response is None:
                        raise PreconditionFailedError(
                            f"S3 download of {key!r}: the object shrank during the download",
                            key=key,
                            operation="download",
                        )
                    got = await self._drain(response, fd, start, key, dest, end - start + 1)
                    if got != end - start + 1:
                        raise TransientStorageError(
                            f"S3 download of {key!r}: range {start}-{end} returned {got} bytes",
                            key=key,
                            operation="download",
                        )

            await gather_or_cancel([worker() for _ in range(min(self._concurrency, len(ranges)))])
        finally:
            await run_local("download", key, dest, lambda: os.close(fd))
        return info

    async def _get_range(
        self, key: str, start: int, end: int, *, etag: str | None
    ) -> dict[str, Any] | None:
        """GET bytes ``start..end``, pinned to ``etag`` if given; None on 416 (no such bytes)."""
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": key,
            "Range": f"bytes={start}-{end}",
        }
        if etag is not None:
            params["IfMatch"] = etag
        try:
            response: dict[str, Any] = await self._client().get_object(**params)
        except ClientError as exc:
            status, code = status_and_code(exc)
            if status == 416 or code == "InvalidRange":
                return None
            if status == 412 and etag is not None:
                raise PreconditionFailedError(
                    f"S3 download of {key!r} in bucket {self._bucket!r}: the object was replaced "
                    "during the download (If-Match failed)",
                    key=key,
                    operation="download",
                ) from exc
            raise
        return response

    async def _drain(
        self, response: dict[str, Any], fd: int, offset: int, key: str, dest: Path, limit: int
    ) -> int:
        """Copy a response body to ``fd`` at ``offset``; return the number of bytes written.

        aiohttp hands out whatever it has buffered (often 64 KiB); gathering up to 1 MiB
        before each write keeps thread hops few while memory stays bounded per stream.
        A body longer than the ``limit`` bytes asked for is cut off there: the caller sees
        a short count, never bytes past the range it asked for.
        """
        stream = response["Body"]
        written = 0
        pending = bytearray()
        try:
            while written + len(pending) < limit and (
                chunk := await stream.read(min(_READ_CHUNK, limit - written - len(pending)))
            ):
                pending += chunk
                if len(pending) >= _READ_CHUNK:
                    data, pending = bytes(pending), bytearray()
                    await run_local(
                        "download", key, dest, partial(pwrite, fd, data, offset + written)
                    )
                    written += len(data)
            if pending:
                data = bytes(pending)
                await run_local("download", key, dest, partial(pwrite, fd, data, offset + written))
                written += len(data)
        finally:
            stream.close()
        return written
