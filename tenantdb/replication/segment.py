"""Segments: the immutable objects of a tenant's incremental log, and their binary format.

A segment holds the newest image of every page changed by the commits since the previous
segment, plus what a replica needs to apply it safely: the database size after its last
commit, and the state checksums (see ``checksum``) of the database it applies to and of
the one it produces. The format is specified byte by byte in ``docs/format.md``; this
module is its only reader and writer, and ``decode_segment`` trusts nothing it reads.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tenantdb.errors import ReplicationError
from tenantdb.parsing import MAX_COUNTER, MAX_TIME_MS
from tenantdb.protocol.carried import MAX_INLINE_SEGMENTS
from tenantdb.protocol.lockfile import LogChunk
from tenantdb.replication.checksum import MAX_PAGE_NUMBER, check_page_size
from tenantdb.replication.packs import pack_key

__all__ = [
    "chunk_key",
    "FLAG_COMPRESSED",
    "SEGMENT_MAGIC",
    "SEGMENT_MAX_BYTES",
    "SEGMENT_VERSION",
    "Segment",
    "SegmentHeader",
    "decode_segment",
    "encode_segment",
    "parse_chunk_key",
    "segment_key",
]

SEGMENT_MAGIC = b"TDBSEG\r\n"
SEGMENT_VERSION = 1
# The largest segment object: readers refuse a larger one unread (restores fetch a few ahead,
# each held whole), so writers publish a snapshot instead of a segment whose page area
# could exceed it.
SEGMENT_MAX_BYTES = 32 << 20
FLAG_COMPRESSED = 0x0001
_KNOWN_FLAGS = FLAG_COMPRESSED
# zlib level 1: on SQLite pages, 92% of the ratio of level 6 at 1.6-1.9 times its speed.
_ZLIB_LEVEL = 1

# magic, version, flags, generation, index, page_size, db_pages, timestamp_ms, prev_state,
# state, commits, page_count, tenant length; then the tenant, the page area, the trailer.
_HEADER = struct.Struct(">8sHHQQIIQQQIIH")
_TRAILER_SIZE = hashlib.sha256().digest_size
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
# Compressed bytes handed to the inflater at a time.
_FEED_BYTES = 64 * 1024


@dataclass(frozen=True)
class SegmentHeader:
    """What a segment says about itself: whose it is, where it goes, what it changes."""

    tenant: str
    generation: int
    # The segment's position in the tenant's log: 1, 2, 3, ... across generations.
    index: int
    page_size: int
    # The database size in pages after the last commit the segment holds.
    db_pages: int
    # Unix time in milliseconds of the last commit the segment holds (when it was read).
    timestamp_ms: int
    # checksum.state of the database the segment applies to.
    prev_state: int
    # checksum.state of the database the segment produces.
    state: int
    commits: int


@dataclass(frozen=True)
class Segment:
    """A header and the newest image of each page it changes, sorted by page number."""

    header: SegmentHeader
    pages: tuple[tuple[int, bytes], ...]


def segment_key(prefix: str, tenant: str, generation: int, index: int) -> str:
    """Return the bucket key of segment ``index`` written by ``generation`` of ``tenant``."""
    # Unique without a random part: only the holder of a generation writes under it, and it
    # uses each index once; the fixed widths make the keys list in log order.
    if generation < 1 or index < 1:
        raise ValueError(f"generation {generation} and index {index} must both be at least 1")
    return f"{prefix}{tenant}/log/{generation:08d}/{index:012d}.seg"


def chunk_key(prefix: str, tenant: str, chunk: LogChunk) -> str:
    """The key of the object holding a log chunk: a single segment's, the pack holding it
    (``<first>-<last>.pack``), or ``<first>-<last>.seg`` if merged."""
    if chunk.pack is not None:
        return pack_key(prefix, tenant, chunk.generation, *chunk.pack)
    if not chunk.merged:
        return segment_key(prefix, tenant, chunk.generation, chunk.first)
    # A generation merges a range once (a retry sends the same bytes): unique as well.
    single = segment_key(prefix, tenant, chunk.generation, chunk.last)
    return (
        single.removesuffix(f"{chunk.last:012d}.seg") + f"{chunk.first:012d}-{chunk.last:012d}.seg"
    )


_CHUNK_NAME = re.compile(r"log/(\d{8,})/(?:(\d{12,})-)?(\d{12,})\.(seg|pack)")


def parse_chunk_key(key: str) -> LogChunk | None:
    """The log chunk a bucket key names (see ``chunk_key``), or None for any other key.

    A pack's chunk spans the whole pack (``first..last``, with ``pack`` set).
    """
    match = _CHUNK_NAME.search(key)
    # A number longer than MAX_COUNTER's 16 digits is not one tenantdb wrote.
    if match is None or match.end() != len(key) or any(len(n) > 16 for n in match.groups("")):
        return None
    generation, last = int(match[1]), int(match[3])
    first = last if match[2] is None else int(match[2])
    if not 1 <= generation <= MAX_COUNTER or not 1 <= first <= last <= MAX_COUNTER:
        return None
    if match[4] == "pack":
        if match[2] is None or last - first + 1 > MAX_INLINE_SEGMENTS:
            return None  # not a pack tenantdb wrote
        return LogChunk(first, last, generation, merged=False, pack=(first, last))
    return LogChunk(first, last, generation, merged=match[2] is not None)


def encode_segment(segment: Segment, *, compress: bool = True) -> bytes:
    """Return the bytes of ``segment``; ``ReplicationError`` if it breaks the format's rules."""
    h = segment.header

    def refuse(reason: str) -> ReplicationError:
        return ReplicationError(
            f"cannot encode segment {h.index} of tenant {h.tenant!r} "
            f"(generation {h.generation}): {reason}"
        )

    try:
        tenant = h.tenant.encode("utf-8")
    except UnicodeEncodeError:
        raise refuse("the tenant name cannot be encoded as UTF-8") from None
    if reason := _header_problem(h, tenant) or _pages_problem(segment.pages, h):
        raise refuse(reason)
    parts = [
        _HEADER.pack(
            SEGMENT_MAGIC,
            SEGMENT_VERSION,
            FLAG_COMPRESSED if compress else 0,
            h.generation,
            h.index,
            h.page_size,
            h.db_pages,
            h.timestamp_ms,
            h.prev_state,
            h.state,
            h.commits,
            len(segment.pages),
            len(tenant),
        ),
        tenant,
    ]
    if compress:
        # Page by page into the compressor: no uncompressed copy of the whole area.
        deflate = zlib.compressobj(_ZLIB_LEVEL)
        for pgno, data in segment.pages:
            parts.append(deflate.compress(pgno.to_bytes(4, "big")))
            parts.append(deflate.compress(data))
        parts.append(deflate.flush())
    else:
        for pgno, data in segment.pages:
            parts.append(pgno.to_bytes(4, "big"))
            parts.append(data)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    parts.append(digest.digest())
    return b"".join(parts)


