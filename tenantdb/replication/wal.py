"""Read the committed transactions out of a SQLite ``-wal`` file, to ship them to the bucket.

The WAL format (https://sqlite.org/fileformat2.html, "The Write-Ahead Log", and the header
comment of SQLite's ``src/wal.c``): a 32-byte header of eight big-endian u32 (magic
0x377f0682 or 0x377f0683, format version 3007000, page size, checkpoint sequence, salt-1,
salt-2, checksum-1, checksum-2), then frames of a 24-byte header (page number, database
size in pages after the commit or 0 if the frame is not a commit, salt-1, salt-2,
checksum-1, checksum-2; big-endian u32) followed by the page.

The checksum reads its input as u32 words, little-endian when the magic is 0x377f0682 and
big-endian when it is 0x377f0683 (the values are stored big-endian either way), and runs
``s0 += x[i] + s1; s1 += x[i+1] + s0`` modulo 2**32 over pairs of words. The header's
checksum covers its first 24 bytes starting from (0, 0); each frame's continues from the
previous frame's (from the header's for the first frame) over the first 8 bytes of its
header and then its page. A frame is valid when its salts are the header's, its page
number is not 0 and its checksum matches; SQLite's recovery stops at the first invalid
frame and ignores every frame after the last valid commit, and so does this reader.

After a checkpoint has copied every frame into the database, the next writer restarts the
WAL from its beginning with new salts (salt-1 incremented, salt-2 random), leaving stale
frames of the older incarnation after the new ones; their salts make them invalid.
"""

from __future__ import annotations

import functools
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tenantdb.errors import ConfigurationError, ReplicationError
from tenantdb.replication.checksum import check_page_size

__all__ = [
    "CommittedPages",
    "WALPosition",
    "WALRestartedError",
    "read_committed",
    "restart_dropped_frames",
    "restarted_once",
    "wal_index_frames",
    "wal_start",
]

_WAL_HEADER_SIZE = 32
_FRAME_HEADER_SIZE = 24
_MAGIC_LITTLE_ENDIAN = 0x377F0682
_MAGIC_BIG_ENDIAN = 0x377F0683
_FORMAT_VERSION = 3007000
_MASK = 0xFFFFFFFF
_HEADER = struct.Struct(">8I")
_FRAME_HEADER = struct.Struct(">6I")


@dataclass(frozen=True)
class WALPosition:
    """Where the reader stopped: after a commit frame of one WAL incarnation."""

    salt1: int
    salt2: int
    # Byte offset of the next frame: 32 right after the header.
    offset: int
    # Cumulative checksum of the last frame read, or the header's at offset 32.
    checksum: tuple[int, int]
    page_size: int
    # Checksum byte order, from the magic number.
    big_endian: bool

    @property
    def salts(self) -> tuple[int, int]:
        """The salts that name this WAL incarnation."""
        return (self.salt1, self.salt2)

    @property
    def frames(self) -> int:
        """How many frames of the WAL lie before this position."""
        return (self.offset - 32) // (self.page_size + 24)


@dataclass(frozen=True)
class CommittedPages:
    """The newest image of every page changed by the commits read, in page order."""

    start: WALPosition
    # Right after the last commit frame read; ``start`` when no commit was read.
    end: WALPosition
    # Page number -> newest committed image. Pages past ``db_pages`` are left out: the
    # database was truncated below them, which applying the size does anyway.
    pages: dict[int, bytes]
    # Database size in pages after the last commit read; 0 when no commit was read.
    db_pages: int
    # Commit frames between ``start`` and ``end``.
    commits: int
    # Frames between ``start`` and ``end``.
    frames: int


class WALRestartedError(ReplicationError):
    """The WAL's salts are not the ones of ``since``: it was reset."""

    def __init__(self, message: str, *, key: str = "", current: WALPosition | None = None) -> None:
        # The start of the WAL that replaced it, when known.
        self.current = current
        super().__init__(message, key=key)


