"""The segments a walk of the log reads: from their own objects, from packs, or from lock.json.

Every reader of the log (restore, the follower, point-in-time restore, compaction, forks)
fetches segment by segment; segments that live in one pack share one download of it,
kept only until the walk has taken the pack's last segment. A missing object raises the
bucket's ``ObjectNotFoundError`` (each reader says what that means to it).
"""

from __future__ import annotations

import asyncio

from tenantdb.errors import ReplicationError
from tenantdb.protocol.lockfile import LogChunk
from tenantdb.replication.group_commit import retrieve_exception
from tenantdb.replication.packs import decode_pack, pack_max_bytes
from tenantdb.replication.segment import SEGMENT_MAX_BYTES
from tenantdb.storage.base import Bucket

__all__ = ["LogObjects"]


class LogObjects:
    """Fetches the bytes of one walk's segments; a pack is downloaded once for all it holds.

    ``close`` cancels the pack downloads still running.
    """

    def __init__(self, bucket: Bucket, tenant: str) -> None:
        self.bucket = bucket
        self.tenant = tenant
        self._packs: dict[str, asyncio.Task[list[bytes]]] = {}

    async def segment_bytes(self, key: str, chunk: LogChunk, inline: bytes | None) -> bytes:
        """Chunk ``chunk``'s bytes: ``inline`` if given, else from ``key`` (its object)."""
        if inline is not None:
            return inline
        if chunk.pack is None:
            return await self._get(key, SEGMENT_MAX_BYTES)
        first, last = chunk.pack
        if not first <= chunk.last <= last or chunk.first != chunk.last:
            raise ReplicationError(f"segment {chunk.last} is not in pack {key}", key=key)
        fetch = self._packs.get(key)
        if fetch is None:
            fetch = asyncio.ensure_future(self._pack(key, first, last))
            fetch.add_done_callback(retrieve_exception)
            self._packs[key] = fetch
        bodies = await asyncio.shield(fetch)
        if chunk.last == last:
            self._packs.pop(key, None)  # a walk goes in order: nothing else reads it
        return bodies[chunk.last - first]

    async def _get(self, key: str, max_size: int) -> bytes:
        return (await self.bucket.get(key, max_size=max_size)).body

    async def _pack(self, key: str, first: int, last: int) -> list[bytes]:
        body = await self._get(key, pack_max_bytes(self.tenant, last - first + 1))
        return decode_pack(body, key=key, tenant=self.tenant, first=first, last=last)

    def close(self) -> None:
        """Cancel the pack downloads no segment waits for any more."""
        for fetch in self._packs.values():
            fetch.cancel()
        self._packs.clear()
