"""A tenant's history in the bucket: what was published, when, and what retention may delete.

``lock.json`` only says where the tenant stands now. Going back in time needs the immutable
objects (snapshots, segments, merged segments) and which of them were ever published: a
fenced holder leaves uploads that no ``lock.json`` ever named. Each holder therefore writes
one *takeover record* (``history/<generation>.json``, ``If-None-Match: *``) right after it
acquires the lease and before it uploads anything: the log tail and the snapshot of the lock
it took over. Every object a generation wrote past the next takeover's tail (or a snapshot
newer than the one that takeover found) was never published; everything else was, because a
holder publishes in order and is only ever cut short at its end. The current generation is
judged against ``lock.json`` itself.

From this the module answers: which objects make up the history (``read_history``), from
when a point-in-time restore can start (``History.restorable_from``), which objects a restore
at a given time uses (``History.bases``), and which objects retention may delete
(``History.expendable``).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property

from tenantdb.errors import ListingBehindError, ObjectNotFoundError, ReplicationError
from tenantdb.parsing import (
    time_of_ms,
)
from tenantdb.protocol.lease import ObservedLock, read_lock
from tenantdb.protocol.lockfile import LOCK_MAX_BYTES, LockRecord, SnapshotName
from tenantdb.protocol.usage import USAGE_DIR, UsageRecord, parse_usage_key
from tenantdb.replication.segment import chunk_key, parse_chunk_key
from tenantdb.replication.takeovers import Takeover, takeover_key
from tenantdb.storage.base import Bucket, ObjectInfo

__all__ = [
    "Base",
    "History",
    "SegmentEntry",
    "SnapshotEntry",
    "read_history",
]

log = logging.getLogger("tenantdb.replication")

# Takeover records read at once.
_READ_AHEAD = 8
# Generations past the newest listed takeover record whose records are looked up by key.
_UNLISTED_GENERATIONS = 8
_EPOCH = datetime.fromtimestamp(0, UTC)
_CLOCK_SLACK = timedelta(seconds=1)
# How much longer than the retention's cutoff usage records are kept.
USAGE_KEPT = timedelta(days=1)


@dataclass(frozen=True)
class SnapshotEntry:
    """A snapshot object in the bucket."""

    key: str
    size: int
    last_modified: datetime
    generation: int
    seq: int
    # The first segment index that applies on top of it, and when its copy was made: None
    # for snapshots made before point-in-time restores existed.
    base: int | None
    taken_at: datetime | None
    published: bool


@dataclass(frozen=True)
class SegmentEntry:
    """A log object in the bucket: one segment, a merged range ``first..last``, or a pack of
    the single segments ``first..last`` (``packed``)."""

    key: str
    size: int
    last_modified: datetime
    generation: int
    first: int
    last: int
    merged: bool
    published: bool
    packed: bool = False


@dataclass(frozen=True)
class Base:
    """Where a restore can start: a snapshot (or an empty database) and the next index."""

    snapshot: SnapshotEntry | None
    index: int
    taken_at: datetime


@dataclass(frozen=True)
class History:
    """Everything the bucket holds of one tenant, each object marked published or not."""

    tenant: str
    prefix: str
    lock: ObservedLock | None
    snapshots: tuple[SnapshotEntry, ...]
    segments: tuple[SegmentEntry, ...]
    takeovers: tuple[Takeover, ...]
    # The machines' usage records (``protocol.usage``), by key: a meter's, not the data's.
    usage: tuple[tuple[str, UsageRecord], ...] = ()

    @property
    def record(self) -> LockRecord | None:
        """The current lock.json, if any."""
        return self.lock.record if self.lock else None

    def bases(self) -> list[Base]:
        """Every published starting point of a restore, in log order (generation, index).

        Not in time order: each holder stamps its own clock and a rollback the bucket's, so
        a later generation's snapshot may carry an earlier time than the one before it.
        """
        found = [
            (s.generation, s.seq, Base(s, s.base, s.taken_at))
            for s in self.snapshots
            if s.published and s.base is not None and s.taken_at is not None
        ]
        # A tenant's log starts from an empty database: usable while segment 1 is kept.
        if any(s.published and s.first == 1 for s in self.segments) or self._inline_from() == 1:
            first = min((t.at for t in self.takeovers), default=_EPOCH)
            found.append((0, 0, Base(None, 1, first)))
        return [base for *_, base in sorted(found, key=lambda f: (f[0], f[2].index, f[1]))]

    def base_at(self, at: datetime) -> Base | None:
        """The latest starting point in the log made at or before ``at``."""
        usable = [b for b in self.bases() if b.taken_at <= at]
        return usable[-1] if usable else None

    def restorable_from(self) -> datetime | None:
        """The earliest time a point-in-time restore accepts (None: nothing restorable)."""
        return min((b.taken_at for b in self.bases()), default=None)

    def _inline_from(self) -> int | None:
        record = self.record
        if record is None or record.log is None or not record.log.inline:
            return None
        return record.log.inline_from

    def named(self) -> set[str]:
        """The keys the current lock.json names: never deleted."""
        record = self.record
        named: set[str] = set()
        if record is not None:
            if record.snapshot is not None:
                named.add(record.snapshot.key)
            if record.log is not None:
                named |= {chunk_key(self.prefix, self.tenant, c) for c in record.log.chunks()}
        return named

    def unlisted(self) -> list[str]:
        """The objects lock.json names (its snapshot first) that the LIST did not show.

        lock.json is read first, so the LIST has every object it names unless the LIST
        lags behind writes (a Global Tigris bucket's may, across regions), or an object
        was lost: newer objects may then be hidden too, and anything decided from the
        listing (a restore's base, what retention deletes) would be decided on an older
        bucket than lock.json's.
        """
        record = self.record
        if record is None:
            return []
        listed = {s.key for s in self.snapshots} | {e.key for e in self.segments}
        named = [record.snapshot.key] if record.snapshot else []
        pointer = record.log
        if pointer is not None:
            named += [
                chunk_key(self.prefix, self.tenant, chunk)
                for chunk in pointer.iter_chunks()
                if chunk.merged or chunk.pack or pointer.inline_segment(chunk.first) is None
            ]
        return [key for key in named if key not in listed]

    def behind(self, key: str) -> ListingBehindError:
        """The error for a listing that lacks ``key``, which lock.json names."""
        return ListingBehindError(
            f"tenant {self.tenant}: the bucket's listing lacks {key}, which lock.json names "
            "(a LIST that lags behind writes, as a Tigris bucket's may across regions, or a "
            "lost object); try again in a moment",
            key=key,
        )

    @cached_property
    def _published_at(self) -> dict[int, list[SegmentEntry]]:
        by_first: dict[int, list[SegmentEntry]] = {}
        for entry in self.segments:
            if entry.published:
                # A pack holds each of its segments (at most MAX_INLINE_SEGMENTS: see
                # parse_chunk_key), and a walk may start at any of them.
                last = entry.last if entry.packed else entry.first
                for index in range(entry.first, last + 1):
                    by_first.setdefault(index, []).append(entry)
        return by_first

    def pick(
        self, index: int, at: datetime, *, avoid: frozenset[str] = frozenset()
    ) -> SegmentEntry | None:
        """The published object a restore as of ``at`` applies at ``index``, if any.

        A merged object written by ``at`` (so every commit in it is older, as far as the
        bucket's clock tells: the longest), else the single segment, else a merged object
        written later. Keys in ``avoid`` are passed over. A pack stands for each single
        segment it holds (the segment's own object, when both exist).
        """
        entries = [e for e in self._published_at.get(index, []) if e.key not in avoid]
        merged = sorted((e for e in entries if e.merged), key=lambda e: e.last, reverse=True)
        early = [e for e in merged if e.last_modified <= at]
        singles = sorted(
            (e for e in entries if not e.merged), key=lambda e: (e.generation, not e.packed)
        )
        if early:
            return early[0]
        if singles:
            return singles[-1]
        return merged[0] if merged else None

    def expendable(self, cutoff: datetime, *, keep_snapshots: int) -> list[str]:
        """Keys retention may delete: nothing any restore as of ``cutoff`` or later reads.

        The newest published snapshot made at or before ``cutoff`` (the anchor) is kept,
        with every object a restore from it reads, so that every moment from the anchor's
        on stays restorable (``restorable_from``). Also kept: the ``keep_snapshots`` newest
        snapshots, whatever lock.json names, and every object younger than ``cutoff``.
        """
        record = self.record
        named = self.named()
        anchor = self.base_at(cutoff)
        start = anchor.index if anchor else 1
        # Restores from the anchor's own time on read single segments; later ones read the
        # merges made by then (Last-Modified may be a second early: count them a second late).
        needed = self._path(start, (anchor.taken_at if anchor else _EPOCH) - _CLOCK_SLACK)
        needed |= self._path(start, cutoff - _CLOCK_SLACK)
        newest = {
            s.key
            for s in sorted(
                (s for s in self.snapshots if s.published),
                key=lambda s: (s.generation, s.seq),
            )[-keep_snapshots:]
        }
        if anchor is not None and anchor.snapshot is not None:
            newest.add(anchor.snapshot.key)
        gone: list[str] = []
        kept_generations: list[int] = []
        # Young by the bucket's Last-Modified, or by the time the snapshot's own key holds
        # (the holder's clock, as ``cutoff`` is): a base made after the cutoff may hold the
        # only copy of its commits (a snapshot taken instead of segments), so a restore
        # after it needs it however early the bucket stamped it (skew, whole seconds).
        for snap in self.snapshots:
            young = snap.last_modified >= cutoff or (
                snap.taken_at is not None and snap.taken_at >= cutoff
            )
            if snap.key in named or snap.key in newest or young:
                kept_generations.append(snap.generation)
            else:
                gone.append(snap.key)  # unpublished, older than the anchor, or in between
        for seg in self.segments:
            if seg.key in named or seg.key in needed or seg.last_modified >= cutoff:
                kept_generations.append(seg.generation)
            else:
                gone.append(seg.key)
        # The segments lock.json names are kept, objects or not: those it carries inline
        # have no object yet, and their generation's record dates the log's start.
        if record is not None and record.log is not None:
            kept_generations += [generation for generation, _ in record.log.runs]
        # A takeover record classifies the objects of later generations: kept while any is.
        oldest = min(kept_generations, default=record.generation if record else 0)
        gone += [
            takeover_key(self.prefix, self.tenant, t.generation)
            for t in self.takeovers
            if t.generation < oldest and t.at < cutoff
        ]
        # Usage records a day older than the cutoff: `status` sums the last day.
        ended = (cutoff - USAGE_KEPT).timestamp() * 1000
        return gone + [key for key, usage in self.usage if usage.ended_ms < ended]

    def _path(self, index: int, at: datetime) -> set[str]:
        """The keys a restore as of ``at`` from ``index`` reads, followed to the log's end."""
        # From one published object to the next: never index by index (an index is a
        # number from a key, as large as the key says).
        firsts = sorted(self._published_at)
        keys: set[str] = set()
        while (position := bisect.bisect_left(firsts, index)) < len(firsts):
            entry = self.pick(firsts[position], at)
            if entry is None:  # pragma: no cover - every first has a published entry
                break
            keys.add(entry.key)
            index = entry.last + 1
        return keys


async def read_history(bucket: Bucket, tenant: str, *, prefix: str) -> History:
    """List the tenant's objects, read its lock and takeover records, classify everything."""
    root = f"{prefix}{tenant}/"
    lock_key = f"{root}lock.json"
    # The lock first, then the LIST: every object the lock names and does not carry was
    # uploaded before the lock was written, so the LIST has it, and a restore can take a
    # named index missing from it for what it is (lost), never for the log's end.
    observed = await read_lock(bucket, tenant, lock_key)
    objects = await bucket.list(root)
    records = [o for o in objects if o.key.startswith(f"{root}history/")]
    record = observed.record if observed else None
    read = await _read_takeovers(bucket, [o.key for o in records])
    read += await _unlisted_takeover(bucket, read, record, tenant=tenant, prefix=prefix)
    takeovers = _trusted(read, record, tenant=tenant, prefix=prefix)
    limits = _Limits(takeovers, record)
    snapshots: list[SnapshotEntry] = []
    segments: list[SegmentEntry] = []
    usage: list[tuple[str, UsageRecord]] = []
    for info in objects:
        rest = info.key.removeprefix(root)
        if rest.startswith(USAGE_DIR):
            if (reading := parse_usage_key(rest)) is not None:
                usage.append((info.key, reading))
        elif rest.startswith("snapshots/"):
            if (entry := _snapshot_entry(info, limits)) is not None:
                snapshots.append(entry)
        elif rest.startswith("log/") and (chunk := parse_chunk_key(rest)) is not None:
            published = chunk.last <= limits.tail(chunk.generation)
            segments.append(
                SegmentEntry(
                    info.key,
                    info.size,
                    info.last_modified,
                    chunk.generation,
                    chunk.first,
                    chunk.last,
                    chunk.merged,
                    published,
                    chunk.pack is not None,
                )
            )
    snapshots.sort(key=lambda s: (s.generation, s.seq, s.key))
    segments.sort(key=lambda s: (s.first, s.last, s.generation))
    return History(
        tenant, prefix, observed, tuple(snapshots), tuple(segments), takeovers, tuple(usage)
    )


async def _read_takeovers(bucket: Bucket, keys: Sequence[str]) -> list[Takeover | ReplicationError]:
    """Every takeover record, parsed, or the error that names it as unusable.

    A key with no object is left out: listed, then deleted by retention (which deletes
    only the records of generations nothing kept belongs to), or looked up and never
    written.
    """
    gate = asyncio.Semaphore(_READ_AHEAD)

    async def read(key: str) -> Takeover | ReplicationError | None:
        async with gate:
            try:
                body = (await bucket.get(key, max_size=LOCK_MAX_BYTES)).body
            except ObjectNotFoundError:
                return None
        try:
            return Takeover.parse(body, key=key)
        except ReplicationError as exc:
            return exc

    found = await asyncio.gather(*(read(key) for key in keys))
    return [record for record in found if record is not None]


async def _unlisted_takeover(
    bucket: Bucket,
    read: Sequence[Takeover | ReplicationError],
    record: LockRecord | None,
    *,
    tenant: str,
    prefix: str,
) -> list[Takeover | ReplicationError]:
    """The first takeover record after the newest listed one, looked up by key.

    A LIST may lag behind the writes (Tigris lists eventually across regions), and the
    newest generation listed would then be judged against lock.json, whose snapshot and
    tail may be a later holder's: its published objects would count as unpublished, and
    a restore start from an older base. A GET of a key is never stale: the generations
    after the newest listed record, lock.json's own included, are looked up one by one
    up to the first record (a holder that died before writing its record, or one that
    is writing it now, has none: then lock.json still holds what the newest listed
    generation published).
    """
    if record is None:
        return []
    newest = max((t.generation for t in read if isinstance(t, Takeover)), default=0)
    if newest == 0 or newest >= record.generation:
        return []  # nothing listed to classify, or the newest listed is lock.json's
    last = min(record.generation, newest + _UNLISTED_GENERATIONS)
    for generation in range(newest + 1, last + 1):
        if found := await _read_takeovers(bucket, [takeover_key(prefix, tenant, generation)]):
            return found
    if last < record.generation:
        raise ReplicationError(
            f"tenant {tenant}: no takeover record of generations {newest + 1} to {last} "
            f"(the newest listed is {newest}, lock.json's generation {record.generation}): "
            "a LIST that lags far behind, or records removed by hand",
            key=takeover_key(prefix, tenant, last),
        )
    return []


def _trusted(
    read: Sequence[Takeover | ReplicationError],
    record: LockRecord | None,
    *,
    tenant: str,
    prefix: str,
) -> tuple[Takeover, ...]:
    """The records that classify objects, by generation; ``ReplicationError`` for a forged one.

    Left out: records a later one ``replaces`` (they sat at a generation its holder left
    unused), unusable ones included, and records newer than the lock.json read (taken over
    since: the lock read judges the current generation). A record cannot have found a
    longer log than the one lock.json has now (a log's tail never goes back): such a
    record is refused, naming it. So is an unusable record no later one replaces.
    """
    takeovers = [t for t in read if isinstance(t, Takeover)]
    replaced = {t.replaces for t in takeovers if t.replaces is not None}
    ignored = {takeover_key(prefix, tenant, generation) for generation in replaced}
    for unusable in read:
        if isinstance(unusable, ReplicationError) and unusable.key not in ignored:
            raise unusable
    kept = sorted(
        (t for t in takeovers if t.generation not in replaced), key=lambda t: t.generation
    )
    if record is None:
        return tuple(kept)  # no lock.json to judge them by (removed by hand?): as they are
    tail = record.log.tail if record.log else 0
    kept = [t for t in kept if t.generation <= record.generation]
    for takeover in kept:
        if takeover.tail > tail:
            key = takeover_key(prefix, record.tenant, takeover.generation)
            raise ReplicationError(
                f"takeover record {key} says the log reached {takeover.tail}, past lock.json's "
                f"tail {tail}: refusing to classify anything by it; remove it by hand",
                key=key,
            )
    return tuple(kept)


class _Limits:
    """What each generation published: up to where the next takeover (or lock.json) found."""

    def __init__(self, takeovers: Sequence[Takeover], record: LockRecord | None) -> None:
        self._takeovers = takeovers
        self._record = record

    def _limit(self, generation: int) -> tuple[int, str | None] | None:
        for takeover in self._takeovers:
            if takeover.generation > generation:
                return takeover.tail, takeover.snapshot
        record = self._record
        if record is None or generation > record.generation:
            return None
        tail = record.log.tail if record.log else 0
        return tail, record.snapshot.key if record.snapshot else None

    def tail(self, generation: int) -> int:
        """The highest log index ``generation`` published (-1: none can be known)."""
        limit = self._limit(generation)
        return limit[0] if limit else -1

    def published_snapshot(self, name: SnapshotName) -> bool:
        """Whether the snapshot named ``name`` was ever named by lock.json."""
        limit = self._limit(name.generation)
        found = SnapshotName.parse(limit[1]) if limit and limit[1] else None
        # A holder publishes its snapshots in order: all up to the last one published.
        return found is not None and found.generation == name.generation and name.seq <= found.seq


def _snapshot_entry(info: ObjectInfo, limits: _Limits) -> SnapshotEntry | None:
    name = SnapshotName.parse(info.key)
    if name is None:
        return None
    # SnapshotName.parse bounds the time: within datetime's range.
    taken = None if name.taken_ms is None else time_of_ms(name.taken_ms)
    return SnapshotEntry(
        info.key,
        info.size,
        info.last_modified,
        name.generation,
        name.seq,
        name.base,
        taken,
        limits.published_snapshot(name),
    )
