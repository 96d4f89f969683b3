"""Restore = the snapshot lock.json names + every segment up to the tail, verified, renamed in.

The segments are downloaded a few at a time ahead of the one being applied, and applied in
order onto a temporary copy. Each is checked: its trailer hash, that it is the segment the
pointer names (tenant, generation, index), that it applies to the state reached so far and
produces the state it claims, and at the end that the result is the state and size
``lock.json`` records, and passes ``quick_check``. Only then is it renamed over the local
file. A missing segment (a gap) or a damaged one is an error naming its key: never a
silently older database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

from tenantdb.errors import ObjectNotFoundError, ReplicationError
from tenantdb.protocol.lockfile import LockRecord, LogChunk, LogPointer
from tenantdb.protocol.snapshot import (
    check_download,
    download_snapshot,
    install_database,
    temp_restore_path,
)
from tenantdb.replication.checksum import PageHashes, database_page_size, format_state
from tenantdb.replication.log_objects import LogObjects
from tenantdb.replication.segment import Segment, chunk_key, decode_segment
from tenantdb.storage.base import Bucket

__all__ = [
    "apply_log",
    "apply_segment",
    "check_final",
    "fetch_segment",
    "hash_file",
    "restore_database",
]

log = logging.getLogger("tenantdb.replication")

# Segments downloaded ahead of the one being applied.
PREFETCH = 8


async def restore_database(
    bucket: Bucket, record: LockRecord, db_path: Path, *, prefix: str
) -> PageHashes:
    """Rebuild ``db_path`` from the bucket as ``record`` describes it; return its page hashes.

    Any failure leaves ``db_path`` as it was and raises an error naming the key.
    """
    tmp = temp_restore_path(db_path)
    try:
        if record.snapshot is not None:
            await download_snapshot(bucket, record.snapshot, tmp)
            # Both read the same (cached) file: side by side, the page hashes cost no time.
            _, hashes = await asyncio.gather(
                asyncio.to_thread(check_download, record.snapshot, tmp),
                asyncio.to_thread(hash_file, tmp),
            )
        else:
            tmp.touch()
            hashes = await asyncio.to_thread(hash_file, tmp)
        what = record.snapshot.key if record.snapshot else "an empty database"
        if record.log is not None:
            chunks = record.log.chunks()
            async with contextlib.aclosing(
                apply_log(bucket, record.tenant, record.log, chunks, tmp, hashes, prefix=prefix)
            ) as applied:
                async for _chunk, after in applied:
                    hashes = after
            check_final(record.log, hashes, what=f"{what} + segments {record.log.base}..")
        await asyncio.to_thread(install_database, tmp, db_path, key=what)
        return hashes
    finally:
        tmp.unlink(missing_ok=True)


def hash_file(path: Path) -> PageHashes:
    """The page hashes of the database file at ``path`` (blocking)."""
    return PageHashes.of_file(path, database_page_size(path))


async def apply_log(
    bucket: Bucket,
    tenant: str,
    pointer: LogPointer,
    chunks: Sequence[LogChunk],
    path: Path,
    hashes: PageHashes,
    *,
    prefix: str,
    overlap: bool = False,
) -> AsyncGenerator[tuple[LogChunk, PageHashes]]:
    """Apply ``chunks`` of ``pointer`` in order onto ``path``, whose pages ``hashes`` describes.

    ``overlap``: the first chunk is a merged one that the file already holds a part of
    (see ``apply_segment``).

    Yields each chunk once it is written, with the hashes after it. A chunk that fails
    its checks raises ``ReplicationError`` naming its key before anything of it is written,
    so the file is then at the state last yielded. Use it under ``contextlib.aclosing``:
    the downloads running ahead are cancelled when it closes.
    """
    keys = [chunk_key(prefix, tenant, chunk) for chunk in chunks]
    objects = LogObjects(bucket, tenant)
    fetches: list[asyncio.Task[Segment]] = []
    try:
        for position, (chunk, key) in enumerate(zip(chunks, keys, strict=True)):
            while len(fetches) < min(position + PREFETCH, len(keys)):
                ahead = chunks[len(fetches)]
                inline = None if ahead.merged else pointer.inline_segment(ahead.last)
                fetch = fetch_segment(objects, keys[len(fetches)], ahead, inline)
                fetches.append(asyncio.ensure_future(fetch))
            segment = await fetches[position]
            hashes = await asyncio.to_thread(
                apply_segment, segment, key, path, hashes, tenant, chunk, overlap and not position
            )
            yield chunk, hashes
    finally:
        for task in fetches:
            task.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        objects.close()


async def fetch_segment(
    objects: LogObjects, key: str, chunk: LogChunk, inline: bytes | None
) -> Segment:
    """Chunk ``chunk``'s segment: from ``key`` (its object or pack), or ``inline``.

    An object the bucket says is over ``SEGMENT_MAX_BYTES`` (a pack: over what its
    segments may weigh) is refused unread.
    """
    try:
        body = await objects.segment_bytes(key, chunk, inline)
    except ObjectNotFoundError as exc:
        what = "pack" if chunk.pack is not None else "segment"
        raise ReplicationError(
            f"{what} {key} named by lock.json is missing from the bucket (a gap in the "
            "log); refusing to start with an older database",
            key=key,
        ) from exc
    where = f"{key} (inline)" if inline is not None else key
    if chunk.pack is not None and inline is None:
        where = f"{key} (segment {chunk.last})"
    return await asyncio.to_thread(decode_segment, body, key=where)


def apply_segment(
    segment: Segment,
    key: str,
    path: Path,
    hashes: PageHashes,
    tenant: str,
    chunk: LogChunk,
    overlap: bool = False,
) -> PageHashes:
    """Write one verified segment's pages into ``path``; return the hashes after it.

    Every check comes before the first write: a ``ReplicationError`` leaves ``path`` as it was.
    With ``overlap`` the file is already past the start of this merged chunk (a follower's
    copy at one of its segments): the chunk holds the newest image of every page changed
    in its range, so applied on top of any state within the range it gives the same result.
    The state it applies to is then not checked; the state it produces still is.
    """
    header = segment.header
    if (header.tenant, header.generation, header.index) != (tenant, chunk.generation, chunk.last):
        raise ReplicationError(
            f"segment {key} says tenant {header.tenant!r}, generation {header.generation}, "
            f"index {header.index}: not the segment lock.json names",
            key=key,
        )
    if not overlap and header.prev_state != hashes.state:
        raise ReplicationError(
            f"segment {key} applies to state {format_state(header.prev_state)}, but the "
            f"database before it is {format_state(hashes.state)}: the log is broken",
            key=key,
        )
    if hashes.db_pages == 0 and hashes.page_size != header.page_size:
        hashes = PageHashes(header.page_size)
    if hashes.page_size != header.page_size:
        raise ReplicationError(
            f"segment {key} has {header.page_size}-byte pages, the database "
            f"{hashes.page_size}-byte ones",
            key=key,
        )
    after = hashes.copy()
    try:
        after.apply(dict(segment.pages), header.db_pages)
    except ReplicationError as exc:
        raise ReplicationError(f"segment {key} cannot apply: {exc}", key=key) from exc
    if after.state != header.state:
        raise ReplicationError(f"segment {key} does not produce the state it records", key=key)
    fd = os.open(path, os.O_WRONLY)
    try:
        for pgno, data in segment.pages:
            os.pwrite(fd, data, (pgno - 1) * header.page_size)
        os.ftruncate(fd, header.db_pages * header.page_size)
    finally:
        os.close(fd)
    return after


def check_final(pointer: LogPointer, hashes: PageHashes, *, what: str) -> None:
    """Refuse a result whose state or size is not what ``pointer`` records."""
    if format_state(hashes.state) != pointer.state or hashes.db_pages != pointer.db_pages:
        raise ReplicationError(
            f"{what} gives state {format_state(hashes.state)} of {hashes.db_pages} pages, "
            f"lock.json says {pointer.state} of {pointer.db_pages}: refusing it"
        )
