"""The WAL's next commits, read and encoded as the log's next segment.

Reading follows a WAL restart only when the shipper expects one (its own checkpoint of
everything shipped, or its snapshot's copy) and salt-1 proves it is exactly one restart;
anything else is a ``ReplicationError``, on which the shipper takes a full snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tenantdb.errors import ReplicationError
from tenantdb.protocol.carried import CARRIED_MAX_BYTES
from tenantdb.protocol.lockfile import LogPointer, now_ms
from tenantdb.replication.checksum import PageHashes, format_state
from tenantdb.replication.segment import (
    SEGMENT_MAX_BYTES,
    Segment,
    SegmentHeader,
    encode_segment,
    segment_key,
)
from tenantdb.replication.snapshot_copy import MAX_FRAMES_PER_SEGMENT
from tenantdb.replication.wal import (
    CommittedPages,
    WALPosition,
    WALRestartedError,
    read_committed,
    restart_dropped_frames,
    restarted_once,
    wal_index_frames,
)

__all__ = ["Built", "encode_next", "read_next"]

# The largest page area (page numbers and pages) a segment stores uncompressed.
_SMALL_SEGMENT_BYTES = CARRIED_MAX_BYTES // 4


@dataclass(frozen=True)
class Built:
    """A segment made from the WAL and not yet published: retried as it is until it is."""

    key: str
    body: bytes
    read: CommittedPages
    hashes: PageHashes  # the database's pages with this segment applied
    index: int
    generation: int
    # The database this segment applies to: lock.json's log must end there.
    prev_state: str
    prev_pages: int

    def append_to(self, log: LogPointer | None) -> LogPointer:
        """``log`` with this segment at its tail; ReplicationError if it does not follow."""
        state = format_state(self.hashes.state)
        base = log or LogPointer.empty(1, self.prev_state, self.prev_pages)
        if base.tail != self.index - 1 or base.state != self.prev_state:
            raise ReplicationError(
                f"segment {self.key} does not follow lock.json's log (tail {base.tail})",
                key=self.key,
            )
        return base.appended(self.generation, state, self.hashes.db_pages)


def read_next(db_path: Path, start: WALPosition, *, restart_expected: bool) -> CommittedPages:
    """The committed frames from ``start`` (blocking), across a restart only if expected.

    The wal-index says which frames are committed, so their checksums need not be
    recomputed (pure Python, about 90 µs a 4 KiB page: a tax on every write); without
    a trustworthy index every frame's checksum is verified instead.
    """
    wal_path, shm_path = Path(f"{db_path}-wal"), Path(f"{db_path}-shm")

    def read(position: WALPosition) -> CommittedPages:
        committed = wal_index_frames(shm_path, position.salts)
        return read_committed(
            wal_path, position, max_frames=MAX_FRAMES_PER_SEGMENT, committed_frames=committed
        )

    try:
        return read(start)
    except WALRestartedError as exc:
        if not restart_expected or exc.current is None:
            raise ReplicationError(
                f"{wal_path} was restarted by something other than tenantdb"
            ) from exc
        if not restarted_once(start, exc.current):
            # Another checkpoint and restart came between: the commits of the WAL
            # in between were never read, and the database file holds them.
            raise ReplicationError(
                f"{wal_path} was restarted more than once since the position "
                f"(salt-1 {start.salt1:08x}, now {exc.current.salt1:08x})"
            ) from exc
        if restart_dropped_frames(wal_path, start, exc.current):
            # A commit reached the old WAL after the position (a reader held the
            # restart off), and an app's checkpoint let the restart drop it.
            raise ReplicationError(
                f"{wal_path} was restarted after frames the shipper never read"
            ) from exc
        return read(exc.current)


def encode_next(
    read: CommittedPages,
    hashes: PageHashes,
    *,
    prefix: str,
    tenant: str,
    generation: int,
    index: int,
) -> Built:
    """Encode ``read``'s pages as segment ``index`` on a database ``hashes`` describes."""
    if len(read.pages) * (4 + read.end.page_size) > SEGMENT_MAX_BYTES:
        # Readers refuse a larger object unread: ship these commits in a snapshot.
        raise ReplicationError(f"{len(read.pages)} pages changed, more than one segment may carry")
    if hashes.db_pages == 0 and hashes.page_size != read.end.page_size:
        hashes = PageHashes(read.end.page_size)  # a new database's first page size
    new_hashes = hashes.copy()
    new_hashes.apply(read.pages, read.db_pages)
    header = SegmentHeader(
        tenant=tenant,
        generation=generation,
        index=index,
        page_size=read.end.page_size,
        db_pages=read.db_pages,
        timestamp_ms=now_ms(),
        prev_state=hashes.state,
        state=new_hashes.state,
        commits=read.commits,
    )
    # A small segment rides in lock.json's carried block and then in a pack, each
    # compressed as one stream with its neighbours, which mostly hold the same pages:
    # compressed on its own as well, it would leave them nothing to share.
    small = len(read.pages) * (4 + read.end.page_size) <= _SMALL_SEGMENT_BYTES
    body = encode_segment(Segment(header, tuple(sorted(read.pages.items()))), compress=not small)
    return Built(
        segment_key(prefix, tenant, generation, index),
        body,
        read,
        new_hashes,
        index,
        generation,
        format_state(hashes.state),
        hashes.db_pages,
    )
