"""The conditional-write probe: real stores pass it, a store that ignores the headers fails."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tenantdb.config import Secret
from tenantdb.errors import ConditionalWritesIgnoredError, ObjectNotFoundError
from tenantdb.storage import RetryPolicy
from tenantdb.storage.base import Bucket
from tenantdb.storage.probe import (
    PASSED_FILE,
    PROBE_DIRECTORY,
    check_conditional_writes,
    check_conditional_writes_once,
)
from tenantdb.storage.s3 import S3Bucket
from tests.support.careless_s3 import careless_s3
from tests.support.s3_server import DUMMY_REGION


async def test_moto_and_the_local_bucket_enforce_conditional_writes(bucket: Bucket) -> None:
    await check_conditional_writes(bucket, "tenants/")
    # The scratch key is gone afterwards.
    assert [i.key for i in await bucket.list(f"tenants/{PROBE_DIRECTORY}/")] == []


@pytest.fixture
async def careless(request: pytest.FixtureRequest) -> AsyncIterator[S3Bucket]:
    with careless_s3(ignores=request.param) as endpoint:
        async with S3Bucket(
            "careless",
            endpoint_url=endpoint,
            region=DUMMY_REGION,
            access_key_id="AKIDEXAMPLE",
            secret_access_key=Secret("not-checked"),
            retry=RetryPolicy(attempts=1),
        ) as bucket:
            yield bucket


@pytest.mark.parametrize(
    ("careless", "header"),
    [({"if-none-match"}, "If-None-Match"), ({"if-match"}, "If-Match")],
    indirect=["careless"],
)
async def test_a_store_that_ignores_a_conditional_header_fails_the_probe(
    careless: S3Bucket, header: str
) -> None:
    with pytest.raises(ConditionalWritesIgnoredError, match=header) as raised:
        await check_conditional_writes(careless, "tenants/")
    assert raised.value.key.startswith(f"tenants/{PROBE_DIRECTORY}/")
    # Cleaned up even so.
    with pytest.raises(ObjectNotFoundError):
        await careless.head(raised.value.key)


@pytest.mark.parametrize("careless", [set()], indirect=True)
async def test_the_careless_fake_passes_when_it_ignores_nothing(careless: S3Bucket) -> None:
    await check_conditional_writes(careless, "tenants/")


async def test_the_probe_runs_once_per_data_directory_and_store(
    bucket: Bucket, tmp_path: Path
) -> None:
    # A machine woken on its volume makes none of the probe's five requests again.
    data = tmp_path / "data"
    probe = functools.partial(check_conditional_writes_once, bucket, "tenants/", data_dir=data)
    assert await probe(store="https://fly.storage.tigris.dev b tenants/")
    assert not await probe(store="https://fly.storage.tigris.dev b tenants/")
    assert await probe(store="https://fly.storage.tigris.dev other tenants/")  # another store
    assert not await probe(store="https://fly.storage.tigris.dev other tenants/")
    assert (data / PASSED_FILE).read_bytes().count(b"\n") == 2
    assert b"tigris" not in (data / PASSED_FILE).read_bytes()  # names hashed


@pytest.mark.parametrize("careless", [{"if-match"}], indirect=True)
async def test_a_failed_probe_is_not_remembered(careless: S3Bucket, tmp_path: Path) -> None:
    for _ in range(2):
        with pytest.raises(ConditionalWritesIgnoredError):
            await check_conditional_writes_once(
                careless, "tenants/", store="careless", data_dir=tmp_path
            )
    assert not (tmp_path / PASSED_FILE).exists()
