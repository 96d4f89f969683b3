"""``lock.json``: the record a tenant's lease and data pointer live in, and its checks.

One small JSON object per tenant: who holds the lease (``owner`` and ``claim``), the
fencing ``generation``, the write counter ``seq``, the published ``snapshot``, where
the ``log`` of segments on top of it stands, and the ``schema`` the tenant is at. Anything
that does not parse into exactly what tenantdb writes is refused with
``LockFileCorruptError``, never guessed at.
"""

from __future__ import annotations

import base64
import json
import math
import re
import reprlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

from tenantdb import clock
from tenantdb.errors import LockFileCorruptError
from tenantdb.parsing import (
    MAX_COUNTER,
    MAX_TEXT,
    MAX_TIME_MS,
    Malformed,
    bounded_int,
    bounded_text,
    load_json,
    parse_iso_time,
)
from tenantdb.protocol.carried import (
    BLOCK_MAX_BYTES,
    MAX_INLINE_SEGMENTS,
    decode_block,
    encode_block,
)

__all__ = [
    "LOCK_MAX_BYTES",
    "MAX_LOG_SINGLES",
    "LockRecord",
    "LogChunk",
    "LogPointer",
    "ReleaseReason",
    "SchemaVersion",
    "SnapshotName",
    "SnapshotRef",
    "now_iso",
    "now_ms",
]

LOCK_FORMAT = 1
# Why a holder released the lease, when that matters to the other machines: "idle" means
# nobody used the tenant for TENANTDB_IDLE_STOP seconds, so a standby stops too instead of
# taking over (which would keep the tenant awake and costing). A handoff says nothing.
ReleaseReason = Literal["idle"]
# Far above any lease tenantdb is configured with (config.MAX_LEASE_TTL), and
# small enough that expiry arithmetic stays exact.
_MAX_TTL_SECONDS = 2**31
_SHA256 = re.compile(r"[0-9a-f]{64}")
# lock.json is a few hundred bytes: anything far larger is not a lock and is not read whole.
LOCK_MAX_BYTES = 64 * 1024
# The most single (unmerged) segments a log may have: a holder merges every MERGE_SINGLES
# and snapshots at MAX_CHUNKS objects, so far more is not a log tenantdb wrote; it bounds
# what ``LogPointer.chunks`` yields whatever ``tail`` says.
MAX_LOG_SINGLES = 100_000


@dataclass(frozen=True)
class SchemaVersion:
    """The tenant's schema: how many migrations were applied, and which list they came from."""

    version: int
    # The first 16 hex digits of the sha256 of those migrations (machine.migrations.schema_of).
    hash: str


@dataclass(frozen=True)
class SnapshotRef:
    """The published snapshot a lock points at."""

    key: str
    sha256: str
    size: int
    published_at: str


# <generation>-<seq>[-<base>-<taken_ms>][-<random>].sqlite3 (keys made before point-in-time
# restores existed have no base and time).
_SNAPSHOT_NAME = re.compile(
    r"(\d{1,12})-(\d{1,12})(?:-(\d{1,15})-(\d{1,15}))?-([0-9a-f]{1,64})\.sqlite3"
)


@dataclass(frozen=True)
class SnapshotName:
    """What a snapshot's key says: who made it, when, and where the log goes on from it."""

    generation: int
    # lock.json's seq when the key was made: a holder's later snapshots have higher ones.
    seq: int
    # The index of the first segment that applies on top of the snapshot.
    base: int | None = None
    # Unix milliseconds once the copy was made: it holds every commit before this.
    taken_ms: int | None = None

    def key(self, snapshot_prefix: str, unique: str) -> str:
        """The bucket key for this name under ``snapshot_prefix``; ``unique`` is random hex."""
        if self.base is None or self.taken_ms is None:
            raise ValueError("new snapshot keys carry their base and time")
        return (
            f"{snapshot_prefix}{self.generation:08d}-{self.seq:08d}-"
            f"{self.base:012d}-{self.taken_ms:013d}-{unique}.sqlite3"
        )

    @classmethod
    def parse(cls, key: str) -> SnapshotName | None:
        """The name in a snapshot key, or None if tenantdb did not make it."""
        match = _SNAPSHOT_NAME.fullmatch(key.rsplit("/", 1)[-1])
        if match is None:
            return None
        base = None if match[3] is None else int(match[3])
        taken_ms = None if match[4] is None else int(match[4])
        # A time past MAX_TIME_MS (15 digits allow the year 33658) is not one tenantdb wrote.
        if int(match[1]) < 1 or (taken_ms is not None and taken_ms > MAX_TIME_MS):
            return None
        return cls(int(match[1]), int(match[2]), base, taken_ms)


