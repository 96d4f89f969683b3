"""The replica role: a standby that serves reads from its copy while the copy may.

Real ``TenantDB``s in this process on one local bucket: a holder (m1) and a replica (m2,
``replica_reads=True``). The replica reads what the holder published, waits for a bookmark
newer than its copy, and refuses (``ReplicaRefusedError``) when its copy is untrusted,
lags past the bound or is behind a bookmark after the wait; when fenced; and it still
takes the lease when the holder stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Settings
from tenantdb.errors import ReplicaRefusedError, TransientStorageError
from tenantdb.machine.copy_connections import CopyConnections
from tenantdb.machine.database import TenantDB
from tenantdb.machine.fenced import Fenced
from tenantdb.machine.mover import MOVES
from tenantdb.machine.replica import Bookmark, CopyLock, Replica
from tenantdb.machine.standby import CHAIN_HOLD, PUSHED_READ_GAP
from tenantdb.machine.tail_hints import Told
from tenantdb.storage import Bucket
from tenantdb.storage.local import LocalBucket

MIGRATIONS = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, token TEXT);"]


def settings(tmp_path: Path, machine: str, **kwargs: Any) -> Settings:
    return Settings(
        tenant="acme",
        machine_id=machine,
        data_dir=tmp_path / machine,
        local_bucket_dir=tmp_path / "bucket",
        lease_ttl=3,
        checkpoint_interval=0,
        **{"follow_interval": 0.1, "replica_reads": True, **kwargs},
    )


async def write(tdb: TenantDB, token: str) -> Bookmark:
    async with tdb.connection() as db:
        await db.execute("INSERT INTO notes (token) VALUES (?)", (token,))
        await db.commit()
    await tdb.sync()
    bookmark = tdb.bookmark()
    assert bookmark is not None
    return bookmark


async def tokens(tdb: TenantDB, bookmark: Bookmark | None = None) -> list[str]:
    async with tdb.read_copy(bookmark) as read:
        query = "SELECT token FROM notes ORDER BY id"
        rows = await read.connection.execute_fetchall(query)
    return [row[0] for row in rows]


async def wait_for(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def serving_and_replica(tmp_path: Path, **replica: Any) -> tuple[TenantDB, TenantDB]:
    holder = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await holder.start()
    await write(holder, "first")
    follower = TenantDB(settings(tmp_path, "m2", **replica), migrations=MIGRATIONS)
    await follower.start()
    assert follower.state == "replica"
    return holder, follower


async def caught_up(replica: TenantDB, expected: list[str]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            if await tokens(replica) == expected:
                return
        except ReplicaRefusedError:
            pass
        assert time.monotonic() < deadline, "the replica never caught up"
        await asyncio.sleep(0.05)


def test_the_replica_state_is_in_the_table_and_moves_like_a_standby() -> None:
    assert MOVES["replica"] == MOVES["standby"]
    assert "replica" in MOVES["starting"]
    assert "replica" in MOVES["fenced"]


async def test_a_replica_reads_what_the_holder_published_from_a_read_only_copy(
    tmp_path: Path,
) -> None:
    holder, replica = await serving_and_replica(tmp_path)
    try:
        await caught_up(replica, ["first"])
        async with replica.read_copy() as read:
            assert read.lag < 1
            assert read.position == holder.bookmark()
            with pytest.raises(Exception, match="readonly"):
                await read.connection.execute("INSERT INTO notes (token) VALUES ('no')")
            assert read.wrote  # the attempt is noted, for the middleware to replay
        # A standby without replica reads serves nothing from its copy.
        assert holder.state == "serving"
        with pytest.raises(ReplicaRefusedError, match="serving"):
            async with holder.read_copy():
                pass
    finally:
        await replica.stop()
        await holder.stop()


async def test_a_bookmark_newer_than_the_copy_waits_for_the_follower(tmp_path: Path) -> None:
    # The poll interval is long: the wait itself must make the replica look at lock.json.
    holder, replica = await serving_and_replica(tmp_path, follow_interval=5, read_wait=3)
    try:
        await caught_up(replica, ["first"])
        bookmark = await write(holder, "second")
        started = time.monotonic()
        assert await tokens(replica, bookmark) == ["first", "second"]
        assert time.monotonic() - started < 2.5
    finally:
        await replica.stop()
        await holder.stop()


async def test_a_bookmark_the_copy_does_not_reach_in_time_is_refused(tmp_path: Path) -> None:
    holder, replica = await serving_and_replica(tmp_path, read_wait=0.3)
    try:
        await caught_up(replica, ["first"])
        position = holder.bookmark()
        assert position is not None
        ahead = Bookmark(position.generation, position.index + 5)  # no such write yet
        started = time.monotonic()
        with pytest.raises(ReplicaRefusedError, match="before the request's bookmark"):
            await tokens(replica, ahead)
        assert 0.25 <= time.monotonic() - started < 2
        # A bookmark of a later generation means the same: wait, then refuse.
        with pytest.raises(ReplicaRefusedError, match="before the request's bookmark"):
            await tokens(replica, Bookmark(position.generation + 1, 0))
    finally:
        await replica.stop()
        await holder.stop()


class BlindBucket:
    """A bucket whose reads of lock.json fail while ``blind`` is set."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.blind = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_if_changed(self, key: str, *args: Any, **kwargs: Any) -> Any:
        if self.blind and key.endswith("lock.json"):
            raise TransientStorageError("503 (injected)", key=key, operation="get")
        return await self.inner.get_if_changed(key, *args, **kwargs)

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        if self.blind and key.endswith("lock.json"):
            raise TransientStorageError("503 (injected)", key=key, operation="get")
        return await self.inner.get(key, *args, **kwargs)


