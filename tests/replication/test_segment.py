"""The segment format: the documented layout, round trips, and every refusal of the decoder."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantdb.errors import ReplicationError
from tenantdb.parsing import MAX_TIME_MS
from tenantdb.replication.segment import (
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    Segment,
    SegmentHeader,
    decode_segment,
    encode_segment,
    parse_chunk_key,
    segment_key,
)

KEY = "tenants/acme/log/00000003/000000000042.seg"
MiB = 1 << 20
HEADER = SegmentHeader(
    tenant="acme",
    generation=3,
    index=42,
    page_size=512,
    db_pages=10,
    timestamp_ms=1_717_171_717_171,
    prev_state=0x0123456789ABCDEF,
    state=0xFEDCBA9876543210,
    commits=7,
)
PAGES = ((1, b"\x01" * 512), (4, bytes(range(256)) * 2), (10, b"\x00" * 512))
SEGMENT = Segment(HEADER, PAGES)


def raw_segment(
    *,
    magic: bytes = SEGMENT_MAGIC,
    version: int = 1,
    flags: int | None = None,
    generation: int = 3,
    index: int = 42,
    page_size: int = 512,
    db_pages: int = 10,
    timestamp_ms: int = 1_717_171_717_171,
    prev_state: int = 0x0123456789ABCDEF,
    state: int = 0xFEDCBA9876543210,
    commits: int = 7,
    pages: tuple[tuple[int, bytes], ...] = PAGES,
    page_count: int | None = None,
    tenant: bytes = b"acme",
    tenant_length: int | None = None,
    compress: bool = False,
    area: bytes | None = None,
    trailer: bytes | None = None,
) -> bytes:
    """A segment assembled straight from docs/format.md, with any field overridden."""
    head = (
        magic
        + struct.pack(">HH", version, (1 if compress else 0) if flags is None else flags)
        + struct.pack(">QQ", generation, index)
        + struct.pack(">II", page_size, db_pages)
        + struct.pack(">QQQ", timestamp_ms, prev_state, state)
        + struct.pack(">II", commits, len(pages) if page_count is None else page_count)
        + struct.pack(">H", len(tenant) if tenant_length is None else tenant_length)
        + tenant
    )
    if area is None:
        area = b"".join(pgno.to_bytes(4, "big") + data for pgno, data in pages)
        if compress:
            area = zlib.compress(area, 1)
    body = head + area
    return body + (hashlib.sha256(body).digest() if trailer is None else trailer)


def refused(data: bytes, match: str | None) -> ReplicationError:
    """Decode ``data``, which must be refused with ``match`` and the key in the message."""
    with pytest.raises(ReplicationError, match=match) as info:
        decode_segment(data, key=KEY)
    assert KEY in str(info.value)
    assert info.value.key == KEY
    return info.value


# --- the layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_encoding_is_the_documented_layout(compress: bool) -> None:
    assert encode_segment(SEGMENT, compress=compress) == raw_segment(compress=compress)


def test_the_fixed_header_is_70_bytes_then_the_tenant() -> None:
    data = encode_segment(SEGMENT, compress=False)
    assert data[:8] == b"TDBSEG\r\n"
    assert data[8:10] == SEGMENT_VERSION.to_bytes(2, "big")
    assert data[68:70] == b"\x00\x04"
    assert data[70:74] == b"acme"
    assert data[74:78] == b"\x00\x00\x00\x01"  # the first page number
    assert len(data) == 70 + 4 + 3 * (4 + 512) + 32


def test_compression_is_on_by_default() -> None:
    data = encode_segment(SEGMENT)
    assert data[10:12] == b"\x00\x01"
    assert len(data) < len(encode_segment(SEGMENT, compress=False))


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(compress: bool) -> None:
    assert decode_segment(encode_segment(SEGMENT, compress=compress), key=KEY) == SEGMENT


@pytest.mark.parametrize("compress", [False, True])
def test_a_segment_without_pages_round_trips(compress: bool) -> None:
    empty = Segment(dataclasses.replace(HEADER, db_pages=0, commits=1), ())
    assert decode_segment(encode_segment(empty, compress=compress), key=KEY) == empty


def test_extreme_field_values_round_trip() -> None:
    header = SegmentHeader(
        tenant="é" * 100,
        generation=2**64 - 1,
        index=2**64 - 1,
        page_size=65536,
        db_pages=2**32 - 1,
        timestamp_ms=MAX_TIME_MS,  # the year 9000: a datetime still
        prev_state=2**64 - 1,
        state=0,
        commits=2**32 - 1,
    )
    segment = Segment(header, ((2**32 - 1, b"\xff" * 65536),))
    for compress in (False, True):
        assert decode_segment(encode_segment(segment, compress=compress), key=KEY) == segment


@st.composite
def segments(draw: st.DrawFn) -> Segment:
    """Random valid segments: any page size, page set and content, compressible or not."""
    page_size = 1 << draw(st.integers(9, 16))
    db_pages = draw(st.integers(0, 2**32 - 1))
    limit = min(db_pages, 1000)
    numbers = draw(st.sets(st.integers(1, max(limit, 1)), max_size=min(limit, 6)))
    if db_pages > 1000:  # pages near the top of the database too
        numbers |= draw(st.sets(st.integers(db_pages - 5, db_pages), max_size=2))
    pages = []
    for pgno in sorted(numbers):
        seed = draw(st.integers(0, 2**32))
        if draw(st.booleans()):
            data = random.Random(seed).randbytes(page_size)
        else:
            data = (seed.to_bytes(5, "big") * (page_size // 5 + 1))[:page_size]
        pages.append((pgno, data))
    header = SegmentHeader(
        tenant=draw(st.text(max_size=63)),
        generation=draw(st.integers(1, 2**64 - 1)),
        index=draw(st.integers(1, 2**64 - 1)),
        page_size=page_size,
        db_pages=db_pages,
        timestamp_ms=draw(st.integers(0, MAX_TIME_MS)),
        prev_state=draw(st.integers(0, 2**64 - 1)),
        state=draw(st.integers(0, 2**64 - 1)),
        commits=draw(st.integers(0, 2**32 - 1)),
    )
    return Segment(header, tuple(pages))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments(), st.booleans())
def test_any_segment_round_trips(segment: Segment, compress: bool) -> None:
    assert decode_segment(encode_segment(segment, compress=compress), key=KEY) == segment


# --- damage anywhere is refused --------------------------------------------------------------

ENCODED = {c: encode_segment(SEGMENT, compress=c) for c in (False, True)}


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.data())
def test_a_changed_byte_anywhere_is_refused(compress: bool, data: st.DataObject) -> None:
    encoded = bytearray(ENCODED[compress])
    position = data.draw(st.integers(0, len(encoded) - 1), label="position")
    encoded[position] ^= data.draw(st.integers(1, 255), label="xor")
    refused(bytes(encoded), None)


@pytest.mark.parametrize("compress", [False, True])
def test_every_truncation_and_extension_is_refused(compress: bool) -> None:
    encoded = ENCODED[compress]
    for length in range(len(encoded)):
        refused(encoded[:length], None)
    refused(encoded + b"\x00", "sha256 trailer does not match")


def test_a_wrong_trailer_is_refused() -> None:
    refused(raw_segment(trailer=b"\x00" * 32), "sha256 trailer does not match")


# --- each rule, with a valid trailer ---------------------------------------------------------


def test_wrong_magic() -> None:
    refused(raw_segment(magic=b"SQLite f"), "not a segment")


def test_too_short_to_be_a_segment() -> None:
    refused(b"", "truncated: 0 bytes")
    refused(SEGMENT_MAGIC, "truncated")


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_unknown_version(version: int) -> None:
    refused(raw_segment(version=version), f"format version {version}; this reader knows only 1")


@pytest.mark.parametrize("flags", [0x0002, 0x8000, 0x0003])
def test_unknown_flag_bits(flags: int) -> None:
    refused(raw_segment(flags=flags), "unknown flag bits")


@pytest.mark.parametrize("page_size", [0, 256, 513, 1000, 4095, 131072, 2**31])
def test_page_size_not_a_power_of_two_between_512_and_65536(page_size: int) -> None:
    refused(raw_segment(page_size=page_size, pages=()), f"page size {page_size} is not a power")


@pytest.mark.parametrize(("generation", "index"), [(0, 1), (1, 0)])
def test_generation_and_index_start_at_one(generation: int, index: int) -> None:
    refused(raw_segment(generation=generation, index=index), "must both be at least 1")


def test_tenant_name_not_utf8() -> None:
    refused(raw_segment(tenant=b"ac\xffme"), "tenant name is not valid UTF-8")


def test_tenant_name_running_past_the_end() -> None:
    refused(raw_segment(pages=(), tenant_length=500), "tenant name runs past the end")


@pytest.mark.parametrize(
    "pages",
    [
        ((2, b"\x00" * 512), (2, b"\x01" * 512)),
        ((3, b"\x00" * 512), (2, b"\x01" * 512)),
    ],
)
def test_pages_not_strictly_increasing(pages: tuple[tuple[int, bytes], ...]) -> None:
    refused(raw_segment(pages=pages), "page number 2 after [23] is not increasing")


@pytest.mark.parametrize("pgno", [0, 11, 2**32 - 1])
def test_page_numbers_outside_the_database(pgno: int) -> None:
    refused(raw_segment(pages=((pgno, b"\x00" * 512),)), f"page number {pgno} after 0")


def test_more_pages_than_the_database_has() -> None:
    refused(raw_segment(page_count=11), "11 pages cannot be distinct pages of a 10-page")


@pytest.mark.parametrize("compress", [False, True])
def test_a_page_of_the_wrong_size(compress: bool) -> None:
    short = ((1, b"\x00" * 511), (2, b"\x00" * 512))
    area = "inflates to" if compress else "is"
    refused(raw_segment(pages=short, compress=compress), f"truncated: the page area {area} 1031")
    long = ((1, b"\x00" * 513), (2, b"\x00" * 512))
    # Compressed, records are checked as they arrive: the misaligned second one first.
    refused(raw_segment(pages=long, compress=compress), r"over-long|page number 0 after 1")


@pytest.mark.parametrize("compress", [False, True])
def test_a_page_count_that_disagrees_with_the_page_area(compress: bool) -> None:
    refused(raw_segment(page_count=2, compress=compress), r"over-long|inflates to more")
    refused(raw_segment(page_count=4, compress=compress), "truncated: the page area")


def test_a_truncated_page_area() -> None:
    area = b"".join(pgno.to_bytes(4, "big") + data for pgno, data in PAGES)
    refused(raw_segment(area=area[:-1]), "truncated: the page area is 1547 bytes")
    refused(raw_segment(area=area + b"\x00"), "over-long: the page area is 1549 bytes")


def test_a_truncated_zlib_stream() -> None:
    stream = zlib.compress(b"".join(p.to_bytes(4, "big") + d for p, d in PAGES))
    refused(raw_segment(flags=1, area=stream[:-4]), r"ends before its zlib stream does")


def test_bytes_after_the_zlib_stream() -> None:
    stream = zlib.compress(b"".join(p.to_bytes(4, "big") + d for p, d in PAGES))
    refused(raw_segment(flags=1, area=stream + b"junk"), "over-long: 4 bytes follow the zlib")


def test_a_damaged_zlib_stream() -> None:
    refused(raw_segment(flags=1, area=b"\x78\x01not deflate"), "compressed page area is damaged")


def test_an_uncompressed_area_marked_compressed() -> None:
    refused(raw_segment(flags=1), "compressed page area is damaged")


@pytest.mark.parametrize("page_count", [0, 1])
def test_a_decompression_bomb_stops_at_the_declared_size(page_count: int) -> None:
    # 64 MiB of zeros in 64 KiB: inflating it whole would be the bomb.
    bomb = zlib.compressobj(9)
    stream = b"".join(bomb.compress(b"\x00" * (1 << 20)) for _ in range(64)) + bomb.flush()
    assert len(stream) < 1 << 17
    # Record by record: the first record's page number (0) already stops it.
    refused(
        raw_segment(page_count=page_count, flags=1, area=stream),
        f"inflates to more than the {page_count * 516} bytes its pages take|page number 0 after 0",
    )


def test_refusals_name_the_key_and_carry_it() -> None:
    error = refused(raw_segment(version=9), "format version 9")
    assert str(error).startswith(f"segment {KEY} is unusable: ")


# --- the encoder refuses what the decoder would ----------------------------------------------


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (Segment(HEADER, ((2, b"\x00" * 512), (1, b"\x00" * 512))), "page number 1 after 2"),
        (Segment(HEADER, ((2, b"\x00" * 512), (2, b"\x00" * 512))), "page number 2 after 2"),
        (Segment(HEADER, ((0, b"\x00" * 512),)), "page number 0 after 0"),
        (Segment(HEADER, ((11, b"\x00" * 512),)), r"not increasing within 1\.\.10"),
        (Segment(HEADER, ((1, b"\x00" * 100),)), "page 1 is 100 bytes, not the page size 512"),
        (Segment(dataclasses.replace(HEADER, page_size=1000), ()), "page size 1000"),
        (Segment(dataclasses.replace(HEADER, generation=0), ()), "generation 0"),
        (Segment(dataclasses.replace(HEADER, index=2**64), ()), "index 18446744073709551616"),
        (Segment(dataclasses.replace(HEADER, db_pages=2**32), ()), "database size 4294967296"),
        (Segment(dataclasses.replace(HEADER, timestamp_ms=-1), ()), "timestamp_ms -1"),
        (Segment(dataclasses.replace(HEADER, state=2**64), ()), "state 18446744073709551616"),
        (Segment(dataclasses.replace(HEADER, commits=2**32), ()), "commits 4294967296"),
        (Segment(dataclasses.replace(HEADER, tenant="a\udc80"), ()), "cannot be encoded"),
        (Segment(dataclasses.replace(HEADER, tenant="a" * 65536), ()), "65536 bytes, over"),
    ],
)
def test_encode_refuses_a_segment_that_breaks_the_rules(segment: Segment, message: str) -> None:
    with pytest.raises(ReplicationError, match=message) as info:
        encode_segment(segment)
    assert "cannot encode segment" in str(info.value)


# --- keys ------------------------------------------------------------------------------------


def test_segment_key() -> None:
    assert segment_key("tenants/", "acme", 3, 42) == KEY


def test_segment_keys_list_in_log_order() -> None:
    keys = [
        segment_key("tenants/", "acme", generation, index)
        for generation, index in [(1, 1), (1, 2), (1, 10), (2, 11), (10, 100), (10, 1000)]
    ]
    assert sorted(keys) == keys


@pytest.mark.parametrize(("generation", "index"), [(0, 1), (1, 0), (-1, 5)])
def test_segment_key_refuses_numbers_below_one(generation: int, index: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        segment_key("tenants/", "acme", generation, index)


def test_inflate_bomb_is_refused_within_bounded_memory() -> None:
    # 64 MiB of zeros in about 64 KiB, under a header claiming 1000 pages of 64 KiB: the
    # header's size must not be what the inflater may allocate.
    bomb = zlib.compressobj(9)
    stream = b"".join(bomb.compress(b"\x00" * (1 << 20)) for _ in range(64)) + bomb.flush()
    data = raw_segment(page_size=65536, db_pages=1000, page_count=1000, flags=1, area=stream)
    tracemalloc.start()
    try:
        refused(data, None)  # its first record already: page number 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"decoding the bomb took {peak / MiB:.1f} MiB"


def test_a_long_compressed_segment_inflates_record_by_record() -> None:
    # More than one feed of compressed input, pages that do not compress: every page back.
    rng = random.Random(7)
    pages = tuple((n, rng.randbytes(4096)) for n in range(1, 65))
    header = dataclasses.replace(HEADER, page_size=4096, db_pages=64)
    data = encode_segment(Segment(header, pages))
    assert len(data) > 3 * 64 * 1024
    assert decode_segment(data, key=KEY).pages == pages


def test_a_segment_time_past_the_year_9000_is_refused() -> None:
    # A point-in-time restore turns it into a datetime: 2^64 - 1 ms is out of its range.
    refused(raw_segment(timestamp_ms=2**64 - 1), "past the year 9000")


def test_a_chunk_key_with_an_absurd_number_is_not_tenantdbs() -> None:
    assert parse_chunk_key("tenants/acme/log/00000001/" + "9" * 40 + ".seg") is None
    assert parse_chunk_key("tenants/acme/log/00000001/000999999999.seg") is not None


def test_a_zlib_stream_ending_between_records_with_bytes_after_it() -> None:
    one = b"".join(p.to_bytes(4, "big") + d for p, d in PAGES[:1])
    stream = zlib.compress(one) + b"junk" * 100
    refused(raw_segment(flags=1, area=stream), "truncated: the page area inflates to 516")
