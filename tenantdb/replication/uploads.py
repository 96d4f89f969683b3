"""Uploads of immutable log objects: started in the background, retried, watched.

A log object is created once with ``If-None-Match: *``; until a write of ``lock.json``
sent after its upload was answered names it, lock.json carries its segment inline. The
shipper starts the uploads; ``LogUploads`` keeps one task per key, restarts a failed one
on demand, and says how long one has been failing (the machine's health reads it).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from tenantdb import clock
from tenantdb.errors import ObjectTooLargeError, PreconditionFailedError, ReplicationError
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.replication.group_commit import retrieve_exception
from tenantdb.replication.segment import chunk_key
from tenantdb.storage.base import Bucket

__all__ = ["LogUploads", "carried_segments", "put_log_object"]

log = logging.getLogger("tenantdb.replication")


def carried_segments(record: LockRecord | None, *, prefix: str) -> list[tuple[str, bytes]]:
    """The segments a lock.json carries inline, as (key, body), oldest first."""
    pointer = record.log if record else None
    if record is None or pointer is None:
        return []
    return [
        (chunk_key(prefix, record.tenant, chunk), body)
        for chunk in pointer.chunks()
        if not chunk.merged and (body := pointer.inline_segment(chunk.last)) is not None
    ]


async def put_log_object(bucket: Bucket, key: str, body: bytes) -> None:
    """Create an immutable log object; a retry of our own landed upload is accepted."""
    try:
        await bucket.put(key, body, if_none_match="*")
    except PreconditionFailedError:
        # An object there is this upload, landed unheard, or a carried segment another
        # holder uploaded: the same bytes either way, so compare them. Anything else
        # (even of the same size) must not be published as ours.
        try:
            existing: bytes | None = (await bucket.get(key, max_size=len(body))).body
        except ObjectTooLargeError:
            existing = None
        if existing != body:
            raise ReplicationError(
                f"{key} exists with other bytes than the {len(body)} of this upload; "
                "refusing to ship past it",
                key=key,
            ) from None


def _succeeded(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


class LogUploads:
    """The background uploads of one holder's log objects, one task per key."""

    def __init__(self, bucket: Bucket, tenant: str) -> None:
        self.bucket = bucket
        self.tenant = tenant
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # When each object's upload first failed, until one of its retries succeeds.
        self._failed_at: dict[str, float] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._tasks

    def start(self, key: str, body: bytes) -> asyncio.Task[None]:
        """The upload of a log object, started now unless running or done."""
        upload = self._tasks.get(key)
        if upload is None or (upload.done() and not _succeeded(upload)):
            upload = asyncio.get_running_loop().create_task(put_log_object(self.bucket, key, body))
            upload.add_done_callback(retrieve_exception)
            upload.add_done_callback(functools.partial(self._note, key))
            self._tasks[key] = upload
        return upload

    def _note(self, key: str, upload: asyncio.Task[None]) -> None:
        if _succeeded(upload):
            self._failed_at.pop(key, None)
        elif not upload.cancelled() and key not in self._failed_at:
            self._failed_at[key] = clock.monotonic()
            log.warning(
                "tenant %s: uploading %s failed, retrying (lock.json carries it meanwhile): %s",
                self.tenant,
                key,
                upload.exception(),
            )

    def uploaded(self, key: str) -> bool:
        """Whether ``key``'s upload was answered with success."""
        upload = self._tasks.get(key)
        return upload is not None and _succeeded(upload)

    def forget(self, key: str, *, cancel: bool = False) -> None:
        """Stop tracking ``key`` (named by lock.json now, or never to be published)."""
        upload = self._tasks.pop(key, None)
        if cancel and upload is not None:
            upload.cancel()

    def cancel_all(self) -> None:
        """Cancel every upload: lock.json carries what they were for (the next holder's)."""
        for upload in self._tasks.values():
            upload.cancel()
        self._tasks.clear()

    async def settled(self) -> None:
        """Wait until every upload started so far has ended, well or not."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def failing_for(self) -> float:
        """Seconds an upload has been failing (lock.json carries it meanwhile); 0 if none."""
        failed = [at for key, at in self._failed_at.items() if key in self._tasks]
        return clock.monotonic() - min(failed) if failed else 0.0