async def test_a_replica_whose_copy_lags_past_the_bound_refuses(tmp_path: Path) -> None:
    holder = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await holder.start()
    await write(holder, "first")
    async with LocalBucket(tmp_path / "bucket") as real:
        bucket = BlindBucket(real)
        replica = TenantDB(
            settings(tmp_path, "m2", max_replica_lag=0.3, read_wait=0),
            migrations=MIGRATIONS,
            bucket=bucket,  # type: ignore[arg-type]
        )
        await replica.start()
        try:
            await caught_up(replica, ["first"])
            bucket.blind = True  # lock.json cannot be read: nothing confirms the copy
            await asyncio.sleep(0.5)
            with pytest.raises(ReplicaRefusedError, match="behind the log"):
                await tokens(replica)
            bucket.blind = False
            await caught_up(replica, ["first"])
        finally:
            await replica.stop()
            await holder.stop()


class DirectHints:
    """A ``TailHintClient`` that streams from the holder's ``TenantDB`` in this process, as
    the holder's endpoint would (asgi/tail_hints.py), or fails while ``reachable`` is unset."""

    def __init__(self, holder: TenantDB) -> None:
        self.holder = holder
        self.reachable = True

    async def watch(
        self, holder: str, tenant: str, after: Bookmark, wait: float, told: Told
    ) -> bool:
        if not self.reachable:
            await asyncio.sleep(wait)  # a stopped holder: no answer within the wait
            return False
        async for state in self.holder.tail_moves(after, wait):
            told(state)
        return True


@pytest.mark.parametrize("reachable", [True, False])
async def test_a_replica_whose_lock_json_reads_fail_is_kept_current_only_by_its_holders_hints(
    tmp_path: Path, reachable: bool
) -> None:
    # lock.json cannot be read: only the holder's answers "still at your position" can
    # confirm the copy, and only while the holder gives them.
    bound = 0.8
    holder = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await holder.start()
    await write(holder, "first")
    hints = DirectHints(holder)
    async with LocalBucket(tmp_path / "bucket") as real:
        bucket = BlindBucket(real)
        replica = TenantDB(
            settings(tmp_path, "m2", max_replica_lag=bound, read_wait=0),
            migrations=MIGRATIONS,
            bucket=bucket,  # type: ignore[arg-type]
            tail_hints=hints,
        )
        await replica.start()
        try:
            await caught_up(replica, ["first"])
            bucket.blind = True
            hints.reachable = reachable
            lags: list[float] = []
            refused: list[str] = []
            ends = time.monotonic() + 4 * bound
            while time.monotonic() < ends:
                try:
                    async with replica.read_copy() as read:
                        assert not refused, "served again after a refusal"
                        lags.append(read.lag)
                except ReplicaRefusedError as exc:
                    refused.append(str(exc))
                await asyncio.sleep(0.02)
            if reachable:
                # Served throughout, its lag at most two hint waits (a quarter of the
                # bound each) and the answers' way back.
                assert not refused, refused[:3]
                assert max(lags) < bound / 2 + 0.2, max(lags)
            else:
                # Nothing vouches for the copy: its lag grows until it serves nothing.
                assert refused
                assert all("behind the log" in r for r in refused), refused[:3]
                assert bound / 2 < lags[-1] <= bound
        finally:
            bucket.blind = False
            await replica.stop()
            await holder.stop()


