"""Packs parsed from anything: whole segments back byte for byte, or an error naming the key."""

from __future__ import annotations

import hashlib
import random
import struct
import zlib

import pytest

from tenantdb.errors import ReplicationError
from tenantdb.protocol.carried import CARRIED_MAX_BYTES, MAX_INLINE_SEGMENTS
from tenantdb.replication.packs import (
    decode_pack,
    encode_pack,
    pack_key,
    pack_max_bytes,
)
from tenantdb.replication.segment import parse_chunk_key

KEY = pack_key("tenants/", "acme", 3, 7, 9)
BODIES = [b"segment seven", b"segment eight, a little longer", b"9"]


def refused(data: bytes, *, tenant: str = "acme", first: int = 7, last: int = 9) -> str:
    with pytest.raises(ReplicationError) as info:
        decode_pack(data, key=KEY, tenant=tenant, first=first, last=last)
    assert info.value.key == KEY
    assert KEY in str(info.value)
    return str(info.value)


def resealed(body: bytes) -> bytes:
    """``body`` (without its trailer) with a trailer that matches: damage a hash can't see."""
    return body + hashlib.sha256(body).digest()


def pack_with(flags: int, after_name: bytes, *, count: int = 3) -> bytes:
    """A pack of segments 7.. of acme with ``after_name`` (its table and segments, as
    ``flags`` say they are stored) and a matching trailer."""
    return resealed(
        struct.pack(">8sHHQIH", b"TDBPACK\n", 1, flags, 7, count, 4) + b"acme" + after_name
    )


def table_and_segments(bodies: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(b)) for b in bodies) + b"".join(bodies)


def test_a_pack_gives_back_its_segments_byte_for_byte_and_its_key_names_its_range() -> None:
    data = encode_pack("acme", 7, BODIES)
    assert decode_pack(data, key=KEY, tenant="acme", first=7, last=9) == BODIES
    assert KEY == "tenants/acme/log/00000003/000000000007-000000000009.pack"
    chunk = parse_chunk_key(KEY)
    assert chunk is not None
    assert (chunk.first, chunk.last, chunk.generation, chunk.pack) == (7, 9, 3, (7, 9))
    assert encode_pack("acme", 7, BODIES) == data  # the same range, the same bytes


def test_a_truncated_or_extended_pack_is_refused() -> None:
    data = encode_pack("acme", 7, BODIES)
    for damaged in (data[:-1], data[:20], data + b"\0", b""):
        refused(damaged)


def test_a_damaged_byte_is_refused() -> None:
    data = bytearray(encode_pack("acme", 7, BODIES))
    data[len(data) // 2] ^= 0x01
    assert "sha256" in refused(bytes(data))


def test_a_pack_written_before_compression_is_still_read() -> None:
    legacy = pack_with(0, table_and_segments(BODIES))
    assert decode_pack(legacy, key=KEY, tenant="acme", first=7, last=9) == BODIES


def test_a_pack_compresses_its_segments_as_one_stream() -> None:
    similar = [b"page image %d " % i + b"\x01" * 4000 for i in range(3)]
    data = encode_pack("acme", 7, similar)
    assert len(data) < len(similar[0])
    assert decode_pack(data, key=KEY, tenant="acme", first=7, last=9) == similar


def test_a_length_field_past_the_body_is_refused_even_with_a_matching_trailer() -> None:
    forged = bytearray(table_and_segments(BODIES))
    forged[:4] = struct.pack(">I", 2**32 - 1)
    assert "lengths" in refused(pack_with(0, bytes(forged)))
    assert "lengths" in refused(pack_with(1, zlib.compress(bytes(forged))))


def test_a_damaged_or_oversized_compressed_area_is_refused_with_a_matching_trailer() -> None:
    stream = zlib.compress(table_and_segments(BODIES))
    for damaged in (stream[:-3], stream + b"more", b"not zlib at all", b""):
        assert "compressed" in refused(pack_with(1, damaged))
    # Small enough to pass the size bound, inflating past what 3 segments may hold.
    bomb = zlib.compress(
        struct.pack(">III", 1, 1, CARRIED_MAX_BYTES) + bytes(CARRIED_MAX_BYTES + 6), 9
    )
    assert len(bomb) < pack_max_bytes("acme", 3)
    assert "compressed" in refused(pack_with(1, bomb))


def test_another_tenants_or_another_ranges_pack_is_refused() -> None:
    data = encode_pack("acme", 7, BODIES)
    assert "tenant" in refused(data, tenant="other")
    assert "7..9" in refused(data, first=8, last=10)
    assert "7..9" in refused(encode_pack("acme", 7, BODIES[:2]), first=7, last=9)


def test_a_pack_larger_than_its_segments_may_weigh_is_refused_unread() -> None:
    too_big = b"\0" * (pack_max_bytes("acme", 3) + 1)
    assert "more than a pack" in refused(too_big)
    assert "count" in refused(b"", first=1, last=MAX_INLINE_SEGMENTS + 1)


def test_a_writer_never_makes_a_pack_readers_refuse() -> None:
    with pytest.raises(ReplicationError):
        encode_pack("acme", 1, [b"x" * (CARRIED_MAX_BYTES + 1)])
    with pytest.raises(ReplicationError):
        encode_pack("acme", 1, [])
    big = [random.randbytes(CARRIED_MAX_BYTES // 2)] * 2
    data = encode_pack("acme", 1, big)
    assert decode_pack(data, key=KEY, tenant="acme", first=1, last=2) == big


def test_unknown_versions_and_flags_are_refused() -> None:
    data = encode_pack("acme", 7, BODIES)[:-32]
    assert "version" in refused(resealed(data[:8] + b"\0\2" + data[10:]))
    assert "flags" in refused(resealed(data[:10] + b"\0\2" + data[12:]))
    assert "not a pack" in refused(resealed(b"TDBSEG\r\n" + data[8:]))