def decode_segment(data: bytes, *, key: str) -> Segment:
    """Parse and verify the segment ``data`` read from ``key``; ``ReplicationError`` if unusable."""

    def refuse(reason: str) -> ReplicationError:
        return ReplicationError(f"segment {key} is unusable: {reason}", key=key)

    if len(data) < _HEADER.size + _TRAILER_SIZE:
        raise refuse(f"truncated: {len(data)} bytes is shorter than any segment")
    if data[:8] != SEGMENT_MAGIC:
        raise refuse(f"not a segment: it starts with {bytes(data[:8])!r}, not {SEGMENT_MAGIC!r}")
    # The magic and the version stay where they are in every version; the rest of the layout,
    # the trailer included, is only known once the version is.
    version = int.from_bytes(data[8:10], "big")
    if version != SEGMENT_VERSION:
        raise refuse(f"format version {version}; this reader knows only {SEGMENT_VERSION}")
    view = memoryview(data)
    body = view[:-_TRAILER_SIZE]
    if hashlib.sha256(body).digest() != data[-_TRAILER_SIZE:]:
        raise refuse(
            f"its sha256 trailer does not match its {len(data)} bytes "
            "(damaged, truncated or over-long)"
        )
    (
        _magic,
        _version,
        flags,
        generation,
        index,
        page_size,
        db_pages,
        timestamp_ms,
        prev_state,
        state,
        commits,
        page_count,
        tenant_length,
    ) = _HEADER.unpack_from(data)
    if flags & ~_KNOWN_FLAGS:
        raise refuse(f"unknown flag bits {flags & ~_KNOWN_FLAGS:#06x}")
    if reason := check_page_size(page_size):
        raise refuse(reason)
    if generation < 1 or index < 1:
        raise refuse(f"generation {generation} and index {index} must both be at least 1")
    if timestamp_ms > MAX_TIME_MS:
        raise refuse(f"its time {timestamp_ms} ms is past the year 9000")
    # Pages are distinct and within 1..db_pages: this bounds page_count before any use of it.
    if page_count > db_pages:
        raise refuse(f"{page_count} pages cannot be distinct pages of a {db_pages}-page database")
    tenant_end = _HEADER.size + tenant_length
    if tenant_end > len(body):
        raise refuse(f"truncated: the {tenant_length}-byte tenant name runs past the end")
    try:
        tenant = str(body[_HEADER.size : tenant_end], "utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"the tenant name is not valid UTF-8 ({exc.reason})") from None
    area = body[tenant_end:]
    records: Iterator[bytes | memoryview]
    record = 4 + page_size
    if flags & FLAG_COMPRESSED:
        records = _inflated_records(area, page_size, page_count, refuse)
    else:
        if len(area) != page_count * record:
            what = "truncated" if len(area) < page_count * record else "over-long"
            raise refuse(
                f"{what}: the page area is {len(area)} bytes, {page_count} pages of "
                f"{page_size} bytes take {page_count * record}"
            )
        records = (area[i : i + record] for i in range(0, page_count * record, record))
    pages: list[tuple[int, bytes]] = []
    previous = 0
    # Each page number is checked as its record arrives: a stream of nonsense stops at
    # its first record, whatever page_count claims.
    for item in records:
        pgno = int.from_bytes(item[:4], "big")
        if not previous < pgno <= db_pages:
            raise refuse(
                f"page number {pgno} after {previous} is not increasing within 1..{db_pages}"
            )
        pages.append((pgno, bytes(item[4:])))
        previous = pgno
    header = SegmentHeader(
        tenant=tenant,
        generation=generation,
        index=index,
        page_size=page_size,
        db_pages=db_pages,
        timestamp_ms=timestamp_ms,
        prev_state=prev_state,
        state=state,
        commits=commits,
    )
    return Segment(header=header, pages=tuple(pages))


def _inflated_records(
    area: memoryview, page_size: int, count: int, refuse: Callable[[str], ReplicationError]
) -> Iterator[bytes]:
    """Inflate a page area record by record: ``count`` records of 4 + ``page_size`` bytes.

    The input is fed ``_FEED_BYTES`` at a time and the output asked for one record at a
    time, so the inflater holds at most one record and one feed, whatever the header or
    the stream claim (a zip bomb stops at its first bad record or after ``count``).
    """
    record = 4 + page_size
    expected = count * record
    inflate = zlib.decompressobj()
    offset = 0
    pending: bytes | memoryview = b""
    buffer = bytearray()
    try:
        for produced in range(0, expected, record):
            while len(buffer) < record:
                # Past the stream's end the inflater takes input and gives nothing.
                if inflate.eof or (not pending and offset >= len(area)):
                    raise refuse(
                        f"truncated: the page area inflates to {produced + len(buffer)} "
                        f"bytes, {count} pages of {page_size} bytes take {expected}"
                    )
                if not pending:
                    pending = area[offset : offset + _FEED_BYTES]
                    offset += _FEED_BYTES
                buffer += inflate.decompress(pending, record - len(buffer))
                pending = inflate.unconsumed_tail
            yield bytes(buffer)
            buffer.clear()
        # After the last record the stream must end without producing one byte more.
        if not inflate.eof:
            rest, offset = bytes(pending) + bytes(area[offset:]), len(area)
            if inflate.decompress(rest, 1):
                raise refuse(
                    f"the page area inflates to more than the {expected} bytes its pages take"
                )
    except zlib.error as exc:
        raise refuse(f"the compressed page area is damaged: {exc}") from None
    if not inflate.eof:
        raise refuse("truncated: the compressed page area ends before its zlib stream does")
    # Past the end of the stream: what the inflater set aside, and what it was never fed.
    if extra := len(inflate.unused_data) + (len(area) - offset if offset < len(area) else 0):
        raise refuse(f"over-long: {extra} bytes follow the zlib stream")


def _header_problem(h: SegmentHeader, tenant: bytes) -> str | None:
    """Why the encoder must not write header ``h`` (tenant encoded as ``tenant``), or None."""
    if len(tenant) > _U16:
        return f"the tenant name is {len(tenant)} bytes, over {_U16}"
    if reason := check_page_size(h.page_size):
        return reason
    if not (1 <= h.generation <= _U64 and 1 <= h.index <= _U64):
        return f"generation {h.generation} and index {h.index} must be within 1..{_U64}"
    if not 0 <= h.db_pages <= MAX_PAGE_NUMBER:
        return f"database size {h.db_pages} pages is outside 0..{MAX_PAGE_NUMBER}"
    for name, value, top in (
        ("timestamp_ms", h.timestamp_ms, MAX_TIME_MS),
        ("prev_state", h.prev_state, _U64),
        ("state", h.state, _U64),
        ("commits", h.commits, _U32),
    ):
        if not 0 <= value <= top:
            return f"{name} {value} is outside 0..{top}"
    return None


def _pages_problem(pages: tuple[tuple[int, bytes], ...], h: SegmentHeader) -> str | None:
    """Why the encoder must not write ``pages`` under header ``h``, or None."""
    previous = 0
    for pgno, data in pages:
        if not previous < pgno <= h.db_pages:
            return f"page number {pgno} after {previous} is not increasing within 1..{h.db_pages}"
        if len(data) != h.page_size:
            return f"page {pgno} is {len(data)} bytes, not the page size {h.page_size}"
        previous = pgno
    return None