async def test_a_replica_whose_copy_is_not_trusted_refuses(tmp_path: Path) -> None:
    holder = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await holder.start()
    await write(holder, "first")
    await write(holder, os.urandom(100_000).hex())  # too large to ride inline in lock.json
    await asyncio.sleep(0.5)  # its upload lands
    # The segments are gone from the bucket: the replica cannot build a copy it can vouch for.
    removed = [segment.unlink() for segment in (tmp_path / "bucket").rglob("*.seg")]
    assert removed
    replica = TenantDB(settings(tmp_path, "m2"), migrations=MIGRATIONS)
    await replica.start()
    try:
        await asyncio.sleep(0.5)
        with pytest.raises(ReplicaRefusedError, match="not trusted"):
            await tokens(replica)
    finally:
        await replica.stop()
        await holder.stop()


async def test_a_fenced_machine_serves_no_read(tmp_path: Path) -> None:
    holder, replica = await serving_and_replica(tmp_path)
    try:
        fenced = Fenced(holder._machine)  # the role a holder that lost its lease plays
        with pytest.raises(ReplicaRefusedError, match="fenced"):
            async with fenced.read_copy(None):
                pass
    finally:
        await replica.stop()
        await holder.stop()


async def test_a_replica_takes_the_lease_when_the_holder_stops(tmp_path: Path) -> None:
    holder, replica = await serving_and_replica(tmp_path)
    await caught_up(replica, ["first"])
    await write(holder, "second")
    await holder.stop()
    try:
        assert await replica.wait_serving(10)
        async with replica.connection() as db, db.execute("SELECT token FROM notes") as cur:
            assert [row[0] for row in await cur.fetchall()] == ["first", "second"]
        with pytest.raises(ReplicaRefusedError):
            await tokens(replica)
    finally:
        await replica.stop()


async def test_the_follower_waits_for_reads_and_new_reads_wait_for_it() -> None:
    lock = CopyLock()
    await lock.acquire_shared()
    writer = asyncio.ensure_future(lock.acquire_exclusive())
    await asyncio.sleep(0.01)
    assert not writer.done()  # a read runs
    reader = asyncio.ensure_future(lock.acquire_shared())
    await asyncio.sleep(0.01)
    assert not reader.done()  # a write waits: it goes first
    lock.release_shared()
    await writer
    assert lock.writing
    assert not reader.done()
    lock.release_exclusive()
    await reader
    assert lock.readers == 1


async def test_a_takeover_interrupts_reads_that_outlast_the_drain(tmp_path: Path) -> None:
    holder, replica = await serving_and_replica(tmp_path)
    await caught_up(replica, ["first"])
    async with replica.read_copy() as read:  # a read that never ends by itself
        await holder.stop()
        assert await replica.wait_serving(15)
        # The copy became the holder's: the read lost its connection instead of reading
        # a file the holder writes.
        with pytest.raises(RuntimeError, match="not entered"):
            _ = read.connection
    try:
        assert await hits_of(replica) == ["first"]
    finally:
        await replica.stop()


async def hits_of(tdb: TenantDB) -> list[str]:
    async with tdb.connection() as db:
        rows = await db.execute_fetchall("SELECT token FROM notes ORDER BY id")
    return [row[0] for row in rows]


async def test_a_replica_whose_copy_is_not_at_the_apps_schema_refuses(tmp_path: Path) -> None:
    # The app was deployed with one more migration; the holder (old code) has not run it.
    holder = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await holder.start()
    await write(holder, "first")
    newer = [*MIGRATIONS, "ALTER TABLE notes ADD COLUMN at TEXT"]
    replica = TenantDB(settings(tmp_path, "m2"), migrations=newer)
    await replica.start()
    try:
        assert replica.state == "replica"
        deadline = time.monotonic() + 10
        while True:
            with pytest.raises(ReplicaRefusedError) as refused:
                await tokens(replica)
            if "schema" in str(refused.value):
                break
            assert time.monotonic() < deadline, str(refused.value)
            await asyncio.sleep(0.05)
        assert "not the app's (2 migrations)" in str(refused.value)
    finally:
        await replica.stop()
        await holder.stop()


