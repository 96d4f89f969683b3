"""File uploads to S3: one streamed PUT, or a multipart upload that never leaves parts behind."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from tenantdb.errors import PreconditionFailedError
from tenantdb.storage.base import ObjectInfo
from tenantdb.storage.s3_answers import object_info
from tenantdb.storage.s3_errors import local_error, refused
from tenantdb.storage.s3_files import FileSlice, gather_or_cancel, run_local
from tenantdb.storage.s3_sdk import ClientError, failure_of, status_and_code

__all__ = ["FileUploads", "part_size_for"]

log = logging.getLogger("tenantdb.storage.s3")

# S3 refuses uploads of more than 10,000 parts.
MAX_PARTS = 10_000


def part_size_for(size: int, part_size: int) -> int:
    """The part size an upload of ``size`` bytes uses: ``part_size``, or more to fit the limit."""
    return max(part_size, -(-size // MAX_PARTS))


class FileUploads:
    """One attempt at uploading a file to one bucket, with a few parts in flight."""

    def __init__(
        self,
        bucket: str,
        client: Callable[[], Any],
        *,
        multipart_threshold: int,
        part_size: int,
        concurrency: int,
    ) -> None:
        self._bucket = bucket
        self._client = client
        self._multipart_threshold = multipart_threshold
        self._part_size = part_size
        self._concurrency = concurrency

    async def upload(self, key: str, src: Path, conditions: dict[str, str]) -> ObjectInfo:
        """Upload ``src`` as ``key``; the caller retries and translates errors."""
        fd = await run_local("upload", key, src, lambda: os.open(src, os.O_RDONLY))
        try:
            size = await run_local("upload", key, src, lambda: os.fstat(fd).st_size)
            if size < self._multipart_threshold:
                body = FileSlice(fd, 0, size)
                response = await self._send_slice(
                    key,
                    src,
                    body,
                    self._client().put_object(
                        Bucket=self._bucket, Key=key, Body=body, ContentLength=size, **conditions
                    ),
                )
                return object_info(self._bucket, key, response, size)
            if conditions:
                await self.absent(key)
            return await self._multipart(key, src, fd, size)
        finally:
            await run_local("upload", key, src, lambda: os.close(fd))

    async def _send_slice(
        self, key: str, src: Path, body: FileSlice, call: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        """Await an upload call; blame the local file if reading it is what failed."""
        try:
            return await call
        except Exception as exc:
            if body.error is not None:
                raise local_error(body.error, path=src, operation="upload", key=key) from exc
            raise

    async def absent(self, key: str, operation: str = "upload") -> None:
        """Raise PreconditionFailedError, as a refused If-None-Match would, if ``key`` exists."""
        try:
            await self._client().head_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if status_and_code(exc)[0] == 404:
                return
            raise
        raise PreconditionFailedError(
            f"S3 {operation} of {key!r} in bucket {self._bucket!r}: the object exists already "
            "(If-None-Match, checked with a HEAD first)",
            key=key,
            operation=operation,
        )

    async def _multipart(self, key: str, src: Path, fd: int, size: int) -> ObjectInfo:
        part_size = part_size_for(size, self._part_size)
        try:
            created = await self._client().create_multipart_upload(Bucket=self._bucket, Key=key)
        except BaseException as exc:
            if not refused(failure_of(exc)):
                # The server may have created the upload and only its answer was lost;
                # without its id nothing would ever abort it, and its parts cost money.
                await asyncio.shield(self._abort_unanswered(key))
            raise
        upload_id: str = created["UploadId"]
        try:
            etags: dict[int, str] = {}
            pending: Iterator[tuple[int, int]] = enumerate(range(0, size, part_size), start=1)

            async def worker() -> None:
                for number, start in pending:
                    length = min(part_size, size - start)
                    body = FileSlice(fd, start, length)
                    response = await self._send_slice(
                        key,
                        src,
                        body,
                        self._client().upload_part(
                            Bucket=self._bucket,
                            Key=key,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=body,
                            ContentLength=length,
                        ),
                    )
                    etags[number] = response["ETag"]

            parts_count = -(-size // part_size)
            await gather_or_cancel([worker() for _ in range(min(self._concurrency, parts_count))])
            response = await self._client().complete_multipart_upload(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [{"ETag": etags[n], "PartNumber": n} for n in sorted(etags)]
                },
            )
        except BaseException:
            # Shielded so that a cancelled upload still cleans up its parts on the server.
            await asyncio.shield(self._abort(key, upload_id))
            raise
        return object_info(self._bucket, key, response, size)

    async def _abort_unanswered(self, key: str) -> None:
        """Abort every in-progress multipart upload of exactly ``key``, best effort.

        Called when CreateMultipartUpload failed without a refusal: the upload may exist
        but its id never arrived, so this aborts them all. It would also abort a concurrent
        upload of the same key by another writer; tenantdb uploads files only to keys new
        to each upload (snapshots), where no such writer exists.
        """
        params: dict[str, Any] = {"Bucket": self._bucket, "Prefix": key}
        try:
            while True:
                page = await self._client().list_multipart_uploads(**params)
                for upload in page.get("Uploads", ()):
                    # Prefix also matches longer keys, which belong to other uploads.
                    if upload.get("Key") == key:
                        await self._abort(key, upload["UploadId"])
                key_marker = page.get("NextKeyMarker")
                if not page.get("IsTruncated") or not key_marker:
                    break
                params["KeyMarker"] = key_marker
                if upload_marker := page.get("NextUploadIdMarker"):
                    params["UploadIdMarker"] = upload_marker
        except Exception as exc:  # the original failure matters more than the cleanup's
            log.warning(
                "could not look for the multipart upload of %r in %r whose creation was "
                "not answered (%s); a lifecycle rule will have to remove its parts",
                key,
                self._bucket,
                type(exc).__name__,
            )

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._client().abort_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id
            )
        except Exception as exc:  # the original failure matters more than the cleanup's
            log.warning(
                "could not abort multipart upload of %r in %r (%s); a lifecycle rule "
                "will have to remove its parts",
                key,
                self._bucket,
                type(exc).__name__,
            )
