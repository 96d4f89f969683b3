"""The segments lock.json carries inline, and the packs that take them out of it.

A small segment is published by the CAS that carries it in ``lock.json`` (one request per
sync); it is written to the bucket later, in a pack with its neighbours, and leaves
``inline`` only in a CAS sent after that pack's upload was answered. So a segment is never
dropped unstored, and the writes per sync approach one.

When a pack starts: once ``PACK_SEGMENTS`` carried segments, or ``PACK_START_BYTES`` of
them compressed (their share of lock.json's carried block), or ``PACK_START_INFLATED`` of
them as stored (small segments are stored uncompressed), wait for one (in the
background: the CASes go on carrying them meanwhile, the cap leaves room for that). What a
new holder found carried by the lock it took over counts as carried by it (a start and a
stop with no write cost no pack). A CAS that would carry a block over ``BLOCK_MAX_BYTES``
(or more than ``CARRIED_MAX_BYTES`` or ``MAX_INLINE_SEGMENTS``) waits for the oldest packs
first; a new segment too large to ride inline is uploaded on its own before the CAS that
names it, as before packs.

A pack holds segments of one generation only, under that generation's key: its bytes are
then fixed by its range (published segments never change), so a retry, or a new holder
packing the same range, sends the very same bytes, and ``If-None-Match: *`` accepts them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from tenantdb.protocol.carried import (
    BLOCK_MAX_BYTES,
    CARRIED_MAX_BYTES,
    MAX_INLINE_SEGMENTS,
    encode_block,
)
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.replication.packs import PACK_SEGMENTS, encode_pack, pack_key
from tenantdb.replication.segment import segment_key
from tenantdb.replication.uploads import LogUploads

__all__ = ["PACK_START_BYTES", "PACK_START_INFLATED", "Carried", "Carrier", "Pack", "Stored"]

# A pack starts once the carried segments not in one weigh this much compressed, or
# inflated: the rest of each cap is room for the CASes sent while it uploads (a CAS that
# would pass a cap waits for the upload).
PACK_START_BYTES = BLOCK_MAX_BYTES * 2 // 3
PACK_START_INFLATED = CARRIED_MAX_BYTES * 2 // 3


@dataclass(frozen=True)
class Carried:
    """A published segment lock.json carries (or a new one the next CAS may carry)."""

    index: int
    generation: int
    body: bytes


@dataclass(frozen=True)
class Pack:
    """A pack being (or already) uploaded: segments ``first..last`` of ``generation``."""

    key: str
    first: int
    last: int
    generation: int
    body: bytes

    @property
    def count(self) -> int:
        """How many segments it holds."""
        return self.last - self.first + 1


@dataclass(frozen=True)
class Stored:
    """What the next CAS may stop carrying, and what it carries on."""

    packs: tuple[Pack, ...]  # uploaded: lock.json names them from this CAS on
    singles: tuple[str, ...]  # new segments uploaded on their own (too large to carry)
    inline: tuple[Carried, ...]  # carried by this CAS

    @property
    def ranges(self) -> list[tuple[int, int, int]]:
        """The packs as lock.json lists them."""
        return [(p.first, p.last, p.generation) for p in self.packs]


def _over(chain: Sequence[Carried]) -> bool:
    """Whether lock.json may not carry ``chain`` inline."""
    bodies = [c.body for c in chain]
    if len(chain) > MAX_INLINE_SEGMENTS or sum(map(len, bodies)) > CARRIED_MAX_BYTES:
        return True
    return len(encode_block(bodies)) > BLOCK_MAX_BYTES


class Carrier:
    """One holder's carried segments and the packs started for them, oldest first."""

    def __init__(self, uploads: LogUploads, *, prefix: str, tenant: str) -> None:
        self.uploads = uploads
        self.prefix = prefix
        self.tenant = tenant
        # None until read from the lock this holding started with.
        self._carried: deque[Carried] | None = None
        # Started packs, covering the oldest carried segments in order.
        self._packs: deque[Pack] = deque()

    def load(self, record: LockRecord | None) -> deque[Carried]:
        """The carried segments; on the first call, those of ``record`` (the lock taken
        over: a predecessor's carried segments are packed like this holder's own)."""
        if self._carried is None:
            self._carried = deque(_carried_by(record))
        return self._carried

    def retry(self) -> None:
        """Restart the upload of every started pack whose upload failed."""
        for pack in self._packs:
            self.uploads.start(pack.key, pack.body)

    async def prepare(self, record: LockRecord | None, new: Sequence[Carried]) -> Stored:
        """Decide what a CAS appending ``new`` stops carrying and carries on (``record``:
        the lock this holding started with, read on the first call).

        Waits only when the carried segments would pass the inline caps: for the oldest
        packs (started now if need be), and for a new segment's own object.
        """
        carried = self.load(record)
        chain = [*carried, *new]
        start, packs, singles = 0, [], []
        for pack in self._packs:
            if not self.uploads.uploaded(pack.key):
                break
            start += pack.count
            packs.append(pack)
        while _over(chain[start:]):
            if start < len(carried):
                done = len(packs)
                if done == len(self._packs):
                    self._start_pack()
                pack = self._packs[done]
                await asyncio.shield(self.uploads.start(pack.key, pack.body))
                start += pack.count
                packs.append(pack)
            else:
                item = chain[start]
                key = segment_key(self.prefix, self.tenant, item.generation, item.index)
                await asyncio.shield(self.uploads.start(key, item.body))
                start += 1
                singles.append(key)
        return Stored(tuple(packs), tuple(singles), tuple(chain[start:]))

    def published(self, stored: Stored) -> None:
        """A CAS as ``stored`` planned landed: carry what it carries, start a pack if due."""
        for pack in stored.packs:
            self._packs.popleft()
            self.uploads.forget(pack.key)  # in the bucket, and named by lock.json from now on
        for key in stored.singles:
            self.uploads.forget(key)
        self._carried = deque(stored.inline)
        unpacked = self._unpacked()
        if (
            len(unpacked) >= PACK_SEGMENTS
            or sum(len(c.body) for c in unpacked) >= PACK_START_INFLATED
            or self._unpacked_weight() >= PACK_START_BYTES
        ):
            self._start_pack()

    async def store_all(self, record: LockRecord | None) -> None:
        """Put every carried segment in a pack in the bucket: before a CAS that replaces the
        log (a snapshot) drops them. Fails if an upload does."""
        self.load(record)
        while self._unpacked():
            self._start_pack()
        for pack in self._packs:
            await asyncio.shield(self.uploads.start(pack.key, pack.body))

    def replaced(self) -> None:
        """The log was replaced (a snapshot): nothing is carried any more."""
        for pack in self._packs:
            self.uploads.forget(pack.key)
        self._packs.clear()
        self._carried = deque()

    def _unpacked(self) -> list[Carried]:
        """The carried segments no started pack holds, oldest first."""
        carried = self._carried or deque()
        packed = sum(pack.count for pack in self._packs)
        return list(carried)[packed:]

    def _unpacked_weight(self) -> int:
        """About what the unpacked carried segments weigh compressed: their share of the
        carried block (the one the CAS just sent, not made again)."""
        carried = [c.body for c in self._carried or ()]
        raw = sum(map(len, carried))
        unpacked = sum(len(c.body) for c in self._unpacked())
        return len(encode_block(carried)) * unpacked // raw if raw else 0

    def _start_pack(self) -> None:
        """Start the pack of the oldest unpacked carried segments (one generation's, up to
        ``PACK_SEGMENTS``)."""
        rest = self._unpacked()
        if not rest:
            return
        # Of one generation, as a pack's key says (carried segments are consecutive).
        batch = [c for c in rest[:PACK_SEGMENTS] if c.generation == rest[0].generation]
        first, last = batch[0].index, batch[-1].index
        key = pack_key(self.prefix, self.tenant, batch[0].generation, first, last)
        body = encode_pack(self.tenant, first, [c.body for c in batch])
        pack = Pack(key, first, last, batch[0].generation, body)
        self._packs.append(pack)
        self.uploads.start(pack.key, pack.body)


def _carried_by(record: LockRecord | None) -> list[Carried]:
    """The segments ``record`` carries inline, oldest first."""
    pointer = record.log if record else None
    if pointer is None:
        return []
    return [
        Carried(index, pointer.generation_of(index), body)
        for index in range(pointer.inline_from, pointer.tail + 1)
        if (body := pointer.inline_segment(index)) is not None
    ]
