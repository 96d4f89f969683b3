"""The simulated bucket passes the bucket contract, and its faults behave as S3's do."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from tenantdb.errors import PreconditionFailedError, StorageError, TransientStorageError
from tenantdb.storage import Bucket
from tests.simulation.bucket import BucketView, FaultPlan, SimBucket
from tests.storage.test_contract import (  # noqa: F401  (collected here, on this bucket)
    test_conditional_get_answers_none_while_the_etag_holds,
    test_create_only_put,
    test_create_only_upload,
    test_deleting_a_missing_object_is_not_an_error,
    test_empty_object_round_trip,
    test_errors_are_storage_errors_with_key_and_operation,
    test_etag_changes_on_every_write,
    test_file_round_trip,
    test_get_with_a_size_limit,
    test_if_match_delete,
    test_if_match_put_is_compare_and_swap,
    test_invalid_keys_are_refused,
    test_list_by_prefix,
    test_missing_object_is_not_found,
    test_server_date_present_on_every_answer,
    test_small_object_round_trip,
    test_upload_replaces_and_changes_etag,
)


@pytest.fixture
async def bucket() -> AsyncIterator[Bucket]:
    """The contract's tests of this module run on a fault-free simulated bucket."""
    async with SimBucket().view("contract") as view:
        yield view


def faulty(plan: FaultPlan, seed: int = 1) -> tuple[SimBucket, BucketView]:
    sim = SimBucket(rng=random.Random(seed), plan=plan)
    view = sim.view("m1")
    view.retry = view.retry.__class__(attempts=1)  # surface the first fault
    return sim, view


async def test_a_failure_before_landing_leaves_no_object() -> None:
    sim, view = faulty(FaultPlan(fail_before=1.0))
    with pytest.raises(TransientStorageError):
        await view.put("t/a", b"x", if_none_match="*")
    assert sim.objects == {}
    assert sim.landed == []


async def test_a_lost_answer_lands_and_its_retry_meets_it() -> None:
    sim, view = faulty(FaultPlan(lose_answer=1.0))
    with pytest.raises(TransientStorageError):
        await view.put("t/a", b"x", if_none_match="*")
    assert sim.objects["t/a"].body == b"x"
    sim.plan = FaultPlan()
    with pytest.raises(PreconditionFailedError):
        await view.put("t/a", b"x", if_none_match="*")
    assert [w.client for w in sim.landed] == ["m1"]


async def test_transient_faults_are_retried_inside_the_view() -> None:
    sim = SimBucket(rng=random.Random(3), plan=FaultPlan(slow_down=0.2, fail_before=0.1))
    view = sim.view("m1")
    for n in range(20):
        await view.put(f"t/{n}", b"x")
    assert len(sim.objects) == 20
    assert sim.faults["slow_down"] + sim.faults["fail_before"] > 0


async def test_the_same_seed_draws_the_same_faults() -> None:
    def draws(seed: int) -> list[str | None]:
        plan, rng = FaultPlan(fail_before=0.2, lose_answer=0.2, delay=0.2), random.Random(seed)
        return [plan.draw(rng, "put") for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


async def test_a_cut_off_machine_reaches_nothing() -> None:
    sim = SimBucket()
    view = sim.view("m1")
    view.cut()
    with pytest.raises(StorageError):
        await view.put("t/a", b"x")
    assert sim.objects == {}


async def test_skew_moves_the_bucket_clock() -> None:
    from datetime import timedelta

    sim = SimBucket(skew=timedelta(hours=1))
    info = await sim.view("m1").put("t/a", b"x")
    assert info.server_date is not None
    assert info.server_date - info.last_modified < timedelta(seconds=2)
    assert info.last_modified > sim.now() - timedelta(minutes=1)


async def test_damage_rots_the_bytes_and_keeps_the_etag() -> None:
    sim = SimBucket()
    view = sim.view("m1")
    written = await view.put("t/a", b"0123456789")
    sim.damage("t/a")
    read = await view.get("t/a")
    assert read.body != b"0123456789"
    assert len(read.body) == 10
    assert read.info.etag == written.etag
    assert sim.faults["damage"] == 1


async def test_a_lagging_list_leaves_out_keys_created_within_the_lag() -> None:
    now = [100.0]
    sim = SimBucket(clock=lambda: now[0], list_lag=0.5)
    view = sim.view("m1")
    await view.put("t/old", b"x")
    now[0] += 1.0
    await view.put("t/new", b"x")
    await view.put("t/old", b"y")  # overwritten, not created: still listed
    assert [o.key for o in await view.list("t/")] == ["t/old"]
    assert await view.get("t/new")  # a GET is strongly consistent
    assert sim.faults["list_lag"] == 1
    now[0] += 0.6
    assert [o.key for o in await view.list("t/")] == ["t/new", "t/old"]
