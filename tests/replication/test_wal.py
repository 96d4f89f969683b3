"""The WAL reader against real WAL files written by SQLite (Python's sqlite3 module).

The oracle is SQLite itself. A ``Tenant`` keeps a live WAL-mode database (with
``wal_autocheckpoint=0``, so the WAL only grows until a test checkpoints it) and a replica:
a copy of the database file taken when the WAL was empty, changed afterwards only by
applying what ``read_committed`` returns from copies of the ``-wal`` file. The replica must
then hold what SQLite shows of the live database (``iterdump`` and ``integrity_check``),
and after a full checkpoint the live database file must be byte for byte the replica.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import struct
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tenantdb.errors import ConfigurationError, ReplicationError
from tenantdb.replication.wal import (
    CommittedPages,
    WALPosition,
    WALRestartedError,
    _checksum,
    read_committed,
    wal_index_frames,
    wal_start,
)

MASK = 0xFFFFFFFF
NATIVE_BIG_ENDIAN = sys.byteorder == "big"


def reference_checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum exactly as fileformat2.html states it: a pair of words a turn."""
    order = "big" if big_endian else "little"
    for i in range(0, len(data), 8):
        s0 = (s0 + int.from_bytes(data[i : i + 4], order) + s1) & MASK
        s1 = (s1 + int.from_bytes(data[i + 4 : i + 8], order) + s0) & MASK
    return s0, s1


def frame_headers(wal: Path) -> list[tuple[int, ...]]:
    """The six fields of every whole frame header in ``wal``, valid or not."""
    data = wal.read_bytes()
    frame_size = struct.unpack_from(">I", data, 8)[0] + 24
    return [
        struct.unpack_from(">6I", data, offset)
        for offset in range(32, len(data) - frame_size + 1, frame_size)
    ]


def blob(k: int, size: int) -> bytes:
    """Deterministic incompressible-looking bytes, so hypothesis can replay an example."""
    return random.Random(k * 100_003 + size).randbytes(size)


