"""The history of a tenant in the bucket: what was published, and what retention may delete."""

from __future__ import annotations

import shutil
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tenantdb.errors import PointInTimeError
from tenantdb.lockfile import now_ms
from tenantdb.replication import compaction
from tenantdb.replication.checksum import PageHashes, database_page_size
from tenantdb.replication.history import read_history, takeover_key
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.segment import Segment, SegmentHeader, encode_segment, segment_key
from tenantdb.storage.base import Bucket
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
        shipper.retention = (datetime.now(UTC) - cutoff).total_seconds()
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
