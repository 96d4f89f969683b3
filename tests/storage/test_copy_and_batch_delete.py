"""``Bucket.copy`` (a server-side copy) and ``Bucket.delete_many``, on both backends."""

from __future__ import annotations

import pytest

from tenantdb.errors import ObjectNotFoundError, PreconditionFailedError
from tenantdb.metrics import Metrics
from tenantdb.storage import Bucket
from tenantdb.storage.metered import MeteredBucket
from tests.storage.test_metered import counts


async def test_a_copy_has_the_bytes_and_outlives_its_source(bucket: Bucket) -> None:
    await bucket.put("a/src", b"payload" * 100, if_none_match="*")
    info = await bucket.copy("a/src", "b/dst", if_none_match="*")
    assert (info.key, info.size) == ("b/dst", 700)
    await bucket.delete("a/src")
    assert (await bucket.get("b/dst")).body == b"payload" * 100


async def test_a_copy_onto_an_existing_key_is_refused_and_changes_nothing(bucket: Bucket) -> None:
    await bucket.put("src", b"new", if_none_match="*")
    await bucket.put("dst", b"old", if_none_match="*")
    with pytest.raises(PreconditionFailedError):
        await bucket.copy("src", "dst", if_none_match="*")
    assert (await bucket.get("dst")).body == b"old"
    await bucket.copy("src", "dst")  # unconditional: replaces it
    assert (await bucket.get("dst")).body == b"new"


async def test_a_copy_of_a_missing_object_is_not_found(bucket: Bucket) -> None:
    with pytest.raises(ObjectNotFoundError):
        await bucket.copy("missing", "dst", if_none_match="*")
    assert await bucket.list("dst") == []


async def test_a_metered_copy_is_one_class_a_request_and_sends_no_bytes(bucket: Bucket) -> None:
    metrics = Metrics()
    metered = MeteredBucket(bucket, metrics, tenant="acme")
    await bucket.put("tenants/acme/a.sqlite3", b"x" * 100, if_none_match="*")
    await metered.copy("tenants/acme/a.sqlite3", "tenants/acme/b.sqlite3", if_none_match="*")
    with pytest.raises(PreconditionFailedError):  # refused: not billed
        await metered.copy("tenants/acme/a.sqlite3", "tenants/acme/b.sqlite3", if_none_match="*")
    assert counts(metrics) == {("requests", "A"): 1.0, ("requests", "free"): 1.0}


async def test_a_batch_delete_removes_its_keys_only_and_ignores_missing_ones(
    bucket: Bucket,
) -> None:
    for i in range(5):
        await bucket.put(f"t/{i}", b"x", if_none_match="*")
    await bucket.delete_many(["t/0", "t/1", "t/3", "t/missing"])
    assert [info.key for info in await bucket.list("t/")] == ["t/2", "t/4"]
    await bucket.delete_many([])
    with pytest.raises(ValueError, match="at most 1000"):
        await bucket.delete_many([f"t/{i}" for i in range(1001)])
    assert [info.key for info in await bucket.list("t/")] == ["t/2", "t/4"]


async def test_a_metered_batch_delete_is_one_class_a_request(bucket: Bucket) -> None:
    metrics = Metrics()
    metered = MeteredBucket(bucket, metrics, tenant="acme")
    for i in range(3):
        await bucket.put(f"tenants/acme/{i}", b"x", if_none_match="*")
    await metered.delete_many([f"tenants/acme/{i}" for i in range(3)])
    await metered.delete_many([])
    assert counts(metrics) == {("requests", "A"): 1.0}
    assert await bucket.list("tenants/acme/") == []