def open_live(path: Path, page_size: int, *, cache_size: int | None = None) -> sqlite3.Connection:
    """Open (creating it if needed) a WAL-mode database that never checkpoints on its own."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")  # before the first write, or ignored
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    if cache_size is not None:
        # A tiny page cache makes SQLite spill the pages of a transaction to the WAL before
        # its commit.
        conn.execute(f"PRAGMA cache_size={cache_size}")
    return conn


def file_content(path: Path) -> tuple[list[str], list[tuple[str]]]:
    """The SQL dump and integrity check of a database file, read as it is on disk."""
    # immutable=1: read the file alone, without a -wal, -shm or any lock.
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return list(conn.iterdump()), conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def apply(replica: Path, got: CommittedPages) -> None:
    """Write the pages returned into the replica file, then cut it to the new size."""
    page_size = got.end.page_size
    assert list(got.pages) == sorted(got.pages)
    with open(replica, "r+b") as f:
        for pgno, data in got.pages.items():
            assert 1 <= pgno <= got.db_pages
            assert len(data) == page_size
            f.seek((pgno - 1) * page_size)
            f.write(data)
        f.truncate(got.db_pages * page_size)


def check_result_shape(got: CommittedPages, max_frames: int | None) -> None:
    """What holds of every result: the counts and positions agree with each other."""
    frame_size = got.start.page_size + 24
    assert got.end.offset - got.start.offset == got.frames * frame_size
    assert (got.end.salt1, got.end.salt2) == (got.start.salt1, got.start.salt2)
    if got.commits == 0:
        assert got.end == got.start
        assert got.pages == {}
        assert got.db_pages == 0
        assert got.frames == 0
    else:
        assert got.db_pages >= 1
        assert got.frames >= got.commits
    if max_frames is not None and got.frames > max_frames:
        # Past the bound only to finish the one transaction that is longer than it.
        assert got.commits == 1


class Tenant:
    """A live WAL-mode database, and a replica updated only from what the reader returns."""

    def __init__(self, directory: Path, page_size: int = 4096) -> None:
        self.directory = directory
        self.page_size = page_size
        self.db = directory / "live.db"
        self.wal = directory / "live.db-wal"
        self.conn = open_live(self.db, page_size)
        self.conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.replica = directory / "replica.db"
        shutil.copyfile(self.db, self.replica)
        self.position: WALPosition | None = None
        self._copies = 0
        self.restarts = 0

    def close(self) -> None:
        self.conn.close()

    def put(self, k: int, size: int, conn: sqlite3.Connection | None = None) -> None:
        (conn or self.conn).execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (k, blob(k, size)))

    def commit_rows(self, rows: Iterator[tuple[int, int]] | list[tuple[int, int]]) -> None:
        """One transaction inserting or replacing (key, blob size) rows."""
        self.conn.execute("BEGIN")
        for k, size in rows:
            self.put(k, size)
        self.conn.execute("COMMIT")

    def copy_wal(self) -> Path:
        """A stable copy of the -wal file as it is now (empty if there is none)."""
        self._copies += 1
        copy = self.directory / f"wal-copy-{self._copies}"
        if self.wal.exists():
            shutil.copyfile(self.wal, copy)
        else:
            copy.write_bytes(b"")
        return copy

    def sync(self, max_frames: int | None = None) -> list[CommittedPages]:
        """Ship every commit in the WAL now to the replica, as the replicator would."""
        copy = self.copy_wal()
        start = wal_start(copy)
        if start is None:
            return []
        if self.position is None or (start.salt1, start.salt2) != (
            self.position.salt1,
            self.position.salt2,
        ):
            if self.position is not None:
                with pytest.raises(WALRestartedError) as info:
                    read_committed(copy, self.position)
                assert info.value.current == start
                self.restarts += 1
            self.position = start
        results = []
        while True:
            got = read_committed(copy, self.position, max_frames=max_frames)
            check_result_shape(got, max_frames)
            assert got.start == self.position
            if got.commits == 0:
                return results
            apply(self.replica, got)
            self.position = got.end
            results.append(got)

    def live_content(self) -> tuple[list[str], list[tuple[str]]]:
        return list(self.conn.iterdump()), self.conn.execute("PRAGMA integrity_check").fetchall()

    def check(self) -> None:
        """The replica shows what SQLite shows of the live database."""
        replica = file_content(self.replica)
        assert replica[1] == [("ok",)]
        assert replica == self.live_content()
        page_count = self.conn.execute("PRAGMA page_count").fetchone()[0]
        assert self.replica.stat().st_size == page_count * self.page_size

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Ship everything, checkpoint the WAL fully, and compare the files byte for byte."""
        self.sync()
        self.check()
        busy, log, done = self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        assert busy == 0
        assert log == done  # every frame is in the database file now
        assert self.db.read_bytes() == self.replica.read_bytes()


@pytest.fixture
def tenant(tmp_path: Path) -> Iterator[Tenant]:
    t = Tenant(tmp_path)
    yield t
    t.close()


def commit_ends(wal: Path) -> list[WALPosition]:
    """The position after each commit of ``wal``, found one transaction per call."""
    position = wal_start(wal)
    assert position is not None
    ends = [position]
    while (got := read_committed(wal, position, max_frames=1)).commits:
        assert got.commits == 1
        position = got.end
        ends.append(position)
    return ends


# --- the checksum ----------------------------------------------------------------------


@given(
    words=st.integers(0, 40).flatmap(
        lambda n: st.lists(st.integers(0, MASK), min_size=2 * n, max_size=2 * n)
    ),
    big_endian=st.booleans(),
    s0=st.integers(0, MASK),
    s1=st.integers(0, MASK),
)
def test_checksum_is_the_documented_algorithm(
    words: list[int], big_endian: bool, s0: int, s1: int
) -> None:
    data = struct.pack(f"{'>' if big_endian else '<'}{len(words)}I", *words)
    assert _checksum(tuple(words), s0, s1) == reference_checksum(data, big_endian, s0, s1)


