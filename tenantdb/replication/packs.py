"""Packs: one log object holding several whole segments, byte for byte.

A small segment rides inline in ``lock.json`` until the holder writes it to the bucket,
and it writes carried segments in batches: one pack per ``PACK_SEGMENTS`` segments or
about two thirds of lock.json's compressed cap of them (a pack only ever holds segments
lock.json carried). Unlike a merged segment, a pack keeps every segment as it was, with its
own boundary and header time, so a point-in-time restore keeps one-segment precision. Its
table and segments are compressed as one stream, as lock.json's carried block is: small
segments are stored uncompressed, and their neighbours hold the same pages. The
format is in ``docs/format.md``; this module is its only reader and writer, and
``decode_pack`` trusts nothing it reads.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from tenantdb.errors import ReplicationError
from tenantdb.protocol.carried import CARRIED_MAX_BYTES, MAX_INLINE_SEGMENTS, inflate_bounded

__all__ = [
    "FLAG_COMPRESSED",
    "PACK_MAGIC",
    "PACK_SEGMENTS",
    "PACK_VERSION",
    "decode_pack",
    "encode_pack",
    "pack_key",
    "pack_max_bytes",
]

PACK_MAGIC = b"TDBPACK\n"
PACK_VERSION = 1
# A holder starts a pack once this many carried segments wait for one.
PACK_SEGMENTS = 32
# Set: the table of lengths and the segments are one zlib stream (packs written before it
# existed are not compressed).
FLAG_COMPRESSED = 0x0001
# magic, version, flags, first index, segment count, tenant length; then the tenant, one
# 4-byte length per segment, the segments' bytes, and a sha256 trailer of all before it.
_HEADER = struct.Struct(">8sHHQIH")
_LENGTH = struct.Struct(">I")
_TRAILER_SIZE = hashlib.sha256().digest_size


def pack_key(prefix: str, tenant: str, generation: int, first: int, last: int) -> str:
    """The key of the pack of segments ``first..last``, all written by ``generation``.

    Unique without a random part: a pack holds published segments of one generation, which
    never change, so the same range always has the same bytes, whoever writes it.
    """
    if generation < 1 or not 1 <= first <= last:
        raise ValueError(f"no pack {first}..{last} of generation {generation}")
    return f"{prefix}{tenant}/log/{generation:08d}/{first:012d}-{last:012d}.pack"


def _table_and_segments_max(count: int) -> int:
    """The most bytes a pack of ``count`` segments holds after its tenant name, inflated."""
    return count * _LENGTH.size + CARRIED_MAX_BYTES


def pack_max_bytes(tenant: str, count: int) -> int:
    """The largest pack of ``count`` segments of ``tenant`` a reader accepts."""
    n = _table_and_segments_max(count)
    # zlib's compressBound: what deflate can make of n bytes at worst.
    deflated = n + (n >> 12) + (n >> 14) + (n >> 25) + 13
    return _HEADER.size + len(tenant.encode()) + deflated + _TRAILER_SIZE


def encode_pack(tenant: str, first: int, bodies: list[bytes]) -> bytes:
    """The pack of the segments ``bodies``, the first of them segment ``first``."""
    name = tenant.encode()
    if not 1 <= len(bodies) <= MAX_INLINE_SEGMENTS or sum(map(len, bodies)) > CARRIED_MAX_BYTES:
        raise ReplicationError(
            f"cannot pack {len(bodies)} segments of {sum(map(len, bodies))} bytes: a pack holds "
            f"1 to {MAX_INLINE_SEGMENTS} segments of at most {CARRIED_MAX_BYTES} bytes in all"
        )
    header = _HEADER.pack(PACK_MAGIC, PACK_VERSION, FLAG_COMPRESSED, first, len(bodies), len(name))
    table = b"".join(_LENGTH.pack(len(body)) for body in bodies)
    body = header + name + zlib.compress(table + b"".join(bodies))
    return body + hashlib.sha256(body).digest()


def decode_pack(data: bytes, *, key: str, tenant: str, first: int, last: int) -> list[bytes]:
    """The segments' bytes in pack ``data`` read from ``key``, which must hold
    ``first..last`` of ``tenant``; ``ReplicationError`` naming the key if it does not."""

    def refuse(reason: str) -> ReplicationError:
        return ReplicationError(f"pack {key} is unusable: {reason}", key=key)

    count = last - first + 1
    if not 1 <= count <= MAX_INLINE_SEGMENTS:
        raise refuse(f"{count} segments is not a pack's count (1 to {MAX_INLINE_SEGMENTS})")
    if len(data) > pack_max_bytes(tenant, count):
        raise refuse(f"{len(data)} bytes is more than a pack of {count} segments may have")
    if len(data) < _HEADER.size + _TRAILER_SIZE:
        raise refuse(f"truncated: {len(data)} bytes is shorter than any pack")
    if data[:8] != PACK_MAGIC:
        raise refuse(f"not a pack: it starts with {bytes(data[:8])!r}")
    version = int.from_bytes(data[8:10], "big")
    if version != PACK_VERSION:
        raise refuse(f"format version {version}; this reader knows only {PACK_VERSION}")
    body = memoryview(data)[:-_TRAILER_SIZE]
    if hashlib.sha256(body).digest() != data[-_TRAILER_SIZE:]:
        raise refuse(f"its sha256 trailer does not match its {len(data)} bytes")
    _magic, _version, flags, found_first, found_count, name_length = _HEADER.unpack_from(body)
    if flags not in (0, FLAG_COMPRESSED):
        raise refuse(f"unknown flags {flags:#06x}")
    offset = _HEADER.size
    name = bytes(body[offset : offset + name_length])
    if name != tenant.encode():
        raise refuse(f"it names tenant {name[:64]!r}, not {tenant!r}")
    if (found_first, found_count) != (first, count):
        raise refuse(
            f"it holds segments {found_first}..{found_first + found_count - 1}, "
            f"its key says {first}..{last}"
        )
    offset += name_length
    rest = bytes(body[offset:])
    if flags & FLAG_COMPRESSED:
        inflated = inflate_bounded(rest, _table_and_segments_max(count))
        if inflated is None:
            raise refuse("its compressed table and segments are damaged, truncated or too large")
        rest = inflated
    lengths_end = count * _LENGTH.size
    if lengths_end > len(rest):
        raise refuse("truncated inside its table of lengths")
    lengths = [_LENGTH.unpack_from(rest, i * _LENGTH.size)[0] for i in range(count)]
    if 0 in lengths or lengths_end + sum(lengths) != len(rest):
        raise refuse(
            f"its lengths add up to {sum(lengths)} bytes, its body holds {len(rest) - lengths_end}"
        )
    segments: list[bytes] = []
    offset = lengths_end
    for length in lengths:
        segments.append(rest[offset : offset + length])
        offset += length
    return segments
