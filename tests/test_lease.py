"""The lock.json CAS protocol, in process, on both bucket backends."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import timedelta
from typing import Any, Literal

import pytest

from tenantdb import clock
from tenantdb.config import Settings
from tenantdb.errors import (
    CrossRegionLeaseError,
    LeaseHeldError,
    LeaseLostError,
    LockFileCorruptError,
    PreconditionFailedError,
    TransientStorageError,
)
from tenantdb.protocol.lease import Lease, LockRecord
from tenantdb.storage.base import Bucket, ObjectInfo, SmallObject

TTL = 3.0


def make_lease(bucket: Bucket, machine: str, **kwargs: Any) -> Lease:
    return Lease(bucket, "acme", machine_id=machine, region="ams", ttl=TTL, **kwargs)


async def test_first_acquire_creates_lock_with_generation_one(bucket: Bucket) -> None:
    lease = make_lease(bucket, "m1")
    record = await lease.acquire()
    assert (record.owner, record.generation, record.seq, record.snapshot) == ("m1", 1, 1, None)
    stored = json.loads((await bucket.get("tenants/acme/lock.json")).body)
    assert stored["owner"] == "m1"
    assert stored["format"] == 1
    assert lease.valid_for > TTL - 1


async def test_live_holder_is_reported_with_region_and_expiry(bucket: Bucket) -> None:
    await make_lease(bucket, "m1").acquire()
    with pytest.raises(LeaseHeldError) as held:
        await make_lease(bucket, "m2").acquire()
    assert held.value.owner == "m1"
    assert held.value.region == "ams"
    assert 0 < held.value.expires_in <= TTL + 1


async def test_release_lets_another_machine_take_over_with_next_generation(
    bucket: Bucket,
) -> None:
    first = make_lease(bucket, "m1")
    await first.acquire()
    await first.release()
    second = make_lease(bucket, "m2")
    record = await second.acquire()
    assert (record.owner, record.generation, record.last_owner) == ("m2", 2, "m1")


async def test_same_claim_takes_its_own_lease_back_at_once_after_a_crash(
    bucket: Bucket,
) -> None:
    await make_lease(bucket, "m1", claim="dir-a").acquire()  # "crashes": never releases
    record = await make_lease(bucket, "m1", claim="dir-a").acquire()
    assert (record.owner, record.generation, record.claim) == ("m1", 2, "dir-a")


async def test_another_process_of_the_same_machine_cannot_take_a_live_lease(
    bucket: Bucket,
) -> None:
    first = make_lease(bucket, "m1", claim="dir-a")
    await first.acquire()
    with pytest.raises(LeaseHeldError) as held:
        await make_lease(bucket, "m1", claim="dir-b").acquire()
    assert held.value.owner == "m1"
    assert first.valid_for > 0
    stored = json.loads((await bucket.get(first.key)).body)
    assert (stored["generation"], stored["claim"]) == (1, "dir-a")


async def test_expired_lease_is_taken_over_only_after_the_ttl(bucket: Bucket) -> None:
    await make_lease(bucket, "m1").acquire()
    with pytest.raises(LeaseHeldError):
        await make_lease(bucket, "m2").acquire()
    await asyncio.sleep(TTL + 2.1)
    record = await make_lease(bucket, "m2").acquire()
    assert (record.owner, record.generation, record.last_owner) == ("m2", 2, "m1")


async def test_every_write_changes_seq_and_etag(bucket: Bucket) -> None:
    lease = make_lease(bucket, "m1")
    await lease.acquire()
    etags = {(await bucket.head(lease.key)).etag}
    for expected_seq in (2, 3, 4):
        record = await lease.renew()
        assert record.seq == expected_seq
        etags.add((await bucket.head(lease.key)).etag)
    assert len(etags) == 4


async def test_old_holder_is_fenced_on_its_next_write_after_a_takeover(bucket: Bucket) -> None:
    lost: list[LeaseLostError] = []
    old = make_lease(bucket, "m1", on_lost=lost.append)
    await old.acquire()
    await asyncio.sleep(TTL + 2.1)
    await make_lease(bucket, "m2").acquire()
    with pytest.raises(LeaseLostError):
        await old.renew()
    assert old.status == "lost"
    assert len(lost) == 1
    with pytest.raises(LeaseLostError):
        await old.renew()  # stays fenced without touching the bucket
    stored = json.loads((await bucket.get(old.key)).body)
    assert (stored["owner"], stored["generation"]) == ("m2", 2)


async def test_concurrent_renew_and_publish_do_not_fence_each_other(bucket: Bucket) -> None:
    lease = make_lease(bucket, "m1")
    await lease.acquire()
    await asyncio.gather(*(lease.renew() for _ in range(10)))
    assert lease.status == "held"
    assert lease.record is not None
    assert lease.record.seq == 11


class RetriedPutBucket:
    """Simulates a PUT whose response was lost: the retry then gets 412 for its own write."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        await self.inner.put(key, body, if_match=if_match, if_none_match=if_none_match)
        return await self.inner.put(key, body, if_match=if_match, if_none_match=if_none_match)