# --- the header --------------------------------------------------------------------------


def resign_header(data: bytearray) -> None:
    """Recompute the header checksum, so that only the field a test changed is wrong."""
    big_endian = struct.unpack_from(">I", data, 0)[0] == 0x377F0683
    struct.pack_into(">2I", data, 24, *reference_checksum(bytes(data[:24]), big_endian))


def test_wal_start_reads_a_real_header(tenant: Tenant) -> None:
    assert wal_start(tenant.wal) is None  # TRUNCATE left a 0-byte file
    tenant.commit_rows([(1, 10)])
    data = tenant.wal.read_bytes()
    position = wal_start(tenant.wal)
    assert position == WALPosition(
        salt1=struct.unpack_from(">I", data, 16)[0],
        salt2=struct.unpack_from(">I", data, 20)[0],
        offset=32,
        checksum=struct.unpack_from(">2I", data, 24),
        page_size=4096,
        # SQLite writes checksums in the byte order of the machine.
        big_endian=NATIVE_BIG_ENDIAN,
    )


@pytest.mark.parametrize(
    "damage",
    ["missing", "empty", "short", "magic", "version", "page_size", "page_size_big", "checksum"],
)
def test_no_valid_header(tenant: Tenant, tmp_path: Path, damage: str) -> None:
    tenant.commit_rows([(1, 10)])
    good = wal_start(tenant.wal)
    assert good is not None
    data = bytearray(tenant.wal.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "short":
        data = data[:31]
    elif damage == "magic":
        struct.pack_into(">I", data, 0, 0x377F0684)
        resign_header(data)
    elif damage == "version":
        struct.pack_into(">I", data, 4, 3007001)
        resign_header(data)
    elif damage == "page_size":
        struct.pack_into(">I", data, 8, 3000)
        resign_header(data)
    elif damage == "page_size_big":
        struct.pack_into(">I", data, 8, 131072)
        resign_header(data)
    elif damage == "checksum":
        data[27] ^= 0x01
    path = tmp_path / "damaged-wal"
    if damage != "missing":
        path.write_bytes(bytes(data))
    assert wal_start(path) is None
    with pytest.raises(ReplicationError) as info:
        read_committed(path, good)
    assert not isinstance(info.value, WALRestartedError)
    assert str(path) in str(info.value)


# --- random transactions -----------------------------------------------------------------

ROW_OP = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 150), st.integers(0, 6000)),
    st.tuples(st.just("delete"), st.integers(0, 150), st.integers(0, 40)),
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), st.lists(ROW_OP, min_size=1, max_size=6)),
        st.tuples(st.just("rollback"), st.lists(ROW_OP, min_size=1, max_size=6)),
        st.tuples(st.just("sync"), st.one_of(st.none(), st.integers(1, 6))),
        st.tuples(st.just("checkpoint"), st.sampled_from(["PASSIVE", "RESTART", "TRUNCATE"])),
        st.tuples(st.just("vacuum")),
    ),
    max_size=20,
)


def run_row_ops(tenant: Tenant, conn: sqlite3.Connection, ops: list[tuple[str, int, int]]) -> None:
    for op, k, n in ops:
        if op == "put":
            tenant.put(k, n, conn)
        else:
            conn.execute("DELETE FROM t WHERE k BETWEEN ? AND ?", (k, k + n))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(page_size=st.sampled_from([1024, 4096]), ops=OPS, last_max_frames=st.integers(1, 6))