@dataclass(frozen=True)
class LogChunk:
    """One step of the log: a single segment, or a merged range of them.

    A single segment lives in its own object, or (``pack``: that pack's first and last
    index, written by the same generation) inside a pack with its neighbours.
    """

    first: int
    last: int
    generation: int
    merged: bool
    pack: tuple[int, int] | None = None


@dataclass(frozen=True)
class LogPointer:
    """Where the tenant's log stands: the segments on top of the snapshot, and their end.

    Segments ``base`` to ``tail`` (inclusive; none when ``tail == base - 1``) apply, in
    order, on top of the snapshot (or an empty database). The oldest of them may have been
    merged: ``merged`` lists ``(first, last, generation)`` ranges, contiguous from ``base``,
    each one object written by that generation. The segments after them are single ones,
    and ``runs`` says which generation wrote which: ``(generation, first index)`` pairs,
    ascending. So every key is derived without a LIST. ``state`` and ``db_pages`` describe
    the database after the tail, for the restore to check its result against.

    ``inline`` may carry the newest segments themselves (oldest first, ending at the tail;
    in lock.json one compressed block, ``protocol.carried``), so that one write of
    lock.json publishes them: their objects may not exist yet, and a restore reads them
    from here. A write that stops carrying a segment is
    sent only once that segment's object (or the pack holding it) is uploaded.

    ``packs`` lists ``(first, last, generation)`` ranges of single segments that live in
    one pack object each (see ``replication.packs``) instead of one object each.
    """

    base: int
    tail: int
    state: str
    db_pages: int
    runs: tuple[tuple[int, int], ...] = ()
    updated_at: str = ""
    merged: tuple[tuple[int, int, int], ...] = ()
    inline: tuple[bytes, ...] = field(default=(), repr=False)
    packs: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def empty(cls, base: int, state: str, db_pages: int) -> LogPointer:
        """A log with no segment yet (the next is ``base``) on a database in ``state``."""
        return cls(base, base - 1, state, db_pages, (), now_iso())

    @property
    def inline_from(self) -> int:
        """The index of the oldest segment lock.json carries inline (tail + 1: none)."""
        return self.tail - len(self.inline) + 1

    def inline_segment(self, index: int) -> bytes | None:
        """Segment ``index``'s bytes when lock.json carries it inline."""
        if index < self.inline_from or index > self.tail:
            return None
        return self.inline[index - self.inline_from]

    def with_inline(self, bodies: Sequence[bytes]) -> LogPointer:
        """This pointer carrying ``bodies`` as its newest segments, oldest first."""
        return replace(self, inline=tuple(bodies))

    def with_packs(self, packs: Sequence[tuple[int, int, int]]) -> LogPointer:
        """This pointer with ``packs`` (newer than any it lists) holding their segments."""
        return replace(self, packs=(*self.packs, *packs))

    @property
    def first_single(self) -> int:
        """The index of the first segment that is not part of a merged range."""
        return self.merged[-1][1] + 1 if self.merged else self.base

    def generation_of(self, index: int) -> int:
        """The generation whose holder wrote single segment ``index``."""
        for generation, first in reversed(self.runs):
            if first <= index:
                return generation
        raise ValueError(f"segment {index} is not in the log {self.base}..{self.tail}")

    def chunks(self) -> list[LogChunk]:
        """Every object a restore applies, in order: the merged ranges, then the singles."""
        return list(self.iter_chunks())

    def iter_chunks(self) -> Iterator[LogChunk]:
        """``chunks``, one at a time (at most len(merged) + MAX_LOG_SINGLES of them)."""
        for first, last, generation in self.merged:
            yield LogChunk(first, last, generation, merged=True)
        # Each run covers the indices up to the next run's first (the last, up to the tail).
        ends = [first - 1 for _, first in self.runs[1:]] + [self.tail]
        packs = iter(self.packs)
        pack = next(packs, None)
        # No runs: no single segments (then ``ends`` holds the tail alone, unused).
        for (generation, first), end in zip(self.runs, ends, strict=False):
            for index in range(max(first, self.first_single), end + 1):
                while pack is not None and pack[1] < index:
                    pack = next(packs, None)
                held = pack[:2] if pack is not None and pack[0] <= index else None
                yield LogChunk(index, index, generation, merged=False, pack=held)

    def objects(self, *, before: int | None = None) -> int:
        """How many objects hold the chunks (a pack once), of those before index ``before``."""
        end = self.tail + 1 if before is None else before
        held = {chunk.pack or chunk.last for chunk in self.iter_chunks() if chunk.last < end}
        return len(held)

    def appended(self, generation: int, state: str, db_pages: int) -> LogPointer:
        """This pointer with one more segment, written by ``generation``, at its tail."""
        index = self.tail + 1
        runs = self.runs
        if not runs or runs[-1][0] != generation:
            runs = (*runs, (generation, index))
        return replace(
            self,
            tail=index,
            state=state,
            db_pages=db_pages,
            runs=runs,
            updated_at=now_iso(),
            inline=(),
        )

    def with_merged(self, first: int, last: int, generation: int) -> LogPointer:
        """This pointer with the chunks from ``first`` to ``last`` replaced by one object."""
        merged = (*(m for m in self.merged if m[1] < first), (first, last, generation))
        runs = [(g, i) for g, i in self.runs if i > last]
        # The run the new first single segment belongs to, if it started inside the range.
        if last < self.tail and (not runs or runs[0][1] != last + 1):
            runs.insert(0, (self.generation_of(last + 1), last + 1))
        packs = tuple(p for p in self.packs if p[1] > last)
        return replace(self, merged=merged, runs=tuple(runs), packs=packs)