async def test_a_retried_write_that_had_landed_is_not_mistaken_for_a_takeover(
    local_bucket: Bucket,
) -> None:
    lease = make_lease(RetriedPutBucket(local_bucket), "m1")  # type: ignore[arg-type]
    await lease.acquire()
    await lease.renew()
    assert lease.status == "held"
    with pytest.raises(PreconditionFailedError):
        # Another writer's bytes are not ours: that 412 stands.
        await local_bucket.put(lease.key, b"{}", if_none_match="*")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"format": 2, "tenant": "acme"}', "unknown format 2"),
        (b'{"format": 1, "tenant": "other"}', "names tenant 'other'"),
        (
            b'{"format": 1, "tenant": "acme", "owner": 5, "region": null, "last_owner": null,'
            b' "generation": 1, "seq": 1, "ttl_seconds": 15}',
            "field 'owner' has a wrong type",
        ),
        (
            b'{"format": 1, "tenant": "acme", "owner": null, "region": null,'
            b' "last_owner": null, "generation": 1, "seq": 1, "ttl_seconds": 15,'
            b' "snapshot": {"key": "tenants/other/snapshots/x"}}',
            "snapshot' is malformed",
        ),
    ],
)
async def test_damaged_lock_json_is_refused_with_a_clear_error(
    local_bucket: Bucket, body: bytes, reason: str
) -> None:
    await local_bucket.put("tenants/acme/lock.json", body)
    with pytest.raises(LockFileCorruptError) as error:
        await make_lease(local_bucket, "m1").acquire()
    assert reason in str(error.value)
    assert "tenants/acme/lock.json" in str(error.value)
    assert (await local_bucket.get("tenants/acme/lock.json")).body == body


def test_lock_record_round_trips_through_json() -> None:
    record = LockRecord(
        tenant="acme", owner="m1", region="ams", generation=3, seq=9, ttl_seconds=15
    )
    parsed = LockRecord.parse(record.to_json(), tenant="acme", key="tenants/acme/lock.json")
    assert parsed == record