class TimedBucket:
    """A bucket that notes when each read of lock.json began and ended."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.reads: list[tuple[float, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_if_changed(self, key: str, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await self.inner.get_if_changed(key, *args, **kwargs)
        finally:
            if key.endswith("lock.json"):
                self.reads.append((started, time.monotonic()))


@contextlib.asynccontextmanager
async def timed_follower(
    tmp_path: Path, hints: Callable[[TenantDB], DirectHints], **options: Any
) -> AsyncIterator[tuple[TenantDB, TenantDB, TimedBucket]]:
    """A holder that wrote "first", and a replica (``options`` override its settings) that
    follows it with ``hints`` and no polls (every 30 s), its reads of lock.json timed."""
    holder = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await holder.start()
    try:
        await write(holder, "first")
        async with LocalBucket(tmp_path / "bucket") as real:
            bucket = TimedBucket(real)
            options = {"follow_interval": 30, "max_replica_lag": 60, "read_wait": 0, **options}
            follower = TenantDB(
                settings(tmp_path, "m2", **options),
                migrations=MIGRATIONS,
                bucket=bucket,  # type: ignore[arg-type]
                tail_hints=hints(holder),
            )
            await follower.start()
            try:
                yield holder, follower, bucket
            finally:
                await follower.stop()
    finally:
        await holder.stop()


async def write_for(holder: TenantDB, seconds: float, written: list[str]) -> None:
    """Write one note after another for ``seconds``, each added to ``written``."""
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        written.append(f"w{len(written)}")
        await write(holder, written[-1])


async def test_pushes_under_continuous_writes_drive_one_read_at_a_time_a_floor_apart(
    tmp_path: Path,
) -> None:
    # The holder's stream tells every write; the replica reads lock.json once per
    # PUSHED_READ_GAP at most, never two reads at once, and what was told during a read
    # comes in with the next one.
    async with timed_follower(tmp_path, DirectHints) as (holder, replica, bucket):
        await caught_up(replica, ["first"])
        bucket.reads.clear()
        written = ["first"]
        await write_for(holder, 1.5, written)
        last = time.monotonic()
        await caught_up(replica, written)
        took = time.monotonic() - last
    starts = [started for started, _ in bucket.reads]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    print(f"{len(written)} writes, {len(starts)} reads, smallest gap {1000 * min(gaps):.1f} ms")
    assert all(ended <= started for (_, ended), (started, _) in itertools.pairwise(bucket.reads)), (
        bucket.reads
    )
    assert min(gaps) >= PUSHED_READ_GAP - 0.002, gaps
    assert len(starts) <= 1.5 / PUSHED_READ_GAP + 3
    if len(written) > 1.5 / PUSHED_READ_GAP:
        # Writes came faster than the floor lets reads come: pushes that came during a read
        # made one read. (On a loaded machine the writes may come slower than that, and the
        # reads that follow a moving log unasked may then outnumber them: 68 writes, 77
        # reads at 03436da under 4 busy loops.)
        assert len(written) > len(starts)
    assert took < 1.0, took


class FarHints(DirectHints):
    """``DirectHints`` whose lines each arrive ``leg`` seconds after the holder told them."""

    def __init__(self, holder: TenantDB, leg: float) -> None:
        super().__init__(holder)
        self.leg = leg

    async def watch(
        self, holder: str, tenant: str, after: Bookmark, wait: float, told: Told
    ) -> bool:
        loop = asyncio.get_running_loop()
        return await super().watch(
            holder, tenant, after, wait, lambda state: loop.call_later(self.leg, told, state)
        )


LEG = 0.5  # seconds each line of FarHints takes
WRITING = 2.5  # seconds of writes in the tests with FarHints


async def test_under_continuous_writes_a_replica_reads_again_without_waiting_for_far_lines(
    tmp_path: Path,
) -> None:
    # A holder half a second away: each line tells of a write half a second late. While a
    # read found the log past every line told, writes are on their way, so the next read is
    # due at PUSHED_READ_GAP, not at the next line (which would make at most one read a leg).
    far = functools.partial(FarHints, leg=LEG)
    async with timed_follower(tmp_path, far) as (holder, replica, bucket):
        await caught_up(replica, ["first"])
        bucket.reads.clear()
        written = ["first"]
        await write_for(holder, WRITING, written)
        reads = len(bucket.reads)
        await caught_up(replica, written)
        # Once the lines caught up with the last write, reads wait for lines again.
        await asyncio.sleep(2 * LEG)
        bucket.reads.clear()
        await asyncio.sleep(3 * LEG)
        idle_reads = len(bucket.reads)
    print(f"{len(written)} writes, {reads} reads of lock.json while writing")
    # Lines alone: one read per leg at most (5 here, plus one); the chain: one per gap.
    assert reads >= 3 * WRITING / LEG, reads
    assert idle_reads == 0


async def test_a_plain_standby_reads_only_when_told_however_far_the_lines(
    tmp_path: Path,
) -> None:
    # A standby serves no read: its copy only has to be warm, so it reads no more than its
    # holder's lines ask for (the reads above would cost it, and the bucket, for nothing).
    far = functools.partial(FarHints, leg=LEG)
    async with timed_follower(tmp_path, far, replica_reads=False) as (holder, standby, bucket):
        assert standby.state == "standby"
        await asyncio.sleep(2 * LEG)
        bucket.reads.clear()
        written = ["first"]
        await write_for(holder, WRITING, written)
        reads = len(bucket.reads)
    print(f"{len(written)} writes, {reads} reads of lock.json while writing")
    assert reads <= WRITING / LEG + 2, reads


async def test_after_a_read_that_found_a_write_the_next_reads_come_without_waiting_for_lines(
    tmp_path: Path,
) -> None:
    # Lines come at once here, so they catch up with each read at once: only CHAIN_HOLD
    # keeps reading (a holder's pause between writes must not cost the next write a leg),
    # and then reads stop until the next line.
    async with timed_follower(tmp_path, DirectHints) as (holder, replica, bucket):
        await caught_up(replica, ["first"])
        await asyncio.sleep(0.5)
        bucket.reads.clear()
        written = time.monotonic()
        await write(holder, "second")
        await caught_up(replica, ["first", "second"])
        await asyncio.sleep(0.5)
    starts = [started for started, _ in bucket.reads if started >= written]
    print(f"reads after the write, ms: {[round(1000 * (s - written)) for s in starts]}")
    # The read the line asked for, then reads a gap apart for CHAIN_HOLD after it.
    assert len(starts) >= 3, starts
    assert starts[-1] - starts[0] < CHAIN_HOLD + 5 * PUSHED_READ_GAP, starts


@contextlib.asynccontextmanager
async def caught_up_pair(tmp_path: Path) -> AsyncIterator[tuple[TenantDB, TenantDB]]:
    """A holder and a replica that serves what the holder wrote first; both stopped after."""
    holder, replica = await serving_and_replica(tmp_path)
    try:
        await caught_up(replica, ["first"])
        yield holder, replica
    finally:
        await replica.stop()
        await holder.stop()


def copy_connections(tdb: TenantDB) -> CopyConnections:
    role = tdb._mover.role
    assert isinstance(role, Replica)
    return role.connections


def connection_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


async def test_reads_between_two_writes_share_one_connection_and_see_the_next_write(
    tmp_path: Path,
) -> None:
    async with caught_up_pair(tmp_path) as (holder, replica):
        connections = copy_connections(replica)
        opened = connections.opened
        for _ in range(5):
            assert await tokens(replica) == ["first"]
        assert connections.opened == opened  # no thread start per read
        # The kept connection cached the page the follower now writes in place.
        bookmark = await write(holder, "second")
        assert await tokens(replica, bookmark) == ["first", "second"]
        assert connections.opened == opened + 1


async def test_a_read_that_leaves_state_on_its_connection_does_not_hand_it_on(
    tmp_path: Path,
) -> None:
    async with caught_up_pair(tmp_path) as (_, replica):
        connections = copy_connections(replica)
        async with replica.read_copy() as read:
            await read.connection.execute("PRAGMA cache_size = 7")
            assert not read.reusable
        opened = connections.opened
        async with replica.read_copy() as read:
            rows = await read.connection.execute_fetchall("PRAGMA cache_size")
        assert list(rows[0]) != [7]
        assert connections.opened == opened + 1


async def test_a_replica_closes_its_kept_connections_when_it_stops_or_takes_over(
    tmp_path: Path,
) -> None:
    before = connection_threads()
    holder, replica = await serving_and_replica(tmp_path)
    await caught_up(replica, ["first"])
    replica_threads = connection_threads() - before
    await holder.stop()
    try:
        assert await replica.wait_serving(10)
        # The copy is the holder's database now: no connection of the replica reads it.
        assert not any(t.is_alive() for t in replica_threads)
        await write(replica, "second")
    finally:
        await replica.stop()
    other = TenantDB(settings(tmp_path, "m3"), migrations=MIGRATIONS)
    holder = TenantDB(settings(tmp_path, "m1"), migrations=MIGRATIONS)
    await holder.start()
    await other.start()
    await caught_up(other, ["first", "second"])
    await other.stop()
    await holder.stop()
    assert connection_threads() <= before  # every thread of the kept connections ended