@dataclass(frozen=True)
class LockRecord:
    """The parsed content of ``lock.json``."""

    tenant: str
    owner: str | None
    region: str | None
    generation: int
    seq: int
    ttl_seconds: float
    snapshot: SnapshotRef | None = None
    log: LogPointer | None = None
    last_owner: str | None = None
    # Which process of ``owner`` holds it: a machine id alone cannot tell two processes apart.
    claim: str | None = None
    # Set only with no owner: why the last holder released (see ReleaseReason).
    released: ReleaseReason | None = None
    # Set by a holder once its migrations ran (absent before schemas were recorded: unknown).
    schema: SchemaVersion | None = None
    format: int = LOCK_FORMAT

    def to_json(self) -> bytes:
        """Serialize for the bucket."""
        data = asdict(self)
        if self.log is not None:
            # The carried segments as one compressed block (``carried``), none: no field.
            del data["log"]["inline"]
            if self.log.inline:
                data["log"]["carried"] = base64.b64encode(encode_block(self.log.inline)).decode()
        return json.dumps(data, sort_keys=True, indent=1).encode()

    @classmethod
    def parse(cls, body: bytes, *, tenant: str, key: str) -> LockRecord:
        """Parse and check ``lock.json``; anything unexpected is ``LockFileCorruptError``."""

        def corrupt(reason: str) -> LockFileCorruptError:
            return LockFileCorruptError(tenant=tenant, key=key, reason=reason)

        try:
            data = load_json(body)
        except Malformed as exc:
            raise corrupt(exc.reason) from None
        if not isinstance(data, dict):
            raise corrupt("not a JSON object")
        if type(data.get("format")) is not int or data["format"] != LOCK_FORMAT:
            raise corrupt(f"unknown format {_short(data.get('format'))}, expected {LOCK_FORMAT}")
        if data.get("tenant") != tenant:
            raise corrupt(f"it names tenant {_short(data.get('tenant'))}")
        for name in ("owner", "region", "last_owner", "generation", "seq", "ttl_seconds"):
            if name not in data:
                # A missing owner is not a released lease: refuse rather than guess.
                raise corrupt(f"field {name!r} is missing")
        for name in ("owner", "region", "last_owner", "claim"):
            # Shown to operators and compared, never interpreted: printable and short.
            # (claim is absent in locks written before claims existed.)
            value = data.get(name)
            if not isinstance(value, str | None):
                raise corrupt(f"field {name!r} has a wrong type")
            if value is not None and bounded_text(value) is None:
                raise corrupt(f"field {name!r} is not printable or over {MAX_TEXT} characters")
        for name in ("generation", "seq"):
            if type(data[name]) is not int:
                raise corrupt(f"field {name!r} has a wrong type")
            if bounded_int(data[name], 1) is None:
                raise corrupt(f"field {name!r} is not a whole number within 1..{MAX_COUNTER}")
        ttl = data["ttl_seconds"]
        if not (isinstance(ttl, int | float) and not isinstance(ttl, bool)):
            raise corrupt("field 'ttl_seconds' has a wrong type")
        if not 0 < ttl <= _MAX_TTL_SECONDS:
            raise corrupt(f"ttl_seconds must be positive and at most {_MAX_TTL_SECONDS}")
        ttl_seconds = float(ttl)
        # Absent in locks written before release reasons existed: nothing said.
        released = data.get("released")
        if released is not None and released not in get_args(ReleaseReason):
            raise corrupt(f"field 'released' is {_short(released)}, not a known reason")
        if released is not None and data["owner"] is not None:
            raise corrupt("field 'released' is set on a held lease")
        snapshot = data.get("snapshot")
        ref: SnapshotRef | None = None
        if snapshot is not None:
            ref = _snapshot_ref(snapshot)
            if ref is None:
                raise corrupt("field 'snapshot' is malformed")
            # Only one plain name below the tenant's snapshots/ prefix: a key that climbs
            # out of it ("../") must never be downloaded as this tenant's data.
            name = ref.key.removeprefix(key.rsplit("/", 1)[0] + "/snapshots/")
            if name == ref.key or name in ("", ".", "..") or "/" in name:
                raise corrupt("snapshot key is outside the tenant's prefix")
        schema: SchemaVersion | None = None
        if data.get("schema") is not None:
            schema = _schema_version(data["schema"])
            if schema is None:
                raise corrupt("field 'schema' is malformed")
        log: LogPointer | None = None
        if data.get("log") is not None:
            log = _log_pointer(data["log"], generation=data["generation"])
            if log is None:
                raise corrupt("field 'log' is malformed")
        return cls(
            tenant=tenant,
            owner=data["owner"],
            region=data["region"],
            generation=data["generation"],
            seq=data["seq"],
            ttl_seconds=ttl_seconds,
            snapshot=ref,
            log=log,
            last_owner=data["last_owner"],
            claim=data.get("claim"),
            released=released,
            schema=schema,
        )


