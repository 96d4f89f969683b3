"""A checksum of a database's state that can be kept up to date page by page.

The state of a database of ``n`` pages is the XOR over its pages of
``page_hash(pgno, page)``: a 64-bit blake2b of the page number (4 bytes, big-endian)
followed by the page's bytes, read as a big-endian integer. XOR makes it incremental: when
a page changes, its old hash is XORed out and the new one in, so a replica can check that
a segment applies to the database it has (``prev_state``) and produced the database the
writer had (``state``) without rereading the file. Hashing the page number with the bytes
means that two pages swapping contents change the state.

This is a check against mistakes (a segment applied to the wrong base, a lost or
reordered segment, a bug in applying pages), not against an adversary: anyone can build
pages with a chosen XOR. Integrity of the objects themselves is the sha256 trailer of each
segment.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import sys
from array import array
from collections.abc import Mapping
from pathlib import Path

from tenantdb.errors import ReplicationError

__all__ = ["database_page_size", "PageHashes", "check_page_size", "format_state", "page_hash"]

# SQLite page numbers are 32-bit and start at 1.
MAX_PAGE_NUMBER = 0xFFFFFFFF
# SQLite's lock-byte page starts here (1 GiB): it is part of the file, never written.
_LOCK_BYTE_OFFSET = 0x40000000
# A multiple of every page size, so that no page straddles two reads.
_READ_BYTES = 1 << 20


def check_page_size(page_size: int) -> str | None:
    """Return why ``page_size`` is not a SQLite page size, or None if it is one."""
    if not 512 <= page_size <= 65536 or page_size & (page_size - 1):
        return f"page size {page_size} is not a power of two between 512 and 65536"
    return None


def page_hash(pgno: int, data: bytes | bytearray | memoryview) -> int:
    """Return the 64-bit hash of page ``pgno`` holding ``data``."""
    if not 1 <= pgno <= MAX_PAGE_NUMBER:
        raise ValueError(f"page number {pgno} is outside 1..{MAX_PAGE_NUMBER}")
    h = hashlib.blake2b(pgno.to_bytes(4, "big"), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "big")


def format_state(state: int) -> str:
    """Return a state checksum as 16 lowercase hex digits."""
    return f"{state:016x}"


def database_page_size(path: Path) -> int:
    """The page size a SQLite file's header declares (4096 for an empty file)."""
    with open(path, "rb") as f:
        header = f.read(18)
    if len(header) < 18:
        return 4096
    raw = int.from_bytes(header[16:18], "big")
    size = 65536 if raw == 1 else raw
    if reason := check_page_size(size):
        raise ReplicationError(f"{path} is not a SQLite database: {reason}")
    return size


