"""The warm standby's Follower: a local copy equal to what lock.json names, on both backends.

A real holder (``TenantDB``) writes and ships to the bucket; the follower keeps its copy
current from lock.json alone and is compared with a fresh restore of the same record.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Settings
from tenantdb.errors import ReplicationError
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.replication import carrier
from tenantdb.replication.checksum import format_state
from tenantdb.replication.follower import Follower
from tenantdb.replication.log_objects import LogObjects
from tenantdb.replication.restore import fetch_segment, hash_file, restore_database
from tenantdb.replication.segment import Segment, chunk_key, encode_segment, segment_key
from tenantdb.storage.base import Bucket

MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)"]
PREFIX = "tenants/"
# A row this big makes each segment too large to ride inline in lock.json: the follower
# then reads it from its own object, which the damage tests break.
BIG = 40_000


def settings(tmp_path: Path, machine: str) -> Settings:
    return Settings(
        tenant="acme",
        machine_id=machine,
        data_dir=tmp_path / machine,
        lease_ttl=3,
        checkpoint_interval=0,
        sync_interval=3600,  # shipped only when a test syncs
    )


async def write(tdb: TenantDB, rows: int, size: int = 10) -> None:
    async with tdb.connection() as db:
        # Random text: it does not compress, so a big row makes a big segment.
        notes = [(os.urandom(size // 2).hex(),) for _ in range(rows)]
        await db.executemany("INSERT INTO hits (note) VALUES (?)", notes)
        await db.commit()
    await tdb.sync()


async def lock(bucket: Bucket) -> LockRecord:
    reader = Lease(bucket, "acme", machine_id="reader", region="test", ttl=3)
    observed = await reader.read()
    assert observed is not None
    return observed.record


def rows(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM hits").fetchone()[0])
    finally:
        conn.close()


async def assert_equals_restore(copy: Path, bucket: Bucket, record: LockRecord) -> None:
    """The copy is byte for byte what a fresh restore of ``record`` gives."""
    fresh = copy.with_name("fresh.sqlite3")
    await restore_database(bucket, record, fresh, prefix=PREFIX)
    assert copy.read_bytes() == fresh.read_bytes()


def new_follower(bucket: Bucket, tmp_path: Path) -> Follower:
    (tmp_path / "standby").mkdir(exist_ok=True)
    return Follower(bucket, "acme", tmp_path / "standby" / "acme.sqlite3", prefix=PREFIX)


async def test_restores_once_then_applies_only_the_new_segments(
    bucket: Bucket, tmp_path: Path
) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        await write(tdb, 5)
        follower = new_follower(bucket, tmp_path)
        first = await lock(bucket)
        await follower.catch_up(first)
        assert (follower.restores, follower.applied) == (1, 0)
        assert follower.hashes(first) is not None
        for round_number in range(3):
            await write(tdb, 3, size=BIG if round_number == 1 else 10)
        record = await lock(bucket)
        assert record.log is not None
        assert first.log is not None
        new_segments = record.log.tail - first.log.tail
        assert new_segments >= 3
        assert follower.hashes(record) is None  # behind: not yet what lock.json names
        hashes = await follower.catch_up(record)
        assert (follower.restores, follower.applied) == (1, new_segments)
        assert follower.hashes(record) is hashes
        assert format_state(hash_file(follower.path).state) == record.log.state
        assert rows(follower.path) == 14
        await assert_equals_restore(follower.path, bucket, record)


async def test_a_segment_of_a_fenced_generation_is_never_applied(
    local_bucket: Bucket, tmp_path: Path
) -> None:
    bucket = local_bucket
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS, bucket=bucket) as old:
        await write(old, 4)
    # m2 takes over (generation 2); generation 1 is fenced from here on.
    async with TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        follower = new_follower(bucket, tmp_path)
        record = await lock(bucket)
        assert record.generation == 2
        assert record.log is not None
        await follower.catch_up(record)
        before = follower.path.read_bytes()
        applied = follower.applied
        # A stale holder of generation 1 uploads a well-formed next segment that chains
        # onto the copy's state: only lock.json's runs decide what counts.
        tail = record.log.tail
        last = record.log.chunks()[-1]
        genuine = await fetch_segment(
            LogObjects(bucket, "acme"),
            chunk_key(PREFIX, "acme", last),
            last,
            record.log.inline_segment(tail),
        )
        stale_pages = tuple((pgno, b"\xee" * len(data)) for pgno, data in genuine.pages)
        current = follower.hashes(record)
        assert current is not None
        after = current.copy()
        after.apply(dict(stale_pages), genuine.header.db_pages)
        stale = Segment(
            replace(
                genuine.header,
                generation=1,
                index=tail + 1,
                prev_state=current.state,
                state=after.state,
            ),
            stale_pages,
        )
        await bucket.put(
            segment_key(PREFIX, "acme", 1, tail + 1), encode_segment(stale), if_none_match="*"
        )
        # lock.json still ends at the tail: nothing to apply.
        await follower.catch_up(await lock(bucket))
        assert follower.applied == applied
        assert follower.path.read_bytes() == before
        # The holder's own segment at that index is the one applied, chained on the copy.
        await write(tdb, 2)
        record = await lock(bucket)
        assert record.log is not None
        assert record.log.generation_of(tail + 1) == 2
        await follower.catch_up(record)
        assert follower.restores == 1, "the copy had to be rebuilt: it did not chain"
        assert rows(follower.path) == 6
        await assert_equals_restore(follower.path, bucket, record)


async def test_a_snapshot_that_moves_the_base_makes_the_follower_restore_anew(
    bucket: Bucket, tmp_path: Path
) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        await write(tdb, 3)
        follower = new_follower(bucket, tmp_path)
        await follower.catch_up(await lock(bucket))
        await write(tdb, 2)
        assert await tdb.checkpoint()
        await write(tdb, 1)
        record = await lock(bucket)
        await follower.catch_up(record)
        assert follower.restores == 2
        assert rows(follower.path) == 6
        await assert_equals_restore(follower.path, bucket, record)
        # And it follows the new base's log from there.
        await write(tdb, 2)
        record = await lock(bucket)
        await follower.catch_up(record)
        assert (follower.restores, follower.applied) == (2, 1)
        await assert_equals_restore(follower.path, bucket, record)


async def test_a_merge_across_the_copys_position_is_applied_on_top_without_a_restore(
    local_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder merges its first single segments into one object while the copy is in
    the middle of them: the merged object goes on top of the copy, checked by its result."""
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 2)  # merges come after 16 objects
    bucket = local_bucket
    fast = replace(settings(tmp_path, "m1"), sync_interval=0.05)  # its loop compacts
    async with TenantDB(fast, migrations=MIGRATIONS, bucket=bucket) as tdb:
        for _ in range(6):
            await write(tdb, 1)
        follower = new_follower(bucket, tmp_path)
        first = await lock(bucket)
        assert first.log is not None
        assert not first.log.merged
        await follower.catch_up(first)
        position = first.log.tail
        record = first
        for _ in range(200):
            await write(tdb, 1)
            record = await lock(bucket)
            assert record.log is not None
            if record.log.merged:
                break
        assert record.log is not None
        merged_first, merged_last, _ = record.log.merged[0]
        assert merged_first <= position < merged_last, (position, record.log.merged)
        await follower.catch_up(record)
        assert follower.restores == 1
        await assert_equals_restore(follower.path, bucket, record)


