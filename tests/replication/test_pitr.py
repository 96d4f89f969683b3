"""Point-in-time restore on both bucket backends: any recorded moment comes back exactly."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Settings
from tenantdb.errors import PointInTimeError, ReplicationError
from tenantdb.machine.database import TenantDB
from tenantdb.replication import carrier, compaction
from tenantdb.replication.history import read_history
from tenantdb.replication.log_objects import LogObjects
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.restore import fetch_segment
from tenantdb.replication.segment import chunk_key, segment_key
from tenantdb.storage.base import Bucket

MIGRATIONS = ["CREATE TABLE items (id INTEGER PRIMARY KEY, note TEXT)"]
PREFIX = "tenants/"
Rows = list[tuple[int, str]]


def settings(tmp_path: Path, machine: str, **kwargs: Any) -> Settings:
    values: dict[str, Any] = {
        "tenant": "acme",
        "machine_id": machine,
        "data_dir": tmp_path / machine,
        "lease_ttl": 3,
        "checkpoint_interval": 0,
        "sync_interval": 0.05,  # the shipper's loop runs, so merges happen on their own
    }
    return Settings(**(values | kwargs))


@dataclass(frozen=True)
class Quiet:
    """A stretch of time in which the tenant's database was ``rows``, unchanged."""

    start: datetime
    end: datetime
    rows: Rows


def now() -> datetime:
    return datetime.now(UTC)


def read_rows(path: Path) -> Rows:
    conn = sqlite3.connect(path)
    try:
        return [tuple(r) for r in conn.execute("SELECT id, note FROM items ORDER BY id")]
    finally:
        conn.close()


def machine(bucket: Bucket, tmp_path: Path, name: str) -> TenantDB:
    """A machine serving the tenant ``acme`` (``async with`` it)."""
    return TenantDB(settings(tmp_path, name), migrations=MIGRATIONS, bucket=bucket)


