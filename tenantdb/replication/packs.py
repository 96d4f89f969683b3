"""Packs: one log object holding several whole segments, byte for byte.

A small segment rides inline in ``lock.json`` until the holder writes it to the bucket,
and it writes carried segments in batches: one pack per ``PACK_SEGMENTS`` segments or
about ``INLINE_MAX_BYTES`` of them (the inline cap: a pack only ever holds segments
lock.json carried). Unlike a merged segment, a pack keeps every segment as it was, with its
own boundary and header time, so a point-in-time restore keeps one-segment precision. The
format is in ``docs/format.md``; this module is its only reader and writer, and
``decode_pack`` trusts nothing it reads.
"""

from __future__ import annotations

import hashlib
import struct

from tenantdb.errors import ReplicationError
from tenantdb.protocol.lockfile import INLINE_MAX_BYTES, MAX_INLINE_SEGMENTS

__all__ = [
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


def pack_max_bytes(tenant: str, count: int) -> int:
    """The largest pack of ``count`` segments of ``tenant`` a reader accepts."""
    return _HEADER.size + len(tenant.encode()) + count * _LENGTH.size + INLINE_MAX_BYTES + 32


def encode_pack(tenant: str, first: int, bodies: list[bytes]) -> bytes:
    """The pack of the segments ``bodies``, the first of them segment ``first``."""
    name = tenant.encode()
    if not 1 <= len(bodies) <= MAX_INLINE_SEGMENTS or sum(map(len, bodies)) > INLINE_MAX_BYTES:
        raise ReplicationError(
            f"cannot pack {len(bodies)} segments of {sum(map(len, bodies))} bytes: a pack holds "
            f"1 to {MAX_INLINE_SEGMENTS} segments of at most {INLINE_MAX_BYTES} bytes in all"
        )
    parts = [_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0, first, len(bodies), len(name)), name]
    parts += [_LENGTH.pack(len(body)) for body in bodies]
    parts += bodies
    body = b"".join(parts)
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
    if flags != 0:
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
    lengths_end = offset + count * _LENGTH.size
    if lengths_end > len(body):
        raise refuse("truncated inside its table of lengths")
    lengths = [_LENGTH.unpack_from(body, offset + i * _LENGTH.size)[0] for i in range(count)]
    if 0 in lengths or lengths_end + sum(lengths) != len(body):
        raise refuse(
            f"its lengths add up to {sum(lengths)} bytes, its body holds {len(body) - lengths_end}"
        )
    segments: list[bytes] = []
    offset = lengths_end
    for length in lengths:
        segments.append(bytes(body[offset : offset + length]))
        offset += length
    return segments