def _short(value: object, limit: int = 60) -> str:
    """A bounded repr of a value read from lock.json, for error messages."""
    text = reprlib.repr(value)  # bounded nesting, so no deep recursion either
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _snapshot_ref(snapshot: object) -> SnapshotRef | None:
    """The snapshot reference tenantdb wrote (key, sha256 hex, size, time), else None."""
    if not isinstance(snapshot, dict):
        return None
    ref_key, sha256 = bounded_text(snapshot.get("key")), snapshot.get("sha256")
    size, published_at = bounded_int(snapshot.get("size"), 0), snapshot.get("published_at")
    if not (
        ref_key is not None
        and isinstance(sha256, str)
        and _SHA256.fullmatch(sha256)
        and size is not None
        and isinstance(published_at, str)
        and parse_iso_time(published_at) is not None
    ):
        return None
    return SnapshotRef(key=ref_key, sha256=sha256, size=size, published_at=published_at)


# Log states and schema hashes: 64 bits of a hash, as hex.
_HEX16 = re.compile(r"[0-9a-f]{16}")


def _schema_version(value: object) -> SchemaVersion | None:
    """The schema tenantdb wrote (a count of migrations and 16 hex digits), else None."""
    if not isinstance(value, dict) or len(value) != 2:
        return None
    version, digest = bounded_int(value.get("version"), 0), value.get("hash")
    if version is None or not (isinstance(digest, str) and _HEX16.fullmatch(digest)):
        return None
    return SchemaVersion(version, digest)


# SQLite page numbers are 32-bit (checksum.MAX_PAGE_NUMBER).
_MAX_DB_PAGES = 0xFFFFFFFF
# A takeover adds a run; a snapshot clears them. More than this is not a lock tenantdb wrote.
MAX_RUNS = 1000


def _int_at_least(value: object, minimum: int) -> int | None:
    """``value`` if it is an int (not a bool) within ``minimum..MAX_COUNTER``, else None."""
    return bounded_int(value, minimum)


def _log_pointer(value: object, *, generation: int) -> LogPointer | None:
    """The log pointer tenantdb wrote, else None."""
    if not isinstance(value, dict):
        return None
    base = _int_at_least(value.get("base"), 1)
    tail = _int_at_least(value.get("tail"), (base or 1) - 1)
    db_pages = bounded_int(value.get("db_pages"), 0, _MAX_DB_PAGES)
    state, runs, updated_at = value.get("state"), value.get("runs"), value.get("updated_at")
    merged = _merged_ranges(value.get("merged", []), base=base, tail=tail, generation=generation)
    if (
        base is None
        or tail is None
        or db_pages is None
        or not (isinstance(state, str) and _HEX16.fullmatch(state))
        or not (isinstance(runs, list) and len(runs) <= MAX_RUNS)
        or not isinstance(updated_at, str)
        or (updated_at != "" and parse_iso_time(updated_at) is None)
        or merged is None
    ):
        return None
    first_single = merged[-1][1] + 1 if merged else base
    if tail - first_single + 1 > MAX_LOG_SINGLES:
        return None
    pairs: list[tuple[int, int]] = []
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2):
            return None
        run_generation = _int_at_least(run[0], 1)
        first = _int_at_least(run[1], first_single)
        if run_generation is None or first is None or run_generation > generation or first > tail:
            return None
        if pairs and (run_generation <= pairs[-1][0] or first <= pairs[-1][1]):
            return None
        pairs.append((run_generation, first))
    if tail >= first_single and (not pairs or pairs[0][1] != first_single):
        return None  # every single segment must belong to a run
    inline = _carried_segments(value, tail - first_single + 1)
    if inline is None:
        return None
    pointer = LogPointer(base, tail, state, db_pages, tuple(pairs), updated_at, merged, inline)
    # Absent in locks written before packs existed: every single segment is its own object.
    packs = _pack_ranges(value.get("packs", []), pointer)
    return None if packs is None else replace(pointer, packs=packs)