def test_random_transactions(page_size: int, ops: list[tuple], last_max_frames: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tenant = Tenant(Path(d), page_size)
        # A second writer whose transactions spill to the WAL before they end.
        spiller = open_live(tenant.db, page_size, cache_size=2)
        try:
            for op, *args in ops:
                if op == "commit":
                    tenant.conn.execute("BEGIN")
                    run_row_ops(tenant, tenant.conn, args[0])
                    tenant.conn.execute("COMMIT")
                elif op == "rollback":
                    size = tenant.wal.stat().st_size if tenant.wal.exists() else 0
                    spiller.execute("BEGIN IMMEDIATE")
                    run_row_ops(tenant, spiller, args[0])
                    if tenant.wal.exists() and tenant.wal.stat().st_size > size:
                        event("a rolled-back transaction spilled frames")
                    spiller.execute("ROLLBACK")
                elif op == "sync":
                    if len(tenant.sync(max_frames=args[0])) > 1:
                        event("a sync took several reads")
                    tenant.check()
                elif op == "checkpoint":
                    tenant.checkpoint(args[0])
                else:
                    tenant.conn.execute("VACUUM")
            tenant.sync(max_frames=last_max_frames)
            tenant.check()
            if tenant.restarts:
                event("the WAL was restarted")
            tenant.checkpoint("TRUNCATE")
        finally:
            spiller.close()
            tenant.close()


# --- big and unfinished transactions -----------------------------------------------------


def test_transaction_of_thousands_of_frames_is_returned_whole(tmp_path: Path) -> None:
    tenant = Tenant(tmp_path, page_size=1024)
    try:
        tenant.commit_rows([(1, 100), (2, 100)])
        tenant.conn.execute("PRAGMA cache_size=5")
        tenant.conn.execute("BEGIN")
        for k in range(10, 3010):
            tenant.put(k, 900)
        wal_size = tenant.wal.stat().st_size
        assert wal_size > 1000 * 1048  # the transaction spilled before its commit
        tenant.conn.execute("COMMIT")
        tenant.commit_rows([(3, 100)])

        results = tenant.sync(max_frames=10)
        big = [got for got in results if got.frames > 10]
        assert len(big) == 1
        assert big[0].commits == 1
        assert big[0].frames >= 3000
        assert all(got.frames <= 10 for got in results if got is not big[0])
        assert sum(got.commits for got in results) == 3
        tenant.check()
        tenant.checkpoint()
    finally:
        tenant.close()


def test_uncommitted_transaction_is_not_returned(tenant: Tenant) -> None:
    tenant.commit_rows([(1, 100)])
    tenant.commit_rows([(2, 5000)])
    writer = open_live(tenant.db, 4096, cache_size=2)
    try:
        writer.execute("BEGIN IMMEDIATE")
        for k in range(100, 300):
            tenant.put(k, 3000, writer)
        copy = tenant.copy_wal()
        results = tenant.sync()
        assert sum(got.commits for got in results) == 2
        assert tenant.position is not None
        # The transaction in progress spilled valid frames (right salts, checksums that
        # chain), none a commit: only their missing commit frame keeps them out.
        after = frame_headers(copy)[(tenant.position.offset - 32) // (4096 + 24) :]
        salts = (tenant.position.salt1, tenant.position.salt2)
        spilled = [h for h in after if (h[2], h[3]) == salts]
        assert len(spilled) >= 10
        assert all(h[1] == 0 for h in spilled)
        tenant.check()  # the replica has the committed rows, and nothing of the rest

        nothing = read_committed(copy, tenant.position)
        assert nothing.commits == 0
        assert nothing.end == tenant.position

        writer.execute("COMMIT")
        results = tenant.sync()
        assert sum(got.commits for got in results) == 1
        tenant.check()
    finally:
        writer.close()


def test_rolled_back_transaction_is_not_returned(tenant: Tenant) -> None:
    tenant.commit_rows([(1, 100)])
    writer = open_live(tenant.db, 4096, cache_size=2)
    try:
        writer.execute("BEGIN IMMEDIATE")
        for k in range(100, 200):
            tenant.put(k, 3000, writer)
        writer.execute("ROLLBACK")
        tenant.sync()
        tenant.check()
        # The next transaction overwrites the rolled-back frames from the last commit on;
        # the rest of them no longer chain and are ignored.
        tenant.commit_rows([(2, 100)])
        assert len(frame_headers(tenant.wal)) > 10
        tenant.sync()
        tenant.check()
        tenant.checkpoint()
    finally:
        writer.close()


# --- max_frames --------------------------------------------------------------------------


def test_max_frames_stops_at_the_last_commit_within_the_bound(tenant: Tenant) -> None:
    rng = random.Random(7)
    for k in range(12):
        tenant.commit_rows([(k * 100 + i, rng.choice([10, 3000, 9000])) for i in range(k % 4 + 1)])
    copy = tenant.copy_wal()
    ends = commit_ends(copy)
    frame_size = 4096 + 24
    cumulative = [(end.offset - 32) // frame_size for end in ends]  # frames up to each commit
    everything = read_committed(copy, ends[0])
    assert everything.end == ends[-1]
    assert everything.commits == len(ends) - 1
    for bound in range(1, cumulative[-1] + 2):
        got = read_committed(copy, ends[0], max_frames=bound)
        within = [i for i, n in enumerate(cumulative) if 0 < n <= bound]
        expected = within[-1] if within else 1  # the first commit, however long
        assert got.end == ends[expected]
        assert got.commits == expected
        assert got.frames == cumulative[expected]
    with pytest.raises(ConfigurationError):
        read_committed(copy, ends[0], max_frames=0)


def test_reading_does_not_hold_the_file_in_memory(tenant: Tenant) -> None:
    # Hundreds of commits rewriting the same row: a file of a megabyte, a result of a page.
    # (Small because tracemalloc slows the checksum loop some 30 times.)
    for i in range(260):
        tenant.commit_rows([(1, 3000 + i)])
    copy = tenant.copy_wal()
    size = copy.stat().st_size
    assert size > 2**20
    start = wal_start(copy)
    assert start is not None
    tracemalloc.start()
    try:
        got = read_committed(copy, start)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.commits == 260
    assert got.end.offset == size
    assert len(got.pages) <= 3
    assert peak < 256 * 1024


# --- restarts ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["PASSIVE", "RESTART", "TRUNCATE"])
def test_restart_after_checkpoint(tenant: Tenant, mode: str) -> None:
    for k in range(5):
        tenant.commit_rows([(k, 2000), (k + 50, 9000)])
    tenant.sync()
    old = tenant.position
    assert old is not None
    tenant.checkpoint(mode)

    copy = tenant.copy_wal()
    if mode == "TRUNCATE":
        # No WAL at all until the next write: nothing to read, and not a restart either.
        assert wal_start(copy) is None
        with pytest.raises(ReplicationError) as info:
            read_committed(copy, old)
        assert not isinstance(info.value, WALRestartedError)
    else:
        # Same WAL until the next writer restarts it: nothing new since the old position.
        assert read_committed(copy, old).commits == 0

    tenant.commit_rows([(1, 100)])
    copy = tenant.copy_wal()
    new = wal_start(copy)
    assert new is not None
    assert (new.salt1, new.salt2) != (old.salt1, old.salt2)
    assert new.salt1 == (old.salt1 + 1) & MASK  # as wal.c documents
    with pytest.raises(WALRestartedError) as restarted:
        read_committed(copy, old)
    assert restarted.value.current == new
    got = read_committed(copy, new)
    assert got.commits == 1
    if mode != "TRUNCATE":
        # The older incarnation's frames follow the new ones; their salts stop the reader.
        assert copy.stat().st_size > got.end.offset
    apply(tenant.replica, got)
    tenant.position = got.end
    tenant.check()
    tenant.checkpoint()


def test_position_that_does_not_fit_the_wal(tenant: Tenant) -> None:
    tenant.commit_rows([(1, 100)])
    tenant.commit_rows([(2, 100)])
    copy = tenant.copy_wal()
    ends = commit_ends(copy)
    first = ends[1]
    frame_size = 4096 + 24
    bad_positions = [
        replace(first, page_size=1024),
        replace(first, big_endian=not first.big_endian),
        replace(first, offset=first.offset + 8),
        replace(first, offset=0),
        replace(first, checksum=(1, 2)),
        replace(first, offset=ends[-1].offset + 10 * frame_size),
    ]
    headers = frame_headers(copy)
    if headers[0][1] == 0:
        # After a frame that is not a commit.
        bad_positions.append(replace(first, offset=32 + frame_size, checksum=headers[0][4:]))
    for position in bad_positions:
        with pytest.raises(ReplicationError) as info:
            read_committed(copy, position)
        assert not isinstance(info.value, WALRestartedError)
    assert read_committed(copy, first).end == ends[-1]


def test_a_header_rewritten_with_the_same_salts_before_the_first_frame_is_followed(
    tenant: Tenant,
) -> None:
    # After a full checkpoint, a transaction that spills frames restarts the WAL (new salts,
    # a header written by that connection), then rolls back. The next commit, from another
    # connection, writes the header again with the same salts but its own checkpoint
    # sequence number: the header's checksum changes under a position at offset 32.
    tenant.commit_rows([(1, 100)])
    tenant.checkpoint("PASSIVE")
    tenant.commit_rows([(1, 0)])  # restarts the WAL from this connection
    tenant.checkpoint("PASSIVE")
    spiller = open_live(tenant.db, tenant.page_size, cache_size=2)
    spiller.execute("BEGIN IMMEDIATE")
    for k in range(50):
        tenant.put(100 + k, 3000, spiller)
    spiller.execute("ROLLBACK")
    spiller.close()
    before = wal_start(tenant.copy_wal())
    assert before is not None
    tenant.commit_rows([(2, 100)])
    copy = tenant.copy_wal()
    after = wal_start(copy)
    assert after is not None
    assert (after.salt1, after.salt2) == (before.salt1, before.salt2)
    assert after.checksum != before.checksum  # the header was written again
    got = read_committed(copy, before)
    assert got.commits == 1
    assert read_committed(copy, got.end).commits == 0


# --- damage ------------------------------------------------------------------------------


def committed_history(tenant: Tenant, transactions: int) -> list[tuple[list[str], list]]:
    """Commit transactions of 1 to 3 frames; return the live content after each."""
    history = [tenant.live_content()]
    for k in range(transactions):
        tenant.commit_rows([(k, 100 + 2500 * (k % 3))])
        history.append(tenant.live_content())
    return history


@pytest.mark.parametrize("cut", [1, 24, 30, 4096])
def test_torn_last_frame(tenant: Tenant, cut: int) -> None:
    history = committed_history(tenant, 6)
    copy = tenant.copy_wal()
    ends = commit_ends(copy)
    assert len(ends) == 7
    with open(copy, "r+b") as f:
        f.truncate(ends[-1].offset - cut)  # in the middle of the last commit frame
    got = read_committed(copy, ends[0])
    assert got.end == ends[-2]
    assert got.commits == 5
    apply(tenant.replica, got)
    assert file_content(tenant.replica) == history[-2]


@pytest.mark.parametrize(
    ("where", "byte"),
    [
        ("page", 24 + 1000),  # the page
        ("page", 24 + 4095),
        ("pgno", 3),
        ("commit", 7),  # the database size of a commit frame, or 0 made non-zero
        ("salt", 9),
        ("checksum", 17),
        ("checksum", 23),
    ],
)
def test_damaged_frame_stops_the_reader_at_the_commit_before(
    tenant: Tenant, where: str, byte: int
) -> None:
    history = committed_history(tenant, 8)
    copy = tenant.copy_wal()
    ends = commit_ends(copy)
    frame_size = 4096 + 24
    clean = copy.read_bytes()
    damaged = tenant.directory / "damaged-wal"
    for txn in (1, 4, 8):  # the first, a middle and the last transaction
        first = (ends[txn - 1].offset - 32) // frame_size
        last = (ends[txn].offset - 32) // frame_size - 1
        for frame in sorted({first, last}):
            data = bytearray(clean)
            data[32 + frame * frame_size + byte] ^= 0x40
            damaged.write_bytes(bytes(data))
            got = read_committed(damaged, ends[0])
            assert got.end == ends[txn - 1], (txn, frame)
            assert got.commits == txn - 1
    # The replica built from the last damaged copy is the database before that transaction.
    apply(tenant.replica, got)
    assert file_content(tenant.replica) == history[7]


# --- page sizes, shrinking, byte order ---------------------------------------------------


@pytest.mark.parametrize("page_size", [1024, 4096, 65536])
def test_page_sizes(tmp_path: Path, page_size: int) -> None:
    tenant = Tenant(tmp_path, page_size)
    try:
        assert tenant.conn.execute("PRAGMA page_size").fetchone()[0] == page_size
        tenant.commit_rows([(k, 50 * k) for k in range(40)])
        tenant.commit_rows([(k, 70_000) for k in range(3)])  # overflow pages at any size
        tenant.conn.execute("DELETE FROM t WHERE k % 3 = 0")
        # Live, not a copy: nothing writes while it reads.
        position = wal_start(tenant.wal)
        assert position is not None
        assert position.page_size == page_size
        got = read_committed(tenant.wal, position)
        assert got.commits == 3
        assert all(len(page) == page_size for page in got.pages.values())
        apply(tenant.replica, got)
        tenant.position = got.end
        tenant.check()
        tenant.checkpoint()
    finally:
        tenant.close()


def test_database_that_shrinks(tenant: Tenant) -> None:
    tenant.commit_rows([(k, 4000) for k in range(600)])
    results = tenant.sync()
    grown = results[-1].db_pages
    assert grown > 600
    tenant.conn.execute("DELETE FROM t WHERE k > 20")
    tenant.conn.execute("VACUUM")
    results = tenant.sync(max_frames=1)  # the DELETE and the VACUUM, one commit each
    assert [got.commits for got in results] == [1, 1]
    assert results[0].db_pages == grown  # a DELETE frees pages but keeps them
    shrunk = results[1].db_pages
    assert shrunk < 40
    assert shrunk == tenant.conn.execute("PRAGMA page_count").fetchone()[0]
    assert max(results[1].pages) <= shrunk
    tenant.check()
    assert tenant.replica.stat().st_size == shrunk * 4096
    tenant.checkpoint()


def test_growth_and_shrink_in_one_read_leaves_out_pages_past_the_end(tenant: Tenant) -> None:
    tenant.commit_rows([(k, 4000) for k in range(300)])
    tenant.conn.execute("DELETE FROM t WHERE k > 5")
    tenant.conn.execute("VACUUM")
    [got] = tenant.sync()
    assert got.commits == 3
    assert got.db_pages == tenant.conn.execute("PRAGMA page_count").fetchone()[0]
    assert max(got.pages) <= got.db_pages
    tenant.check()
    tenant.checkpoint()


def to_big_endian_checksums(src: Path, dst: Path) -> None:
    """Rewrite a WAL of little-endian checksums as a big-endian machine would have written it.

    Every frame of ``src`` must be valid: each is re-signed, chained from the header.
    """
    data = bytearray(src.read_bytes())
    assert struct.unpack_from(">I", data, 0)[0] == 0x377F0682
    struct.pack_into(">I", data, 0, 0x377F0683)
    checksum = reference_checksum(bytes(data[:24]), True)
    struct.pack_into(">2I", data, 24, *checksum)
    frame_size = struct.unpack_from(">I", data, 8)[0] + 24
    for offset in range(32, len(data), frame_size):
        signed = bytes(data[offset : offset + 8]) + bytes(data[offset + 24 : offset + frame_size])
        checksum = reference_checksum(signed, True, *checksum)
        struct.pack_into(">2I", data, offset + 16, *checksum)
    dst.write_bytes(bytes(data))


@pytest.mark.skipif(NATIVE_BIG_ENDIAN, reason="SQLite writes big-endian checksums here already")
def test_big_endian_checksums(tenant: Tenant) -> None:
    for k in range(4):
        tenant.commit_rows([(k, 6000), (k + 10, 100)])
    copy = tenant.copy_wal()
    start = wal_start(copy)
    assert start is not None
    little = read_committed(copy, start)
    assert little.end.offset == copy.stat().st_size  # every frame valid: safe to re-sign

    converted = tenant.directory / "converted-wal"
    to_big_endian_checksums(copy, converted)
    big_start = wal_start(converted)
    assert big_start is not None
    assert big_start.big_endian
    big = read_committed(converted, big_start)
    assert big.pages == little.pages
    assert (big.db_pages, big.commits, big.frames) == (
        little.db_pages,
        little.commits,
        little.frames,
    )
    assert big.end.offset == little.end.offset

    # SQLite itself accepts the converted WAL: it recovers every transaction from it.
    other = tenant.directory / "other.db"
    shutil.copyfile(tenant.db, other)
    shutil.copyfile(converted, tenant.directory / "other.db-wal")
    conn = sqlite3.connect(other)
    try:
        assert list(conn.iterdump()) == tenant.live_content()[0]
    finally:
        conn.close()


# --- the wal-index ------------------------------------------------------------------------


def test_the_wal_index_bounds_reading_to_committed_frames_without_checksums(
    tenant: Tenant,
) -> None:
    for n in range(20):
        tenant.commit_rows([(n, 500)])
    shm = Path(f"{tenant.db}-shm")
    start = wal_start(tenant.wal)
    assert start is not None
    committed = wal_index_frames(shm, (start.salt1, start.salt2))
    verified = read_committed(tenant.wal, start)
    assert committed == verified.frames
    indexed = read_committed(tenant.wal, start, committed_frames=committed)
    assert (indexed.pages, indexed.end, indexed.commits) == (
        verified.pages,
        verified.end,
        verified.commits,
    )
    # Fewer committed frames than the file holds (a commit in progress): none past them.
    first = read_committed(tenant.wal, start, max_frames=1)
    bounded = read_committed(tenant.wal, start, committed_frames=first.frames)
    assert bounded.end == first.end


def test_a_wal_index_that_cannot_be_trusted_is_not_used(tenant: Tenant) -> None:
    tenant.commit_rows([(1, 500)])
    shm = Path(f"{tenant.db}-shm")
    start = wal_start(tenant.wal)
    assert start is not None
    assert wal_index_frames(shm, (start.salt1, start.salt2)) is not None
    assert wal_index_frames(shm, (start.salt1 + 1, start.salt2)) is None  # another WAL
    damaged = tenant.directory / "damaged-shm"
    data = bytearray(shm.read_bytes()[:96])
    data[16] ^= 0xFF  # mxFrame in both copies: the header checksum no longer holds
    data[48 + 16] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert wal_index_frames(damaged, (start.salt1, start.salt2)) is None
    torn = tenant.directory / "torn-shm"
    data = bytearray(shm.read_bytes()[:96])
    data[16] ^= 0xFF  # the two copies disagree: a header being rewritten
    torn.write_bytes(bytes(data))
    assert wal_index_frames(torn, (start.salt1, start.salt2)) is None
    assert wal_index_frames(tenant.directory / "missing-shm", (start.salt1, start.salt2)) is None
