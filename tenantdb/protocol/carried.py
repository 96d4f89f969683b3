"""The carried block: the segments lock.json carries, compressed together as one stream.

Consecutive small segments mostly hold new images of the same few pages, so compressing
them as one stream (each stored uncompressed, see ``next_segment``) takes about a third of
what compressing each on its own does: lock.json, sent whole with every CAS, is the main
cost of a steady trickle of writes. The block is a zlib stream of, per segment, a 4-byte
big-endian length and the segment's bytes (docs/format.md, "The carried block"); packs
use the same bounded inflation (``inflate_bounded``).

``decode_block`` trusts nothing: a typed refusal (``None``) for anything but exactly the
frames the bounds allow, and never more than ``CARRIED_MAX_BYTES`` inflated.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence

__all__ = [
    "BLOCK_MAX_BYTES",
    "CARRIED_MAX_BYTES",
    "MAX_INLINE_SEGMENTS",
    "decode_block",
    "encode_block",
    "inflate_bounded",
]

# The most a carried block may weigh compressed: lock.json (at most LOCK_MAX_BYTES) holds
# it in base64, a third larger, beside the lease fields.
BLOCK_MAX_BYTES = 24 * 1024
# The most segment bytes lock.json carries (as encoded, so inflated), and so the most a
# pack holds: it bounds the memory a reader spends on a block before looking at it.
CARRIED_MAX_BYTES = 256 * 1024
# The most segments lock.json carries (each is at least ~100 bytes), and so the most a pack
# holds (a pack only ever holds segments lock.json carried).
MAX_INLINE_SEGMENTS = 256

_LENGTH = struct.Struct(">I")
# The most a block inflates to: every segment's length and the segments.
_INFLATED_MAX = MAX_INLINE_SEGMENTS * _LENGTH.size + CARRIED_MAX_BYTES
# zlib's default: on a block of similar pages, level 1 leaves about a quarter more, and
# level 6 costs a fraction of a millisecond per CAS.
_LEVEL = 6


def encode_block(bodies: Sequence[bytes]) -> bytes:
    """The carried block of ``bodies``, oldest first."""
    return _encode_block(tuple(bodies))


# A holder sizes a CAS's block before sending it (``carrier``), then writes that very
# block: made once. (Bytes objects keep their hash: a hit costs a comparison.)
@functools.lru_cache(maxsize=4)
def _encode_block(bodies: tuple[bytes, ...]) -> bytes:
    deflate = zlib.compressobj(_LEVEL)
    parts = []
    for body in bodies:
        parts.append(deflate.compress(_LENGTH.pack(len(body))))
        parts.append(deflate.compress(body))
    parts.append(deflate.flush())
    return b"".join(parts)


def inflate_bounded(data: bytes, limit: int) -> bytes | None:
    """The one whole zlib stream ``data`` inflated, if it is that and at most ``limit``
    bytes inflated; else None (damaged, truncated, followed by more, or too large)."""
    inflate = zlib.decompressobj()
    try:
        out = inflate.decompress(data, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or not inflate.eof or inflate.unused_data or inflate.unconsumed_tail:
        return None
    return out


def decode_block(block: bytes, *, max_count: int) -> tuple[bytes, ...] | None:
    """The segments' bytes in ``block``: 1 to ``max_count`` (and MAX_INLINE_SEGMENTS) of
    them, each at least one byte; None if it is anything else."""
    raw = inflate_bounded(block, _INFLATED_MAX)
    if raw is None:
        return None
    bodies: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(bodies) == min(max_count, MAX_INLINE_SEGMENTS) or offset + 4 > len(raw):
            return None
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if length == 0 or offset + length > len(raw):
            return None
        bodies.append(raw[offset : offset + length])
        offset += length
    if not bodies or sum(map(len, bodies)) > CARRIED_MAX_BYTES:
        return None
    return tuple(bodies)