def _pack_ranges(value: object, log: LogPointer) -> tuple[tuple[int, int, int], ...] | None:
    """``(first, last, generation)`` packs of ``log``'s single segments, else None.

    Ascending and apart, each of 1 to MAX_INLINE_SEGMENTS segments of the one generation
    that wrote them (per ``runs``), ending among the single segments and before the inline
    ones (a pack may start inside a merged range: a merge that took part of it).
    """
    if not isinstance(value, list) or len(value) > MAX_RUNS:
        return None
    packs: list[tuple[int, int, int]] = []
    after = log.base - 1
    for item in value:
        if not (isinstance(item, list) and len(item) == 3):
            return None
        first, last, writer = (_int_at_least(v, 1) for v in item)
        if first is None or last is None or writer is None:
            return None
        if not (after < first <= last < log.inline_from and last >= log.first_single):
            return None
        if last - first + 1 > MAX_INLINE_SEGMENTS:
            return None
        if {log.generation_of(max(first, log.first_single)), log.generation_of(last)} != {writer}:
            return None
        packs.append((first, last, writer))
        after = last
    return tuple(packs)


def _carried_segments(pointer: dict[str, object], singles: int) -> tuple[bytes, ...] | None:
    """The segments the log carries, at most ``singles`` of them, else None: from its
    ``carried`` block, or (written before blocks) its ``inline`` list of base64 segments,
    at most BLOCK_MAX_BYTES in all; never both."""
    if "carried" in pointer:
        block = _base64(pointer["carried"])
        if "inline" in pointer or block is None:
            return None
        return decode_block(block, max_count=singles)
    value = pointer.get("inline", [])
    if not isinstance(value, list) or len(value) > min(singles, MAX_INLINE_SEGMENTS):
        return None
    bodies = []
    for item in value:
        if (body := _base64(item)) is None:
            return None
        bodies.append(body)
    return tuple(bodies) if sum(map(len, bodies)) <= BLOCK_MAX_BYTES else None


def _base64(value: object) -> bytes | None:
    """The bytes of base64 text of at most BLOCK_MAX_BYTES, else None."""
    # Checked for size before decoding: base64 is 4 characters per 3 bytes.
    if not isinstance(value, str) or len(value) > BLOCK_MAX_BYTES * 4 // 3 + 4:
        return None
    try:
        # Not ASCII raises a plain ValueError, bad base64 binascii.Error (a ValueError).
        return base64.b64decode(value, validate=True)
    except ValueError:
        return None


def _merged_ranges(
    value: object, *, base: int | None, tail: int | None, generation: int
) -> tuple[tuple[int, int, int], ...] | None:
    """``(first, last, generation)`` ranges, contiguous from ``base`` within the log, else None."""
    if base is None or tail is None or not isinstance(value, list) or len(value) > MAX_RUNS:
        return None
    ranges: list[tuple[int, int, int]] = []
    expected = base
    for item in value:
        if not (isinstance(item, list) and len(item) == 3):
            return None
        first, last = _int_at_least(item[0], expected), _int_at_least(item[1], expected)
        writer = _int_at_least(item[2], 1)
        if first != expected or last is None or last > tail or writer is None:
            return None
        if writer > generation:
            return None
        ranges.append((first, last, writer))
        expected = last + 1
    return tuple(ranges)


def now_ms() -> int:
    """The current Unix time in milliseconds, rounded up: never before this moment.

    A segment's or snapshot's time must not precede the commits it holds, or a
    point-in-time restore to just before a commit could include it.
    """
    return math.ceil(clock.wall() * 1000)


def now_iso() -> str:
    """The current UTC time as ISO 8601, for ``published_at``."""
    return clock.now().isoformat(timespec="seconds")