class UnreadableAfter412:
    """A bucket whose next lock write gets 412 without landing, and whose reads then fail."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner
        self.broken = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, key: str, body: bytes, **conditions: Any) -> ObjectInfo:
        if self.broken:
            raise PreconditionFailedError("412 (injected)", key=key, operation="put")
        return await self.inner.put(key, body, **conditions)

    async def get(self, key: str, **options: Any) -> SmallObject:
        if self.broken:
            raise TransientStorageError("503 (injected)", key=key, operation="get")
        return await self.inner.get(key, **options)


async def test_a_412_whose_re_read_fails_is_not_taken_for_fencing(local_bucket: Bucket) -> None:
    flaky = UnreadableAfter412(local_bucket)
    lost: list[LeaseLostError] = []
    lease = make_lease(flaky, "m1", on_lost=lost.append)  # type: ignore[arg-type]
    await lease.acquire()
    flaky.broken = True
    with pytest.raises(TransientStorageError):
        await lease.renew()
    assert (lease.status, lost) == ("held", [])
    flaky.broken = False
    await lease.renew()  # the renewal loop simply tries again
    assert lease.status == "held"


async def test_a_huge_lock_json_is_refused_without_reading_it_whole(bucket: Bucket) -> None:
    record = LockRecord(tenant="acme", owner=None, region=None, generation=1, seq=1, ttl_seconds=3)
    padded = json.loads(record.to_json()) | {"padding": "x" * (1 << 20)}
    await bucket.put("tenants/acme/lock.json", json.dumps(padded).encode())
    with pytest.raises(LockFileCorruptError, match="bytes"):
        await make_lease(bucket, "m1").acquire()


class NoServerClock:
    """A store whose answers carry no Date header and whose Last-Modified is far off."""

    def __init__(self, inner: Bucket) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str, **options: Any) -> SmallObject:
        obj = await self.inner.get(key, **options)
        skewed = replace(
            obj.info, server_date=None, last_modified=obj.info.last_modified - timedelta(hours=1)
        )
        return SmallObject(skewed, obj.body)

    async def get_if_changed(self, key: str, etag: str, **options: Any) -> SmallObject | None:
        obj = await self.inner.get_if_changed(key, etag, **options)
        return None if obj is None else await self.get(key, **options)


async def test_without_a_server_clock_a_lease_expires_only_after_being_watched_for_a_ttl(
    local_bucket: Bucket,
) -> None:
    holder = make_lease(local_bucket, "m1")
    await holder.acquire()
    taker = make_lease(NoServerClock(local_bucket), "m2")  # type: ignore[arg-type]
    with pytest.raises(LeaseHeldError):
        await taker.acquire()
    await asyncio.sleep(TTL / 2)
    with pytest.raises(LeaseHeldError):
        await taker.acquire()  # still the same ETag, but not yet watched for a whole TTL
    await asyncio.sleep(TTL / 2 + 1.2)
    record = await taker.acquire()
    assert (record.owner, record.generation) == ("m2", 2)


# --- regions ---------------------------------------------------------------------------------


async def test_a_released_lease_is_not_taken_from_another_region_on_a_regional_bucket(
    bucket: Bucket,
) -> None:
    first = make_lease(bucket, "m1")  # in ams
    await first.acquire()
    await first.release()
    elsewhere = Lease(bucket, "acme", machine_id="m2", region="iad", ttl=TTL)
    with pytest.raises(CrossRegionLeaseError) as refused:
        await elsewhere.acquire()
    assert (refused.value.region, refused.value.holder_region) == ("iad", "ams")
    assert "TENANTDB_BUCKET_CONSISTENCY=strong" in str(refused.value)
    # Nothing was written: the record still names ams, owner null.
    stored = json.loads((await bucket.get("tenants/acme/lock.json")).body)
    assert (stored["owner"], stored["region"]) == (None, "ams")


async def test_a_live_lease_in_another_region_is_reported_as_held(bucket: Bucket) -> None:
    await make_lease(bucket, "m1").acquire()
    elsewhere = Lease(bucket, "acme", machine_id="m2", region="iad", ttl=TTL)
    with pytest.raises(LeaseHeldError):
        await elsewhere.acquire()


async def test_a_strongly_consistent_bucket_lets_the_lease_move_between_regions(
    bucket: Bucket,
) -> None:
    first = make_lease(bucket, "m1")
    await first.acquire()
    await first.release()
    moved = Lease(bucket, "acme", machine_id="m2", region="iad", ttl=TTL, cross_region=True)
    record = await moved.acquire()
    assert (record.owner, record.region, record.generation) == ("m2", "iad", 2)


@pytest.mark.parametrize(
    ("env", "across"),
    [
        ({"AWS_ENDPOINT_URL_S3": "https://fly.storage.tigris.dev"}, False),
        (
            {
                "AWS_ENDPOINT_URL_S3": "https://fly.storage.tigris.dev",
                "TENANTDB_BUCKET_CONSISTENCY": "strong",
            },
            True,
        ),
        ({"AWS_ENDPOINT_URL_S3": "https://s3.eu-west-3.amazonaws.com"}, True),
        (
            {
                "AWS_ENDPOINT_URL_S3": "https://minio.example.com",
                "TENANTDB_BUCKET_CONSISTENCY": "regional",
            },
            False,
        ),
    ],
)
def test_bucket_consistency_defaults_to_regional_for_tigris_only(
    env: dict[str, str], across: bool
) -> None:
    assert Settings.from_env(env).consistent_across_regions is across


class SteppedClocks:
    """This machine's clocks, moved by hand: monotonic, wall and boot time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monotonic, self.wall, self.boot = 1000.0, 1_800_000_000.0, 1000.0
        monkeypatch.setattr(clock, "monotonic", lambda: self.monotonic)
        monkeypatch.setattr(clock, "wall", lambda: self.wall)
        monkeypatch.setattr(clock, "boottime", lambda: self.boot)

    def run(self, seconds: float) -> None:
        """Time passes with the machine running: every clock counts it."""
        self.monotonic += seconds
        self.wall += seconds
        self.boot += seconds

    def suspend(self, seconds: float) -> None:
        """Fly's suspend: only the wall clock, set again on resume, counts the time away."""
        self.wall += seconds


async def test_a_suspend_after_the_wall_clock_stepped_back_still_ages_the_lease(
    local_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulation seed 215059: the wall clock stepped back 2 s, then the machine was
    suspended; the wall clock's deficit hid the time away, and the holder served on
    past its lease while another machine held it."""
    clocks = SteppedClocks(monkeypatch)
    lease = make_lease(local_bucket, "m1")
    await lease.acquire()
    clocks.run(0.1)
    clocks.wall -= 2.0
    assert lease.valid_for == pytest.approx(TTL - 0.1)
    clocks.suspend(2.5)
    assert lease.valid_for == pytest.approx(TTL - 2.6)


async def test_a_wall_clock_stepped_back_over_a_suspend_makes_the_holder_ask_the_bucket(
    local_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step back and a suspend between two looks can cancel out on the clocks: a wall
    clock that counted less than the monotonic one is taken for a possible freeze."""
    clocks = SteppedClocks(monkeypatch)
    lease = make_lease(local_bucket, "m1")
    record = await lease.acquire()
    clocks.run(0.1)
    clocks.wall -= 2.0
    clocks.suspend(1.3)
    await lease.confirmed()
    assert lease.record is not None
    assert lease.record.seq > record.seq  # a renewal landed before it may answer