class Recorder:
    """Changes the database through a TenantDB and notes what it was between changes."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.rows: Rows = []
        self.quiet: list[Quiet] = []
        self._since: datetime | None = None
        self._next_id = 1

    def _close_stretch(self) -> None:
        if self._since is not None:
            self.quiet.append(Quiet(self._since, now(), list(self.rows)))
            self._since = None

    async def changes(self, tdb: TenantDB, count: int) -> None:
        """Make ``count`` random changes (insert, update, delete), each synced."""
        for _ in range(count):
            await self._change(tdb)

    async def _change(self, tdb: TenantDB) -> None:
        self._close_stretch()
        rng = self.rng
        async with tdb.connection() as db:
            if self.rows and rng.random() < 0.3:
                victim = rng.choice(self.rows)
                await db.execute("DELETE FROM items WHERE id = ?", (victim[0],))
                self.rows.remove(victim)
            elif self.rows and rng.random() < 0.3:
                index = rng.randrange(len(self.rows))
                note = f"updated {rng.random():.6f}"
                row_id = self.rows[index][0]
                await db.execute("UPDATE items SET note = ? WHERE id = ?", (note, row_id))
                self.rows[index] = (self.rows[index][0], note)
            else:
                note = "x" * rng.randrange(10, 3000)
                row = (self._next_id, note)
                await db.execute("INSERT INTO items (id, note) VALUES (?, ?)", row)
                self.rows.append(row)
                self._next_id += 1
            await db.commit()
        await tdb.sync()  # from here on the change is in the bucket
        self._since = now()
        await asyncio.sleep(0.02)

    def stop(self) -> None:
        """End the last quiet stretch now."""
        self._close_stretch()


async def record_history(bucket: Bucket, tmp_path: Path, seed: int) -> Recorder:
    """Two generations of changes, with merges, a snapshot and a handover in between."""
    recorder = Recorder(seed)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 14)
        await tdb.checkpoint()
        await recorder.changes(tdb, 8)
    async with machine(bucket, tmp_path, "m2") as tdb:
        await recorder.changes(tdb, 14)
        recorder.stop()
    return recorder


async def test_a_restore_at_ten_random_moments_gives_the_database_as_it_was_then(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compaction, "MERGE_SINGLES", 4)
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 3)  # packs, and merges of them
    recorder = await record_history(bucket, tmp_path, 1429)
    rng = random.Random(1429)
    history = await read_history(bucket, "acme", prefix=PREFIX)
    assert any(s.merged for s in history.segments), "the history should include merges"
    assert any(s.packed for s in history.segments), "the history should include packs"
    assert len({s.generation for s in history.segments}) == 2
    assert any(s.published and s.base for s in history.snapshots)
    for number in range(10):
        stretch = rng.choice(recorder.quiet)
        moment = stretch.start + (stretch.end - stretch.start) * rng.random()
        out = tmp_path / f"restored-{number}.sqlite3"
        point = await restore_at(bucket, "acme", out, prefix=PREFIX, at=moment)
        assert read_rows(out) == stretch.rows, f"as of {moment.isoformat()}"
        assert point.at is not None
        assert point.at <= moment


async def test_the_current_state_and_a_restore_as_of_now_agree(
    bucket: Bucket, tmp_path: Path
) -> None:
    recorder = Recorder(7)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 5)
        # Still held: the newest segments are carried inline in lock.json.
        current = await restore_at(bucket, "acme", tmp_path / "current.sqlite3", prefix=PREFIX)
        as_of_now = await restore_at(
            bucket, "acme", tmp_path / "now.sqlite3", prefix=PREFIX, at=now()
        )
    assert read_rows(tmp_path / "current.sqlite3") == recorder.rows
    assert read_rows(tmp_path / "now.sqlite3") == recorder.rows
    assert (current.state, current.index) == (as_of_now.state, as_of_now.index)


async def test_a_moment_before_the_history_is_refused_naming_the_earliest(
    bucket: Bucket, tmp_path: Path
) -> None:
    async with machine(bucket, tmp_path, "m1") as tdb:
        await Recorder(1).changes(tdb, 1)
    out = tmp_path / "out.sqlite3"
    with pytest.raises(PointInTimeError) as error:
        await restore_at(bucket, "acme", out, prefix=PREFIX, at=now() - timedelta(days=3))
    assert error.value.earliest is not None
    assert error.value.earliest > now() - timedelta(minutes=5)
    assert "history starts at" in str(error.value)
    assert not out.exists()


async def test_a_missing_segment_is_a_gap_named_not_an_older_database(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 1)  # each segment in an object of its own
    recorder = Recorder(3)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 6)
    history = await read_history(bucket, "acme", prefix=PREFIX)
    singles = [s for s in history.segments if not s.merged]
    await bucket.delete(singles[2].key)
    out = tmp_path / "out.sqlite3"
    with pytest.raises(ReplicationError) as error:
        await restore_at(bucket, "acme", out, prefix=PREFIX, at=now())
    assert f"/log/*/{singles[2].first:012d}.seg" in str(error.value)
    assert error.value.key.endswith(f"{singles[2].first:012d}.seg")
    assert not out.exists()


async def test_a_segment_is_never_timed_before_the_moment_its_commits_were_read(
    local_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A moment within a millisecond before a commit: a time rounded down would put the
    # commit's segment at or before it, and a restore as of the moment would include it.
    async with machine(local_bucket, tmp_path, "m1") as tdb:
        frozen = 1795966389.4430741
        monkeypatch.setattr(time, "time", lambda: frozen)
        await Recorder(1).changes(tdb, 1)
        monkeypatch.undo()
    history = await read_history(local_bucket, "acme", prefix=PREFIX)
    assert history.record is not None
    assert history.record.log is not None
    log = history.record.log
    newest = log.chunks()[-1]  # carried in lock.json, or in its object or pack
    segment = await fetch_segment(
        LogObjects(local_bucket, "acme"),
        chunk_key(PREFIX, "acme", newest),
        newest,
        log.inline_segment(newest.last),
    )
    assert segment.header.timestamp_ms >= frozen * 1000


async def test_a_walk_through_a_pack_never_reads_an_object_at_a_single_key_inside_it(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulation seed 310816: junk planted at a single segment's key inside a pack's range.
    Retention's plan (History._path) reads the pack and deleted the junk; the walk picked an
    object again at every index, took the junk, and with it gone found a "gap"."""
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 4)
    recorder = Recorder(11)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 6)
    history = await read_history(bucket, "acme", prefix=PREFIX)
    pack = next(s for s in history.segments if s.packed and s.last > s.first)
    await bucket.put(segment_key(PREFIX, "acme", pack.generation, pack.first + 1), b"junk" * 16)
    out = tmp_path / "out.sqlite3"
    await restore_at(bucket, "acme", out, prefix=PREFIX, at=now())
    assert read_rows(out) == recorder.rows
