"""A warm standby's copy of the tenant: kept equal to what ``lock.json`` names.

A ``Follower`` restores the tenant once, then applies the segments each newer ``lock.json``
adds, with the restore's own verified fetch and apply. It writes its file only that way:
only the objects the pointer names (its runs and merged ranges, so a fenced generation's
uploads are never read), each checked against the state reached so far before a byte of
it is written. A merged object that covers segments the copy has and segments it lacks
is applied on top (it holds the newest image of every page its range changed) and checked
by the state it produces. When the pointer moved past anything it can chain onto (a new
snapshot, a broken chain), it restores from scratch: a standby
downloads the whole database once per snapshot the holder publishes
(``TENANTDB_CHECKPOINT_INTERVAL``, or when the log grows too long), and only segments
in between.

What the copy holds is known only in memory: the follower forgets it before any write and
learns it again only once the write is done, so a takeover trusts the copy (``hashes``)
only while the follower vouches for it, and a process that died half-way through a write
leaves a file that the next one re-hashes or restores like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from tenantdb.errors import ReplicationError, TenantDBError
from tenantdb.protocol.lockfile import LockRecord, LogChunk
from tenantdb.replication.checksum import PageHashes, format_state
from tenantdb.replication.restore import apply_log, check_final, restore_database
from tenantdb.storage.base import Bucket

__all__ = ["Follower"]

log = logging.getLogger("tenantdb.replication")


@dataclass(frozen=True)
class _Copy:
    """What the local file holds: the data of ``snapshot`` plus segments ``base``..``tail``."""

    snapshot: str | None
    base: int | None  # None: the snapshot alone, without a log
    tail: int
    hashes: PageHashes


class Follower:
    """Keeps ``path`` equal to the tenant's data as ``lock.json`` names it, segment by segment.

    Nobody else may open ``path`` meanwhile: it is the standby's file, written in place.
    """

    def __init__(self, bucket: Bucket, tenant: str, path: Path, *, prefix: str) -> None:
        self.bucket = bucket
        self.tenant = tenant
        self.path = path
        self.prefix = prefix
        self.restores = 0  # how many times the copy was rebuilt from scratch
        self.applied = 0  # how many log objects were applied onto it
        self._copy: _Copy | None = None

    def __repr__(self) -> str:
        at = f"tail {self._copy.tail}" if self._copy else "no trusted copy"
        return f"Follower(tenant={self.tenant!r}, {at})"

    def resume(self, snapshot: str | None, base: int | None, tail: int, hashes: PageHashes) -> None:
        """Vouch for a copy an earlier process kept: ``snapshot`` plus segments up to ``tail``
        of the log from ``base``, with its page ``hashes`` measured from the file now.

        Nothing is trusted beyond the hashes: each segment applied next must chain onto
        them, and the result must be the state lock.json records, else it is restored.
        """
        self._copy = _Copy(snapshot, base, tail, hashes)

    @property
    def position(self) -> tuple[int, str] | None:
        """The log tail the copy has reached and its state; None while it is untrusted or
        being written."""
        copy = self._copy
        return None if copy is None else (copy.tail, format_state(copy.hashes.state))

    def hashes(self, record: LockRecord) -> PageHashes | None:
        """The copy's page hashes if it is exactly what ``record`` names, else None."""
        copy = self._copy
        if copy is None or self._plan(copy, record) != ([], False):
            return None
        return copy.hashes if _matches(copy.hashes, record) else None

    async def catch_up(self, record: LockRecord) -> PageHashes:
        """Make the copy what ``record`` names, applying only what it lacks; its hashes.

        Raises ``ReplicationError`` naming the key when a segment is missing or damaged
        and a restore cannot do without it; the copy is then left as it was.
        """
        copy = self._copy
        plan = self._plan(copy, record)
        if copy is not None and plan is not None:
            try:
                copy = await self._apply(copy, record, *plan)
                if _matches(copy.hashes, record):
                    return copy.hashes
                log.warning(
                    "tenant %s: the standby's copy does not match lock.json after catching "
                    "up: restoring it from scratch",
                    self.tenant,
                )
            except ReplicationError as exc:
                log.warning(
                    "tenant %s: the standby cannot follow the log (%s): restoring from scratch",
                    self.tenant,
                    exc,
                )
        elif copy is not None:
            log.info(
                "tenant %s: lock.json moved past the standby's copy (a new snapshot): restoring it",
                self.tenant,
            )
        return await self._restore(record)

    def _plan(self, copy: _Copy | None, record: LockRecord) -> tuple[list[LogChunk], bool] | None:
        """The log objects to apply onto ``copy`` to reach ``record``, and whether the first
        is a merged one the copy holds part of; None: restore instead."""
        if copy is None:
            return None
        pointer = record.log
        snapshot = record.snapshot.key if record.snapshot else None
        if pointer is None:
            return ([], False) if copy.base is None and copy.snapshot == snapshot else None
        if copy.base == pointer.base and copy.snapshot == snapshot:
            position = copy.tail
        elif copy.base is None and copy.snapshot == snapshot:
            position = pointer.base - 1  # a log started on the snapshot the copy is
        else:
            # A new snapshot: its pages differ from the copy's even when the data does not
            # (a backup rewrites the header), so no segment of its log chains onto the copy.
            return None
        if position > pointer.tail:
            return None
        chunks = [chunk for chunk in pointer.chunks() if chunk.last > position]
        # A merge across the copy's position (segments it has and segments it lacks): the
        # merged object goes on top, checked by the state it produces.
        return chunks, bool(chunks) and chunks[0].first <= position

    async def _apply(
        self, copy: _Copy, record: LockRecord, chunks: list[LogChunk], overlap: bool
    ) -> _Copy:
        pointer = record.log
        snapshot = record.snapshot.key if record.snapshot else None
        if pointer is None or not chunks:
            return copy  # nothing to write: the same snapshot and log position
        self._copy = None  # from here until the last chunk is written, the file is in flux
        try:
            async with contextlib.aclosing(
                apply_log(
                    self.bucket,
                    self.tenant,
                    pointer,
                    chunks,
                    self.path,
                    copy.hashes,
                    prefix=self.prefix,
                    overlap=overlap,
                )
            ) as applied:
                async for chunk, after in applied:
                    copy = _Copy(snapshot, pointer.base, chunk.last, after)
                    self.applied += 1
        except TenantDBError:
            # A download or a check failed, before the failing chunk wrote anything (only
            # the writes themselves raise OSError): the file is at ``copy``.
            self._copy = copy
            raise
        self._copy = copy
        return copy

    async def _restore(self, record: LockRecord) -> PageHashes:
        kept, self._copy = self._copy, None
        started = asyncio.get_running_loop().time()
        try:
            hashes = await restore_database(self.bucket, record, self.path, prefix=self.prefix)
        except TenantDBError:
            self._copy = kept  # a failed restore leaves the file as it was
            raise
        snapshot = record.snapshot.key if record.snapshot else None
        base = record.log.base if record.log else None
        self._copy = _Copy(snapshot, base, _tail(record), hashes)
        self.restores += 1
        log.info(
            "tenant %s: standby restored %d pages in %.2fs; following the log from here",
            self.tenant,
            hashes.db_pages,
            asyncio.get_running_loop().time() - started,
        )
        return hashes


def _tail(record: LockRecord) -> int:
    return record.log.tail if record.log else 0


def _matches(hashes: PageHashes, record: LockRecord) -> bool:
    """Whether ``hashes`` are the state and size ``record``'s log records (no log: trusted)."""
    if record.log is None:
        return True
    try:
        check_final(record.log, hashes, what="the standby's copy")
    except ReplicationError:
        return False
    return True
