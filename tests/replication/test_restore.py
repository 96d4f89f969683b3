"""Applying a segment during a restore: checked against what the restore already knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenantdb.errors import ReplicationError
from tenantdb.protocol.lockfile import LogChunk
from tenantdb.replication.checksum import PageHashes
from tenantdb.replication.restore import apply_segment
from tenantdb.replication.segment import Segment, SegmentHeader, decode_segment, encode_segment

KEY = "tenants/acme/log/00000001/000000000002.seg"
CHUNK = LogChunk(2, 2, 1, merged=False)


def one_page_database(tmp_path: Path) -> tuple[Path, PageHashes]:
    path = tmp_path / "db.sqlite3"
    page = b"\x01" * 4096
    path.write_bytes(page)
    hashes = PageHashes(4096)
    hashes.apply({1: page}, 1)
    return path, hashes


def empty_segment(hashes: PageHashes, *, db_pages: int, page_size: int = 4096) -> Segment:
    """A segment carrying no page, claiming the database has ``db_pages`` after it."""
    header = SegmentHeader(
        tenant="acme",
        generation=1,
        index=2,
        page_size=page_size,
        db_pages=db_pages,
        timestamp_ms=1_764_583_200_000,
        prev_state=hashes.state,
        state=hashes.state,  # absent pages hash to 0: the state does not change
        commits=1,
    )
    # Through the bytes, as a restore reads it (an inline one is 106 bytes).
    return decode_segment(encode_segment(Segment(header, ())), key=KEY)


@pytest.mark.parametrize("db_pages", [1_000_000, 2**32 - 1])
def test_segment_growing_db_beyond_its_pages_is_refused(tmp_path: Path, db_pages: int) -> None:
    path, hashes = one_page_database(tmp_path)
    segment = empty_segment(hashes, db_pages=db_pages)
    with pytest.raises(ReplicationError, match="grows only by the pages") as info:
        apply_segment(segment, KEY, path, hashes, "acme", CHUNK)
    assert info.value.key == KEY
    assert path.stat().st_size == 4096  # not grown into a sparse file
    assert hashes.db_pages == 1


def test_segment_of_another_page_size_is_refused(tmp_path: Path) -> None:
    path, hashes = one_page_database(tmp_path)
    segment = empty_segment(hashes, db_pages=1, page_size=65536)
    with pytest.raises(ReplicationError, match="65536-byte pages") as info:
        apply_segment(segment, KEY, path, hashes, "acme", CHUNK)
    assert info.value.key == KEY
    assert path.stat().st_size == 4096