def restarted_once(old: WALPosition, new: WALPosition) -> bool:
    """Whether the WAL ``new`` starts is exactly the next restart of the one ``old`` is in.

    A restart increments salt-1 by one (SQLite's ``walRestartHdr``), whoever restarts it;
    salt-2 is random. So salt-1 counts the restarts between two headers, and only a count
    of one proves that no whole WAL came and went unread in between. (The header's
    checkpoint sequence cannot count them: each connection keeps its own.)
    """
    return new.salt1 == (old.salt1 + 1) & _MASK


def restart_dropped_frames(wal_path: Path, position: WALPosition, current: WALPosition) -> bool:
    """Whether the restart from ``position``'s WAL to ``current`` may have dropped frames.

    A restart overwrites the WAL from its start and leaves the rest of the file alone, so
    a frame the old incarnation got after ``position`` is still there, with the old salts,
    unless the new incarnation reached that far or the file was truncated (tenantdb never
    cuts it below ``position`` before reading the restart: see ``checkpoint.trim_wal``).
    Only a file that ends at ``position``, or a frame there with neither incarnation's
    salts, proves none was written.
    """
    try:
        with open(wal_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            if size <= position.offset:
                return size != position.offset  # shorter: truncated, frames may be gone
            f.seek(position.offset)
            data = f.read(_FRAME_HEADER_SIZE)
    except OSError as exc:
        raise ReplicationError(f"cannot read {wal_path}: {exc.strerror or exc}") from exc
    if len(data) < _FRAME_HEADER_SIZE:
        return True
    _pgno, _commit, salt1, salt2, _c1, _c2 = _FRAME_HEADER.unpack(data)
    return (salt1, salt2) in (position.salts, current.salts)


def wal_start(wal_path: Path) -> WALPosition | None:
    """The position right after the header of the current WAL, or None if there is no valid header.

    None covers a missing or short file and a bad magic number, version, page size or
    header checksum: SQLite treats all of these as an empty WAL.
    """
    try:
        with open(wal_path, "rb") as f:
            return _read_header(f)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReplicationError(f"cannot read {wal_path}: {exc.strerror or exc}") from exc


def read_committed(
    wal_path: Path,
    since: WALPosition,
    *,
    max_frames: int | None = None,
    committed_frames: int | None = None,
) -> CommittedPages:
    """Read frames from ``since`` up to the last valid commit frame.

    Stops at the first invalid or short frame, or at the end of the file; frames after the
    last commit read (a transaction in progress or rolled back) are never returned.
    ``max_frames`` bounds the frames read in one call: reading stops at the last commit at
    or before it, or at the first commit when one transaction is longer (a transaction is
    returned whole). Raises WALRestartedError when the WAL's salts are not ``since``'s, and
    ReplicationError when the file has no valid header or ``since`` does not fit it.

    ``committed_frames`` is the wal-index's count of committed frames (``wal_index_frames``):
    frames up to it are taken as SQLite's own readers take them, with their salts checked
    but without recomputing the checksum chain, and none past it are read.
    """
    if max_frames is not None and max_frames < 1:
        raise ConfigurationError(f"max_frames must be at least 1, not {max_frames}")
    try:
        with open(wal_path, "rb") as f:
            header = _read_header(f)
            if header is None:
                raise ReplicationError(f"{wal_path} has no valid WAL header")
            if (header.salt1, header.salt2) != since.salts:
                raise WALRestartedError(
                    f"{wal_path} was restarted: salts {header.salt1:08x}-{header.salt2:08x}, "
                    f"not {since.salt1:08x}-{since.salt2:08x}",
                    current=header,
                )
            _check_position(f, wal_path, header, since)
            return _read_frames(f, since, max_frames, committed_frames, header)
    except FileNotFoundError as exc:
        raise ReplicationError(f"{wal_path} does not exist: no WAL to read") from exc
    except OSError as exc:
        raise ReplicationError(f"cannot read {wal_path}: {exc.strerror or exc}") from exc


def _read_header(f: BinaryIO) -> WALPosition | None:
    """Parse and check the WAL header at the start of ``f``; None if it is not valid."""
    data = f.read(_WAL_HEADER_SIZE)
    if len(data) < _WAL_HEADER_SIZE:
        return None
    magic, version, page_size, _ckpt_seq, salt1, salt2, c1, c2 = _HEADER.unpack(data)
    if magic not in (_MAGIC_LITTLE_ENDIAN, _MAGIC_BIG_ENDIAN):
        return None
    if version != _FORMAT_VERSION or check_page_size(page_size) is not None:
        return None
    big_endian = magic == _MAGIC_BIG_ENDIAN
    checksum = _checksum(_words(big_endian, 6).unpack_from(data), 0, 0)
    if checksum != (c1, c2):
        return None
    return WALPosition(
        salt1=salt1,
        salt2=salt2,
        offset=_WAL_HEADER_SIZE,
        checksum=checksum,
        page_size=page_size,
        big_endian=big_endian,
    )


def _check_position(f: BinaryIO, wal_path: Path, header: WALPosition, since: WALPosition) -> None:
    """Raise ReplicationError unless ``since`` can be a position in this WAL incarnation."""
    if (since.page_size, since.big_endian) != (header.page_size, header.big_endian):
        raise ReplicationError(
            f"{wal_path} has {header.page_size}-byte pages and "
            f"{'big' if header.big_endian else 'little'}-endian checksums, which the "
            "position does not: it is not from this WAL"
        )
    frame_size = _FRAME_HEADER_SIZE + header.page_size
    if since.offset < _WAL_HEADER_SIZE or (since.offset - _WAL_HEADER_SIZE) % frame_size:
        raise ReplicationError(f"offset {since.offset} is not a frame boundary of {wal_path}")
    if since.offset == _WAL_HEADER_SIZE:
        return  # nothing of this incarnation was read yet: any header with its salts will do
    else:
        # The salts alone could repeat by chance; the commit frame just before the position
        # must also carry the position's checksum. Its own checksum is not rechecked: that
        # would need every frame before it.
        f.seek(since.offset - frame_size)
        data = f.read(_FRAME_HEADER_SIZE)
        if len(data) < _FRAME_HEADER_SIZE:
            raise ReplicationError(f"offset {since.offset} is past the end of {wal_path}")
        _pgno, commit, salt1, salt2, c1, c2 = _FRAME_HEADER.unpack(data)
        if (salt1, salt2) != (header.salt1, header.salt2) or commit == 0:
            raise ReplicationError(
                f"the frame before offset {since.offset} of {wal_path} is not a commit "
                "frame of this WAL incarnation"
            )
        expected = (c1, c2)
    if since.checksum != expected:
        raise ReplicationError(
            f"the checksum at offset {since.offset} of {wal_path} is not the position's: "
            "it is not from this WAL"
        )


def _read_frames(
    f: BinaryIO,
    since: WALPosition,
    max_frames: int | None,
    committed_frames: int | None,
    header: WALPosition,
) -> CommittedPages:
    """Read valid frames from ``since`` and keep those up to the chosen commit."""
    page_size = since.page_size
    frame_size = _FRAME_HEADER_SIZE + page_size
    header_words = _words(since.big_endian, 2)
    page_words = _words(since.big_endian, page_size // 4)
    salts = since.salts

    pages: dict[int, bytes] = {}
    # Frames after the last commit read: kept apart until their commit frame shows up.
    pending: dict[int, bytes] = {}
    # Right after the header, the chain starts from the header as it is now: a writer may
    # rewrite it before its first frame (same salts, another checkpoint sequence number).
    s0, s1 = header.checksum if since.offset == _WAL_HEADER_SIZE else since.checksum
    offset = since.offset
    frames = commits = db_pages = 0
    end = since
    end_frames = 0

    f.seek(offset)
    while max_frames is None or frames < max_frames or commits == 0:
        if committed_frames is not None and (offset - _WAL_HEADER_SIZE) // frame_size >= (
            committed_frames
        ):
            break  # past what the wal-index says is committed
        frame = f.read(frame_size)
        if len(frame) < frame_size:
            break  # the end of the file, or a frame still being written
        pgno, commit, salt1, salt2, c1, c2 = _FRAME_HEADER.unpack_from(frame)
        if (salt1, salt2) != salts or pgno == 0:
            break  # a stale frame of an older incarnation, or one being rewritten
        if committed_frames is None:
            s0, s1 = _checksum(header_words.unpack_from(frame), s0, s1)
            s0, s1 = _checksum(page_words.unpack_from(frame, _FRAME_HEADER_SIZE), s0, s1)
            if (s0, s1) != (c1, c2):
                break  # torn or damaged: nothing after it can be trusted either
        else:
            s0, s1 = c1, c2  # the chain as SQLite wrote it, for the next position check
        frames += 1
        offset += frame_size
        pending[pgno] = frame[_FRAME_HEADER_SIZE:]
        if commit:
            pages.update(pending)
            pending.clear()
            commits += 1
            db_pages = commit
            end_frames = frames
            end = WALPosition(
                salt1=since.salt1,
                salt2=since.salt2,
                offset=offset,
                checksum=(s0, s1),
                page_size=page_size,
                big_endian=since.big_endian,
            )

    return CommittedPages(
        start=since,
        end=end,
        pages={pgno: pages[pgno] for pgno in sorted(pages) if pgno <= db_pages},
        db_pages=db_pages,
        commits=commits,
        frames=end_frames,
    )


# The wal-index header (https://sqlite.org/walformat.html): two 48-byte copies in native
# byte order; the salts are a raw copy of the WAL header's.
_INDEX_HEADER = struct.Struct("=IIIBBHII8x8s8x")
_INDEX_COPY = 48
_INDEX_CHECKSUMMED = 40


def wal_index_frames(shm_path: Path, salts: tuple[int, int]) -> int | None:
    """How many WAL frames are committed, from the wal-index (``-shm``), if it can be trusted.

    SQLite updates the index after the frames are written, and keeps two copies of its
    header so that a reader can tell a consistent one: both copies must agree, be
    initialised, pass their checksum and name the WAL incarnation with ``salts``. None when
    any of that fails (the caller then verifies every frame's checksum instead).
    """
    native_big_endian = sys.byteorder == "big"
    for _ in range(3):  # a copy being rewritten while it was read: read again
        try:
            with open(shm_path, "rb") as f:
                data = f.read(2 * _INDEX_COPY)
        except OSError:
            return None
        if len(data) < 2 * _INDEX_COPY or data[:_INDEX_COPY] != data[_INDEX_COPY:]:
            continue
        version, _unused, _change, is_init, _big, _size, frames, _pages, raw_salts = (
            _INDEX_HEADER.unpack_from(data)
        )
        words = _words(native_big_endian, _INDEX_CHECKSUMMED // 4).unpack_from(data)
        stored = _words(native_big_endian, 2).unpack_from(data, _INDEX_CHECKSUMMED)
        if version != _FORMAT_VERSION or not is_init or _checksum(words, 0, 0) != stored:
            return None
        return frames if struct.unpack(">II", raw_salts) == salts else None
    return None


@functools.lru_cache(maxsize=32)
def _words(big_endian: bool, count: int) -> struct.Struct:
    """The struct reading ``count`` u32 words in the checksum's byte order."""
    return struct.Struct(f"{'>' if big_endian else '<'}{count}I")


def _checksum(words: tuple[int, ...], s0: int, s1: int) -> tuple[int, int]:
    """Continue SQLite's WAL checksum from ``(s0, s1)`` over an even number of words."""
    it = iter(words)
    if len(words) % 8:
        for a, b in zip(it, it, strict=True):
            s0 = (s0 + a + s1) & _MASK
            s1 = (s1 + b + s0) & _MASK
        return s0, s1
    # Eight words a turn, masked once: twice as fast on pages as the loop above (which
    # matters: this is pure Python over every word of every frame), and still exact, since
    # the sums stay far below 2**64 before the mask and a mask of a sum is the sum of masks.
    for a, b, c, d, e, f, g, h in zip(it, it, it, it, it, it, it, it, strict=True):
        s0 += a + s1
        s1 += b + s0
        s0 += c + s1
        s1 += d + s0
        s0 += e + s1
        s1 += f + s0
        s0 = (s0 + g + s1) & _MASK
        s1 = (s1 + h + s0) & _MASK
    return s0, s1