@pytest.mark.parametrize("damage", ["missing", "damaged"])
async def test_a_missing_or_damaged_segment_is_an_error_naming_it_and_is_not_applied(
    bucket: Bucket, tmp_path: Path, damage: str, caplog: Any
) -> None:
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        await write(tdb, 2)
        follower = new_follower(bucket, tmp_path)
        known = await lock(bucket)
        await follower.catch_up(known)
        before = follower.path.read_bytes()
        # Two big segments: the first leaves lock.json's inline part when the second comes.
        await write(tdb, 1, size=BIG)
        await write(tdb, 1, size=BIG)
        record = await lock(bucket)
        assert record.log is not None
        assert known.log is not None
        broken = record.log.chunks()[known.log.tail]  # the first segment the copy lacks
        assert record.log.inline_segment(broken.last) is None
        key = chunk_key(PREFIX, "acme", broken)
        if damage == "missing":
            await bucket.delete(key)
        else:
            body = bytearray((await bucket.get(key)).body)
            body[len(body) // 2] ^= 0xFF
            await bucket.put(key, bytes(body))
        with pytest.raises(ReplicationError) as raised:
            await follower.catch_up(record)
        assert key in str(raised.value)
        assert follower.path.read_bytes() == before
        # The copy is still vouched for at the state it had.
        assert follower.hashes(known) is not None
        assert not list(follower.path.parent.glob(".*restore*"))


async def test_a_copy_written_half_way_is_not_trusted(
    local_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower that stopped in the middle of applying forgets its copy: the next
    catch-up rebuilds it rather than chaining onto a file in an unknown state."""
    bucket = local_bucket
    async with TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS, bucket=bucket) as tdb:
        await write(tdb, 2)
        follower = new_follower(bucket, tmp_path)
        await follower.catch_up(await lock(bucket))
        await write(tdb, 1, size=BIG)
        record = await lock(bucket)
        # A write that fails half-way (the disk filled up, say) leaves the file in flux.
        real_pwrite = os.pwrite
        calls = 0

        def failing_pwrite(fd: int, data: bytes, offset: int) -> int:
            nonlocal calls
            calls += 1
            if calls > 2:
                raise OSError(28, "No space left on device (injected)")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", failing_pwrite)
        with pytest.raises(OSError, match="injected"):
            await follower.catch_up(record)
        monkeypatch.undo()
        assert calls > 2
        assert follower.hashes(record) is None
        await follower.catch_up(record)
        assert follower.restores == 2
        await assert_equals_restore(follower.path, bucket, record)
