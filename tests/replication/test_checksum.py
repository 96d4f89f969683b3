"""The state checksum: its definition, and that applying changed pages matches rehashing."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantdb.errors import ReplicationError
from tenantdb.replication.checksum import PageHashes, format_state, page_hash

PAGE_SIZE = 4096


def read_pages(path: Path, page_size: int = PAGE_SIZE) -> dict[int, bytes]:
    """The pages of a database file, by page number."""
    data = path.read_bytes()
    assert len(data) % page_size == 0
    return {i // page_size + 1: data[i : i + page_size] for i in range(0, len(data), page_size)}


def xor_of_pages(pages: dict[int, bytes]) -> int:
    """The state checksum computed straight from its definition."""
    state = 0
    for pgno, data in pages.items():
        state ^= page_hash(pgno, data)
    return state


def changed_pages(before: dict[int, bytes], after: dict[int, bytes]) -> dict[int, bytes]:
    """The pages of ``after`` that are new or differ from ``before``."""
    return {pgno: data for pgno, data in after.items() if before.get(pgno) != data}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, Path]]:
    """A real SQLite database in rollback-journal mode: after a commit the file is the state."""
    path = tmp_path / "tenant.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, value INTEGER NOT NULL)")
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO counters VALUES (?, 0)", [(i,) for i in range(1, 2001)])
    conn.executemany("INSERT INTO notes (body) VALUES (?)", [("n" * 1024,) for _ in range(1000)])
    conn.execute("COMMIT")
    yield conn, path
    conn.close()


# --- the definition --------------------------------------------------------------------------


def test_page_hash_is_blake2b_64_of_big_endian_page_number_then_bytes() -> None:
    data = bytes(range(256)) * 2
    expected = hashlib.blake2b(b"\x00\x00\x01\x02" + data, digest_size=8).digest()
    assert page_hash(258, data) == int.from_bytes(expected, "big")


def test_page_hash_depends_on_the_page_number() -> None:
    data = b"\x00" * 512
    assert page_hash(1, data) != page_hash(2, data)


@pytest.mark.parametrize("pgno", [0, -1, 2**32])
def test_page_hash_refuses_page_numbers_sqlite_cannot_have(pgno: int) -> None:
    with pytest.raises(ValueError, match="page number"):
        page_hash(pgno, b"\x00" * 512)


def test_format_state_is_16_hex_digits() -> None:
    assert format_state(0) == "0000000000000000"
    assert format_state(0xAB) == "00000000000000ab"
    assert format_state(2**64 - 1) == "ffffffffffffffff"


def test_an_empty_database_has_state_zero(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    hashes = PageHashes.of_file(path, 512)
    assert (hashes.state, hashes.db_pages) == (0, 0)
    assert PageHashes(512).state == 0


# --- of_file ---------------------------------------------------------------------------------


def test_of_file_is_the_xor_of_page_hash_over_a_real_database(
    db: tuple[sqlite3.Connection, Path],
) -> None:
    _, path = db
    pages = read_pages(path)
    assert len(pages) > 256  # several 1 MiB reads
    hashes = PageHashes.of_file(path, PAGE_SIZE)
    assert hashes.db_pages == len(pages)
    assert hashes.state == xor_of_pages(pages)
    assert hashes.page_size == PAGE_SIZE


def test_of_file_refuses_a_size_that_is_not_whole_pages(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    path.write_bytes(b"\x00" * (3 * 1024 + 1))
    with pytest.raises(ReplicationError, match=r"3073 bytes, not a whole number of 1024-byte"):
        PageHashes.of_file(path, 1024)


def test_of_file_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReplicationError, match="cannot read"):
        PageHashes.of_file(tmp_path / "missing", 4096)


@pytest.mark.parametrize("page_size", [0, 256, 1000, 131072])
def test_page_sizes_sqlite_cannot_have_are_refused(tmp_path: Path, page_size: int) -> None:
    path = tmp_path / "db"
    path.write_bytes(b"")
    with pytest.raises(ReplicationError, match="not a power of two between 512 and 65536"):
        PageHashes.of_file(path, page_size)


# --- apply against real SQLite changes -------------------------------------------------------


def test_apply_of_changed_pages_matches_rehashing_after_updates_and_inserts(
    db: tuple[sqlite3.Connection, Path],
) -> None:
    conn, path = db
    hashes = PageHashes.of_file(path, PAGE_SIZE)
    before = read_pages(path)
    rng = random.Random(7)
    for _ in range(50):
        conn.execute("UPDATE counters SET value = value + 1 WHERE id = ?", (rng.randint(1, 2000),))
    conn.execute("INSERT INTO notes (body) VALUES (?)", ("x" * 3000,))
    after = read_pages(path)
    changes = changed_pages(before, after)
    assert 0 < len(changes) < len(after)
    hashes.apply(changes, len(after))
    assert (hashes.state, hashes.db_pages) == (xor_of_pages(after), len(after))
    assert hashes.state == PageHashes.of_file(path, PAGE_SIZE).state


def test_apply_follows_a_truncation_by_vacuum(db: tuple[sqlite3.Connection, Path]) -> None:
    conn, path = db
    hashes = PageHashes.of_file(path, PAGE_SIZE)
    before = read_pages(path)
    conn.execute("DELETE FROM notes WHERE id > 200")
    conn.execute("VACUUM")
    after = read_pages(path)
    assert len(after) < len(before)
    hashes.apply(changed_pages(before, after), len(after))
    fresh = PageHashes.of_file(path, PAGE_SIZE)
    assert (hashes.state, hashes.db_pages) == (fresh.state, fresh.db_pages)


def test_apply_follows_growth(db: tuple[sqlite3.Connection, Path]) -> None:
    conn, path = db
    hashes = PageHashes.of_file(path, PAGE_SIZE)
    before = read_pages(path)
    conn.executemany("INSERT INTO notes (body) VALUES (?)", [("g" * 2000,) for _ in range(200)])
    after = read_pages(path)
    assert len(after) > len(before)
    hashes.apply(changed_pages(before, after), len(after))
    fresh = PageHashes.of_file(path, PAGE_SIZE)
    assert (hashes.state, hashes.db_pages) == (fresh.state, fresh.db_pages)


# --- apply: the edge cases -------------------------------------------------------------------


def test_pages_past_the_new_size_are_dropped_even_if_given() -> None:
    hashes = PageHashes(512)
    pages = {n: bytes([n]) * 512 for n in range(1, 6)}
    hashes.apply(pages, 5)
    hashes.apply({4: b"\x44" * 512, 5: b"\x55" * 512}, 3)
    assert hashes.db_pages == 3
    assert hashes.state == xor_of_pages({n: pages[n] for n in (1, 2, 3)})


def test_a_growth_past_the_pages_given_is_refused_and_leaves_the_hashes_intact() -> None:
    hashes = PageHashes(512)
    hashes.apply({1: b"\x01" * 512}, 1)
    with pytest.raises(ReplicationError, match="grow from 1 to 6 pages with 1 new page"):
        hashes.apply({4: b"\x04" * 512}, 6)
    # The db_pages bomb: no page at all, 2^32 - 1 claimed; refused before any allocation.
    with pytest.raises(ReplicationError, match="grow from 1 to 4294967295 pages"):
        hashes.apply({}, 0xFFFFFFFF)
    assert (hashes.db_pages, hashes.state) == (1, xor_of_pages({1: b"\x01" * 512}))


def test_the_lock_byte_page_is_the_one_page_a_growth_may_skip() -> None:
    # SQLite never writes the page holding the lock bytes at 1 GiB: here page 2**21 + 1.
    lock_page = (1 << 30) // 512 + 1
    grown = PageHashes(512)
    # A database just under 1 GiB, without writing 2 million pages (their hashes are 0).
    grown._hashes.frombytes(bytes(8 * (lock_page - 1)))
    grown.apply({lock_page + 1: b"\x01" * 512}, lock_page + 1)
    assert grown.db_pages == lock_page + 1
    with pytest.raises(ReplicationError, match="new page"):
        grown.apply({}, lock_page + 3)


@pytest.mark.parametrize(
    ("pages", "db_pages", "message"),
    [
        ({1: b"\x00" * 511}, 1, "page 1 is 511 bytes, not the page size 512"),
        ({0: b"\x00" * 512}, 1, "page number 0"),
        ({1: b"\x00" * 512}, -1, "database size -1"),
        ({1: b"\x00" * 512}, 2**32, "database size 4294967296"),
    ],
)
def test_apply_refuses_bad_input_and_changes_nothing(
    pages: dict[int, bytes], db_pages: int, message: str
) -> None:
    hashes = PageHashes(512)
    hashes.apply({1: b"\x01" * 512, 2: b"\x02" * 512}, 2)
    state = hashes.state
    with pytest.raises(ReplicationError, match=message):
        hashes.apply({2: b"\x09" * 512, **pages}, db_pages)
    assert (hashes.state, hashes.db_pages) == (state, 2)


def test_copy_is_independent() -> None:
    hashes = PageHashes(512)
    hashes.apply({1: b"\x01" * 512}, 1)
    copy = hashes.copy()
    copy.apply({1: b"\x02" * 512, 2: b"\x03" * 512}, 2)
    assert (hashes.state, hashes.db_pages) == (page_hash(1, b"\x01" * 512), 1)
    assert copy.db_pages == 2
    assert copy.state != hashes.state
    assert "db_pages=1" in repr(hashes)


PAGE_BYTES = st.sampled_from([bytes([b]) * 512 for b in range(8)])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.dictionaries(st.integers(1, 40), PAGE_BYTES, max_size=8), st.integers(0, 40)),
        max_size=12,
    )
)
def test_any_sequence_of_applies_equals_the_xor_of_the_resulting_pages(
    steps: list[tuple[dict[int, bytes], int]],
) -> None:
    hashes = PageHashes(512)
    model: dict[int, bytes] = {}  # absent pages are simply missing
    for pages, db_pages in steps:
        before = (hashes.state, hashes.db_pages)
        new = sum(1 for pgno in pages if hashes.db_pages < pgno <= db_pages)
        if db_pages - hashes.db_pages > new:
            # A growth past the pages given is refused, leaving everything as it was.
            with pytest.raises(ReplicationError, match="grows only by the pages"):
                hashes.apply(pages, db_pages)
            assert (hashes.state, hashes.db_pages) == before
            continue
        model.update(pages)
        model = {pgno: data for pgno, data in model.items() if pgno <= db_pages}
        hashes.apply(pages, db_pages)
        assert hashes.db_pages == db_pages
        assert hashes.state == xor_of_pages(model)