class PageHashes:
    """Per-page hashes of a database image, kept current as pages change; ``state`` is their XOR."""

    def __init__(self, page_size: int) -> None:
        """Start with an empty database (zero pages) of ``page_size``-byte pages."""
        if reason := check_page_size(page_size):
            raise ReplicationError(reason)
        self._page_size = page_size
        # 8 bytes per page, index = page number - 1: a 1 GiB database of 4 KiB pages costs
        # 2 MiB, where a dict of ints would cost over ten times that.
        self._hashes = array("Q")
        self._state = 0

    @classmethod
    def of_file(cls, path: Path, page_size: int) -> PageHashes:
        """Hash every page of the database file at ``path`` (which must not be changing)."""
        hashes = cls(page_size)
        state = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_READ_BYTES):
                    view = memoryview(chunk)
                    if len(chunk) % page_size:
                        # A short read is the end of the file: its size is not whole pages.
                        size = os.fstat(f.fileno()).st_size
                        raise ReplicationError(
                            f"{path} is {size} bytes, not a whole number of {page_size}-byte pages"
                        )
                    for offset in range(0, len(chunk), page_size):
                        h = page_hash(len(hashes._hashes) + 1, view[offset : offset + page_size])
                        hashes._hashes.append(h)
                        state ^= h
        except OSError as exc:
            raise ReplicationError(f"cannot read {path}: {exc.strerror or exc}") from exc
        hashes._state = state
        return hashes

    @property
    def page_size(self) -> int:
        """The size of every page, in bytes."""
        return self._page_size

    @property
    def state(self) -> int:
        """The XOR of the hashes of every page: the state checksum of the database."""
        return self._state

    @property
    def db_pages(self) -> int:
        """The size of the database, in pages."""
        return len(self._hashes)

    def apply(self, pages: Mapping[int, bytes], db_pages: int) -> None:
        """Set the new images ``pages``, then make the database ``db_pages`` pages long.

        Pages past ``db_pages`` are dropped, those in ``pages`` included: that is a
        truncation (VACUUM, or a commit that frees the last pages). Pages between the old
        size and a larger ``db_pages`` that are not in ``pages`` count as absent (hash 0):
        SQLite writes every page it adds to a growing database, so a real WAL never leaves
        such a gap, but the result stays well-defined if something does.
        Growth is bounded by the pages given: a database grows by at most the new pages
        it is given (plus SQLite's lock-byte page, never written), so a claimed size costs
        no more memory than the pages that come with it.
        """
        if not 0 <= db_pages <= MAX_PAGE_NUMBER:
            raise ReplicationError(
                f"database size {db_pages} pages is outside 0..{MAX_PAGE_NUMBER}"
            )
        old_pages = len(self._hashes)
        if db_pages > old_pages:
            added = sum(1 for pgno in pages if old_pages < pgno <= db_pages)
            lock_page = _LOCK_BYTE_OFFSET // self._page_size + 1
            added += old_pages < lock_page <= db_pages
            if db_pages - old_pages > added:
                raise ReplicationError(
                    f"the database would grow from {old_pages} to {db_pages} pages with "
                    f"{added} new page(s): a database grows only by the pages written to it"
                )
        for pgno, data in pages.items():
            if not 1 <= pgno <= MAX_PAGE_NUMBER:
                raise ReplicationError(f"page number {pgno} is outside 1..{MAX_PAGE_NUMBER}")
            if len(data) != self._page_size:
                raise ReplicationError(
                    f"page {pgno} is {len(data)} bytes, not the page size {self._page_size}"
                )
        # Checked everything before changing anything, so a refusal leaves self intact.
        hashes = self._hashes
        state = self._state
        if db_pages < len(hashes):
            for h in hashes[db_pages:]:
                state ^= h
            del hashes[db_pages:]
        elif db_pages > len(hashes):
            hashes.frombytes(bytes(8 * (db_pages - len(hashes))))
        for pgno, data in pages.items():
            # Setting a page past db_pages and dropping it is the same as ignoring it.
            if pgno <= db_pages:
                h = page_hash(pgno, data)
                state ^= hashes[pgno - 1] ^ h
                hashes[pgno - 1] = h
        self._state = state

    def hashes_bytes(self) -> bytes:
        """Every page's hash, 8 bytes each (little-endian), in page order."""
        hashes = array("Q", self._hashes)
        if sys.byteorder == "big":
            hashes.byteswap()
        return hashes.tobytes()

    @classmethod
    def from_hashes_bytes(cls, page_size: int, data: bytes) -> PageHashes:
        """The inverse of ``hashes_bytes``: the hashes of a database of ``page_size`` pages."""
        if len(data) % 8 or len(data) // 8 > MAX_PAGE_NUMBER:
            raise ReplicationError(f"{len(data)} bytes are not a list of page hashes")
        hashes = cls(page_size)
        hashes._hashes.frombytes(data)
        if sys.byteorder == "big":
            hashes._hashes.byteswap()
        hashes._state = functools.reduce(operator.xor, hashes._hashes, 0)
        return hashes

    def copy(self) -> PageHashes:
        """Return an independent copy."""
        other = PageHashes(self._page_size)
        other._hashes = array("Q", self._hashes)
        other._state = self._state
        return other

    def __repr__(self) -> str:
        return (
            f"PageHashes(page_size={self._page_size}, db_pages={self.db_pages}, "
            f"state={format_state(self._state)})"
        )
