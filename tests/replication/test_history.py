"""The history of a tenant in the bucket: what was published, and what retention may delete."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tenantdb.errors import ListingBehindError, PointInTimeError, ReplicationError
from tenantdb.protocol.lease import ObservedLock
from tenantdb.protocol.lockfile import LockRecord, LogPointer, now_ms
from tenantdb.replication import compaction
from tenantdb.replication.checksum import PageHashes, database_page_size
from tenantdb.replication.history import (
    History,
    SnapshotEntry,
    Takeover,
    read_history,
    takeover_key,
)
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.segment import Segment, SegmentHeader, encode_segment, segment_key
from tenantdb.storage.base import Bucket, ObjectInfo
from tests.replication.test_pitr import PREFIX, Recorder, machine, read_rows


def orphan_segment(before: Path, after: Path, *, generation: int, index: int) -> bytes:
    """A valid segment taking ``before`` to ``after``, as a holder about to be fenced makes."""
    page_size = database_page_size(before)
    old, new = before.read_bytes(), after.read_bytes()
    pages = tuple(
        (n // page_size + 1, new[n : n + page_size])
        for n in range(0, len(new), page_size)
        if new[n : n + page_size] != old[n : n + page_size]
    )
    header = SegmentHeader(
        tenant="acme",
        generation=generation,
        index=index,
        page_size=page_size,
        db_pages=len(new) // page_size,
        timestamp_ms=now_ms(),
        prev_state=PageHashes.of_file(before, page_size).state,
        state=PageHashes.of_file(after, page_size).state,
        commits=1,
    )
    return encode_segment(Segment(header, pages))


async def test_a_fenced_generations_last_upload_is_never_restored(
    bucket: Bucket, tmp_path: Path
) -> None:
    recorder = Recorder(5)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 3)
        tail = tdb.lease.record.log.tail  # type: ignore[union-attr]
    # Generation 1 made one more segment whose CAS never landed: an orphan in the bucket.
    published = tmp_path / "published.sqlite3"
    await restore_at(bucket, "acme", published, prefix=PREFIX)
    unpublished = tmp_path / "unpublished.sqlite3"
    shutil.copy(published, unpublished)
    conn = sqlite3.connect(unpublished, isolation_level=None)
    conn.execute("INSERT INTO items (id, note) VALUES (999, 'never acknowledged')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    orphan = segment_key(PREFIX, "acme", 1, tail + 1)
    body = orphan_segment(published, unpublished, generation=1, index=tail + 1)
    await bucket.put(orphan, body, if_none_match="*")
    # Generation 2 takes over at that tail and publishes nothing of its own.
    async with machine(bucket, tmp_path, "m2"):
        pass
    history = await read_history(bucket, "acme", prefix=PREFIX)
    entry = next(s for s in history.segments if s.key == orphan)
    assert not entry.published
    assert [t.tail for t in history.takeovers if t.generation == 2] == [tail]
    out = tmp_path / "out.sqlite3"
    await restore_at(bucket, "acme", out, prefix=PREFIX, at=datetime.now(UTC))
    assert read_rows(out) == recorder.rows


async def test_retention_keeps_every_moment_after_the_cutoff_restorable(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compaction, "MERGE_SINGLES", 4)
    recorder = Recorder(11)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 10)
        await tdb.checkpoint()
        await recorder.changes(tdb, 10)
        time.sleep(1.1)  # Last-Modified has whole seconds: the cutoff is clear of both sides
        cutoff = datetime.now(UTC)
        time.sleep(1.1)
        await recorder.changes(tdb, 10)
        shipper = tdb._shipper
        assert shipper is not None
        shipper.garbage.retention = (datetime.now(UTC) - cutoff).total_seconds()
        before = {o.key for o in await bucket.list(f"{PREFIX}acme/")}
        deleted = await shipper.collect_garbage()
        after = {o.key for o in await bucket.list(f"{PREFIX}acme/")}
        recorder.stop()
    assert set(deleted) == before - after
    history = await read_history(bucket, "acme", prefix=PREFIX)
    earliest = history.restorable_from()
    assert earliest is not None
    assert earliest <= cutoff
    # The segments before the snapshot, and those a merge replaced, went.
    assert any("/log/" in key for key in deleted)
    assert takeover_key(PREFIX, "acme", 1) not in deleted  # generation 1 still has objects
    checked = 0
    for number, stretch in enumerate(recorder.quiet):
        moment = stretch.start + (stretch.end - stretch.start) / 2
        out = tmp_path / f"out-{number}.sqlite3"
        if moment < earliest:
            with pytest.raises(PointInTimeError):
                await restore_at(bucket, "acme", out, prefix=PREFIX, at=moment)
            continue
        await restore_at(bucket, "acme", out, prefix=PREFIX, at=moment)
        assert read_rows(out) == stretch.rows, moment.isoformat()
        checked += 1
    assert checked >= 20
    with pytest.raises(PointInTimeError):
        await restore_at(bucket, "acme", tmp_path / "x", prefix=PREFIX, at=earliest - timedelta(1))


# --- hostile objects: any bytes under the tenant's prefix -------------------------------------


def test_takeover_record_of_deep_nesting_is_a_typed_error() -> None:
    key = takeover_key(PREFIX, "acme", 2)
    with pytest.raises(ReplicationError) as info:
        Takeover.parse(b"[" * 60_000, key=key)
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize(
    "record",
    [
        {"at": "2026-12-01 10:00"},
        {"at": "99999-01-01T00:00:00+00:00"},
        {"tail": 10**400},
        {"tail": -1},
        {"owner": "m\x1b[2J"},
        {"generation": 3},  # not the generation its key names
        {"replaces": 2},  # not an earlier generation
    ],
)
def test_takeover_record_with_a_bad_field_is_a_typed_error(record: dict[str, Any]) -> None:
    key = takeover_key(PREFIX, "acme", 2)
    valid = {
        "generation": 2,
        "owner": "m2",
        "region": "ams",
        "at": "2026-12-01T10:00:00.000+00:00",
        "tail": 4,
        "snapshot": None,
        "claim": "c",
    }
    assert Takeover.parse(json.dumps(valid).encode(), key=key).tail == 4
    with pytest.raises(ReplicationError) as info:
        Takeover.parse(json.dumps(valid | record).encode(), key=key)
    assert info.value.key == key


async def test_gc_survives_snapshot_key_with_15_digit_time(bucket: Bucket, tmp_path: Path) -> None:
    odd = f"{PREFIX}acme/snapshots/00000001-00000001-000000000001-999999999999999-ab.sqlite3"
    async with machine(bucket, tmp_path, "m1") as tdb:
        await Recorder(3).changes(tdb, 2)
        await bucket.put(odd, b"")
        shipper = tdb._shipper
        assert shipper is not None
        await shipper.collect_garbage()  # a ValueError from fromtimestamp before
        history = await read_history(bucket, "acme", prefix=PREFIX)
        assert odd not in {s.key for s in history.snapshots}  # not a key tenantdb made
    assert odd in {info.key for info in await bucket.list(PREFIX)}  # nor deleted as one


def _forge_takeover(generation: int, tail: int) -> bytes:
    return json.dumps(
        {
            "generation": generation,
            "owner": "forged",
            "region": "ams",
            "at": "2026-12-01T10:00:00.000+00:00",
            "tail": tail,
            "snapshot": None,
            "claim": "forged",
        }
    ).encode()


async def test_history_with_forged_huge_tail_plans_without_hanging(
    bucket: Bucket, tmp_path: Path
) -> None:
    async with machine(bucket, tmp_path, "m1") as tdb:
        await Recorder(4).changes(tdb, 2)
    # A record at the generation the next holder will take, and one empty key far away.
    await bucket.put(takeover_key(PREFIX, "acme", 2), _forge_takeover(2, 10**12))
    await bucket.put(f"{PREFIX}acme/log/00000001/000999999999.seg", b"")
    history = await read_history(bucket, "acme", prefix=PREFIX)
    result: list[list[str]] = []
    # In a daemon thread: a loop of 10^9 steps must not keep the test process alive.
    planner = threading.Thread(
        target=lambda: result.append(history.expendable(datetime.now(UTC), keep_snapshots=1)),
        daemon=True,
    )
    planner.start()
    planner.join(timeout=5)
    assert not planner.is_alive(), "retention planning hangs on a forged takeover record"
    [expendable] = result
    assert not history.named() & set(expendable)
    far = f"{PREFIX}acme/log/00000001/000999999999.seg"
    assert far not in {s.key for s in history.segments if s.published}


async def test_a_takeover_record_past_the_log_is_refused_naming_it(
    bucket: Bucket, tmp_path: Path
) -> None:
    async with machine(bucket, tmp_path, "m1") as tdb:
        await Recorder(5).changes(tdb, 2)
    async with machine(bucket, tmp_path, "m2"):
        pass
    key = takeover_key(PREFIX, "acme", 2)
    await bucket.put(key, _forge_takeover(2, 10**12))  # overwritten by hand
    with pytest.raises(ReplicationError) as info:
        await read_history(bucket, "acme", prefix=PREFIX)
    assert info.value.key == key


async def test_next_holder_moves_past_a_forged_takeover_record_at_its_generation(
    bucket: Bucket, tmp_path: Path
) -> None:
    recorder = Recorder(6)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 2)
    forged = takeover_key(PREFIX, "acme", 2)
    await bucket.put(forged, _forge_takeover(2, 10**12))
    # Before, every start of the next holder failed on this record (exit 3 in a process).
    async with machine(bucket, tmp_path, "m2") as tdb:
        assert tdb.lease.record is not None
        assert tdb.lease.record.generation == 3
        await recorder.changes(tdb, 1)
    history = await read_history(bucket, "acme", prefix=PREFIX)
    assert [(t.generation, t.replaces) for t in history.takeovers] == [(1, None), (3, 2)]
    out = tmp_path / "out.sqlite3"
    await restore_at(bucket, "acme", out, prefix=PREFIX, at=datetime.now(UTC))
    assert read_rows(out) == recorder.rows


def test_a_later_generations_snapshot_stamped_earlier_is_still_the_later_base() -> None:
    """Simulation seed 1119: a rollback's snapshot is stamped by the bucket's clock, ahead
    of the next holder's, whose snapshots then carried earlier times. Bases were ordered by
    time: a restore as of a moment after all of them started from the rollback's snapshot
    and missed what the next holder wrote, silently older."""
    t0 = datetime(2027, 1, 15, 8, tzinfo=UTC)

    def snapshot(generation: int, seq: int, base: int, ms: int) -> SnapshotEntry:
        return SnapshotEntry(
            key=f"{PREFIX}acme/snapshots/{generation:08d}-{seq:08d}-{base:012d}.sqlite3",
            size=1,
            last_modified=t0,
            generation=generation,
            seq=seq,
            base=base,
            taken_at=t0 + timedelta(milliseconds=ms),
            published=True,
        )

    rollback = snapshot(2, 6, 3, ms=289)
    next_holder = snapshot(3, 11, 4, ms=199)
    history = History("acme", PREFIX, None, (rollback, next_holder), (), ())
    base = history.base_at(t0 + timedelta(seconds=1))
    assert base is not None
    assert base.snapshot == next_holder
    assert history.restorable_from() == next_holder.taken_at


def test_retention_keeps_a_snapshot_made_after_the_cutoff_that_the_bucket_stamped_before() -> None:
    """Simulation seed 13415: a snapshot taken instead of segments (its commits are in no
    segment) 0.66 s after the cutoff, stamped by a bucket whose clock ran behind and to
    the second, was collected; a rollback to a moment after it, within the retention, then
    published an older state without a word."""
    t0 = datetime(2027, 1, 15, 8, tzinfo=UTC)

    def snapshot(
        generation: int, seq: int, base: int, taken: float, stamped: float
    ) -> SnapshotEntry:
        return SnapshotEntry(
            key=f"{PREFIX}acme/snapshots/{generation:08d}-{seq:08d}-{base:012d}.sqlite3",
            size=1,
            last_modified=t0 + timedelta(seconds=stamped),
            generation=generation,
            seq=seq,
            base=base,
            taken_at=t0 + timedelta(seconds=taken),
            published=True,
        )

    first = snapshot(1, 2, 1, taken=0.0, stamped=0.0)
    instead_of_segments = snapshot(1, 7, 5, taken=10.344, stamped=8.0)
    newest = snapshot(2, 10, 5, taken=13.658, stamped=12.0)
    history = History("acme", PREFIX, None, (first, instead_of_segments, newest), (), ())
    cutoff = t0 + timedelta(seconds=9.687)
    expendable = history.expendable(cutoff, keep_snapshots=1)
    assert instead_of_segments.key not in expendable
    assert first.key not in expendable  # the anchor: a restore as of the cutoff starts there
    base = history.base_at(t0 + timedelta(seconds=10.5))
    assert base is not None
    assert base.snapshot == instead_of_segments


def test_retention_keeps_the_takeover_record_of_segments_lock_json_carries_inline() -> None:
    """Simulation seed 200013: generation 1's segments rode inline in lock.json (no object
    yet) when generation 2 took over; retention saw no object of generation 1 and deleted
    its takeover record, so the history began at generation 2's takeover and a restore as
    of a moment with an acknowledged write was refused."""
    t0 = datetime(2027, 1, 15, 8, tzinfo=UTC)
    pointer = LogPointer(base=1, tail=2, state="0" * 16, db_pages=2, runs=((1, 1),))
    record = LockRecord(
        tenant="acme",
        owner="m1",
        region=None,
        generation=2,
        seq=9,
        ttl_seconds=1.0,
        log=pointer.with_inline([b"one", b"two"]),
    )
    info = ObjectInfo(f"{PREFIX}acme/lock.json", "etag", 1, t0 + timedelta(seconds=5))
    takeovers = (
        Takeover(1, "m1", None, t0, tail=0, snapshot=None),
        Takeover(2, "m1", None, t0 + timedelta(seconds=5), tail=2, snapshot=None),
    )
    history = History("acme", PREFIX, ObservedLock(record, info), (), (), takeovers)
    expendable = history.expendable(t0 + timedelta(seconds=2), keep_snapshots=1)
    assert takeover_key(PREFIX, "acme", 1) not in expendable
    assert history.restorable_from() == t0


class Lagging:
    """A bucket whose LIST answers what ``listing`` makes of the true one, as a LIST that
    lags behind writes does."""

    def __init__(
        self, inner: Bucket, listing: Callable[[list[ObjectInfo]], list[ObjectInfo]]
    ) -> None:
        self.inner = inner
        self.listing = listing

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return self.listing(await self.inner.list(prefix))


def hiding(hidden: Callable[[str], bool]) -> Callable[[list[ObjectInfo]], list[ObjectInfo]]:
    """A listing that leaves out the keys ``hidden`` picks."""
    return lambda infos: [info for info in infos if not hidden(info.key)]


async def _two_generations_with_snapshots(bucket: Bucket, tmp_path: Path) -> None:
    recorder = Recorder(12)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 2)
        await tdb.checkpoint()
    async with machine(bucket, tmp_path, "m2") as tdb:
        await recorder.changes(tdb, 2)
        await tdb.checkpoint()


async def test_a_listing_that_lags_behind_a_takeover_still_classifies_the_generation_before(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    """Simulation seed 229249: the LIST did not show generation 2's takeover record yet,
    so generation 1's snapshot was judged against lock.json (generation 2's snapshot),
    counted as never published, and a rollback started from an older base: silently older."""
    await _two_generations_with_snapshots(local_bucket, tmp_path)
    lagging = Lagging(local_bucket, hiding(lambda key: "/history/00000002" in key))
    history = await read_history(lagging, "acme", prefix=PREFIX)  # type: ignore[arg-type]
    first = [s for s in history.snapshots if s.generation == 1]
    assert first
    assert all(s.published for s in first)
    assert [t.generation for t in history.takeovers] == [1, 2]


async def test_a_point_in_time_restore_refuses_a_listing_without_lock_jsons_snapshot(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    """Simulation seed 210996: the LIST did not show the snapshot lock.json names yet; the
    restore started from the snapshot before it, ended where lock.json's log starts, and
    returned that older state as the state asked for."""
    await _two_generations_with_snapshots(local_bucket, tmp_path)
    stored = await local_bucket.get(f"{PREFIX}acme/lock.json")
    named = LockRecord.parse(stored.body, tenant="acme", key=f"{PREFIX}acme/lock.json").snapshot
    assert named is not None
    lagging = Lagging(local_bucket, hiding(lambda key: key == named.key))
    out = tmp_path / "out.sqlite3"
    with pytest.raises(ListingBehindError) as info:
        await restore_at(lagging, "acme", out, prefix=PREFIX, at=datetime.now(UTC))  # type: ignore[arg-type]
    assert info.value.key == named.key
    assert not out.exists()


async def test_a_takeover_record_deleted_after_the_listing_is_left_out(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    """Simulation seed 300104: retention deleted a takeover record between the LIST that
    showed it and its GET; the 404 failed the whole restore, naming the record."""
    await _two_generations_with_snapshots(local_bucket, tmp_path)
    listed = await local_bucket.list(f"{PREFIX}acme/")
    gone = takeover_key(PREFIX, "acme", 1)
    await local_bucket.delete(gone)
    stale = Lagging(local_bucket, lambda infos: listed)
    history = await read_history(stale, "acme", prefix=PREFIX)  # type: ignore[arg-type]
    assert [t.generation for t in history.takeovers] == [2]


async def test_retention_deletes_nothing_on_a_listing_that_lags_behind_lock_json(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    """Simulation seed 311971: the LIST did not show yet the packs and the snapshot the
    holder had just published; retention saw no object of the older generations and
    deleted their takeover records, and restores within the retention were refused."""
    recorder = Recorder(13)
    async with machine(local_bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 2)
        await tdb.checkpoint()
        shipper = tdb._shipper
        assert shipper is not None
        named = tdb.lease.record.snapshot  # type: ignore[union-attr]
        assert named is not None
        shipper.garbage.retention = 0  # everything not needed is due
        # (The holder's own collections go through the lagging listing too.)
        tdb.lease.bucket = Lagging(local_bucket, hiding(lambda key: key == named.key))  # type: ignore[assignment]
        before = {o.key for o in await local_bucket.list(f"{PREFIX}acme/")}
        with pytest.raises(ListingBehindError):
            await shipper.collect_garbage()
        after = {o.key for o in await local_bucket.list(f"{PREFIX}acme/")}
        tdb.lease.bucket = local_bucket
        recorder.stop()
    assert after == before
