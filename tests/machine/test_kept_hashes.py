"""The page hashes kept beside a cleanly closed file: taken only while they are the file's."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from tenantdb.machine.kept_hashes import keep_hashes, take_kept_hashes
from tenantdb.replication.checksum import PageHashes


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "acme.sqlite3"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 3000,)] * 20)
        conn.commit()
    return path


def sidecar(db: Path) -> Path:
    return Path(f"{db}.tenantdb-pages")


def test_kept_hashes_are_taken_once_and_equal_hashing_the_file(db: Path) -> None:
    hashes = PageHashes.of_file(db, 4096)
    keep_hashes(db, hashes)
    taken = take_kept_hashes(db)
    assert taken is not None
    assert (taken.state, taken.db_pages, taken.hashes_bytes()) == (
        hashes.state,
        hashes.db_pages,
        hashes.hashes_bytes(),
    )
    assert not sidecar(db).exists()
    assert take_kept_hashes(db) is None  # they serve one start


def test_hashes_that_are_not_the_files_size_are_not_kept(db: Path) -> None:
    hashes = PageHashes.of_file(db, 4096)
    hashes.apply({hashes.db_pages + 1: bytes(4096)}, hashes.db_pages + 1)
    keep_hashes(db, hashes)
    assert not sidecar(db).exists()


def test_a_copy_of_the_file_in_its_place_is_not_vouched_for(db: Path) -> None:
    keep_hashes(db, PageHashes.of_file(db, 4096))
    copy = db.with_name("copy")
    shutil.copy2(db, copy)  # the same bytes and mtime, another inode
    copy.replace(db)
    assert take_kept_hashes(db) is None
    assert not sidecar(db).exists()


def test_a_sidecar_with_a_valid_checksum_but_another_state_is_refused(db: Path) -> None:
    keep_hashes(db, PageHashes.of_file(db, 4096))
    body = bytearray(sidecar(db).read_bytes()[:-32])
    body[-1] ^= 1  # the last page's hash, and the checksum made to fit
    sidecar(db).write_bytes(bytes(body) + hashlib.sha256(body).digest())
    assert take_kept_hashes(db) is None


def test_a_sidecar_longer_than_the_file_allows_is_refused(db: Path) -> None:
    keep_hashes(db, PageHashes.of_file(db, 4096))
    sidecar(db).write_bytes(sidecar(db).read_bytes() + bytes(1 << 20))
    assert take_kept_hashes(db) is None
