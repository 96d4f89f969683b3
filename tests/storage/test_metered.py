"""The cost meter of ``MeteredBucket``: requests by Tigris's price class, bytes in and out.

Each scenario runs on the embedded local bucket and on moto's S3 server: what a call is
billed as must not depend on the backend (https://www.tigrisdata.com/docs/pricing/).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tenantdb.config import Secret
from tenantdb.errors import ObjectNotFoundError, PreconditionFailedError
from tenantdb.metrics import Metrics
from tenantdb.storage.base import Bucket
from tenantdb.storage.metered import MeteredBucket
from tenantdb.storage.s3 import S3Bucket
from tests.conftest import TEST_MULTIPART_THRESHOLD, TEST_PART_SIZE, create_s3_bucket
from tests.support.fault_proxy import FaultProxy
from tests.support.s3_server import DUMMY_ACCESS_KEY_ID, DUMMY_REGION, DUMMY_SECRET_ACCESS_KEY

LOCK = "tenants/acme/lock.json"


def counts(metrics: Metrics) -> dict[tuple[str, str], float]:
    """Requests by class and bytes by direction, as a scrape sees them."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics.text()):
        for sample in family.samples:
            if sample.name == "tenantdb_bucket_requests_total":
                assert sample.labels["tenant"] == "acme"
                found["requests", sample.labels["class"]] = sample.value
            elif sample.name == "tenantdb_bucket_bytes_total":
                assert sample.labels["tenant"] == "acme"
                found["bytes", sample.labels["direction"]] = sample.value
    return found


async def test_writes_and_lists_are_class_a_reads_class_b_and_deletes_free(
    bucket: Bucket, tmp_path: Path
) -> None:
    metrics = Metrics()
    metered = MeteredBucket(bucket, metrics, tenant="acme")
    info = await metered.put(LOCK, b"x" * 100, if_none_match="*")  # A, 100 in
    await metered.put(LOCK, b"y" * 50, if_match=info.etag)  # A, 50 in
    await metered.get(LOCK)  # B, 50 out
    await metered.head(LOCK)  # B
    src = tmp_path / "snapshot"
    src.write_bytes(b"z" * 1000)
    await metered.upload_file("tenants/acme/snap.sqlite3", src, if_none_match="*")  # A, 1000 in
    await metered.download_file("tenants/acme/snap.sqlite3", tmp_path / "copy")  # B, 1000 out
    assert len(await metered.list("tenants/acme/")) == 2  # A: one page
    await metered.delete("tenants/acme/snap.sqlite3")  # free
    assert counts(metrics) == {
        ("requests", "A"): 4.0,
        ("requests", "B"): 3.0,
        ("requests", "free"): 1.0,
        ("bytes", "in"): 1150.0,
        ("bytes", "out"): 1050.0,
    }


async def test_an_unchanged_poll_and_a_refused_cas_are_free_but_a_missing_object_is_billed(
    bucket: Bucket,
) -> None:
    # Tigris bills neither 304 Not Modified nor 412 Precondition Failed; a 404 it bills.
    metrics = Metrics()
    metered = MeteredBucket(bucket, metrics, tenant="acme")
    with pytest.raises(ObjectNotFoundError):
        await metered.get(LOCK)  # B
    info = await metered.put(LOCK, b"{}", if_none_match="*")  # A, 2 in
    assert await metered.get_if_changed(LOCK, info.etag) is None  # free
    with pytest.raises(PreconditionFailedError):
        await metered.put(LOCK, b"{ }", if_none_match="*")  # free
    changed = await metered.get_if_changed(LOCK, '"not-its-etag"')  # B, 2 out
    assert changed is not None
    assert counts(metrics) == {
        ("requests", "A"): 1.0,
        ("requests", "B"): 2.0,
        ("requests", "free"): 2.0,
        ("bytes", "in"): 2.0,
        ("bytes", "out"): 2.0,
    }


async def test_a_listing_is_billed_per_page_of_a_thousand_keys(bucket: Bucket) -> None:
    metrics = Metrics()
    metered = MeteredBucket(bucket, metrics, tenant="acme")
    assert await metered.list("tenants/nobody/") == []  # an empty listing is still a request
    for n in range(3):
        await bucket.put(f"tenants/acme/log/{n}.seg", b"s")  # unmetered
    await metered.list("tenants/acme/")
    assert counts(metrics) == {("requests", "A"): 2.0}


# What Tigris bills each S3 operation tenantdb uses as (https://www.tigrisdata.com/docs/pricing/).
OPERATION_CLASS = {
    "PutObject": "A",
    "CreateMultipartUpload": "A",
    "UploadPart": "A",
    "CompleteMultipartUpload": "A",
    "ListObjectsV2": "A",
    "GetObject": "B",
    "HeadObject": "B",
}


async def test_a_multipart_upload_and_a_ranged_download_count_every_request_they_make(
    s3_endpoint: str, tmp_path: Path
) -> None:
    # Counted by a proxy in front of moto, request by request, against the meter.
    name = create_s3_bucket(s3_endpoint)
    with FaultProxy(s3_endpoint) as proxy:
        inner = S3Bucket(
            name,
            endpoint_url=proxy.url,
            region=DUMMY_REGION,
            access_key_id=DUMMY_ACCESS_KEY_ID,
            secret_access_key=Secret(DUMMY_SECRET_ACCESS_KEY),
            multipart_threshold=TEST_MULTIPART_THRESHOLD,
            part_size=TEST_PART_SIZE,
        )
        metrics = Metrics()
        src = tmp_path / "snapshot"
        src.write_bytes(os.urandom(2 * TEST_PART_SIZE + 1000))  # three parts
        async with MeteredBucket(inner, metrics, tenant="acme") as metered:
            key = "tenants/acme/snapshots/s.sqlite3"
            await metered.upload_file(key, src, if_none_match="*")
            await metered.download_file(key, tmp_path / "copy")
        seen = collections.Counter(OPERATION_CLASS[s.operation] for s in proxy.seen())
    assert seen == {"A": 5, "B": 4}  # HEAD, create, 3 parts, complete; 3 ranged GETs
    counted = counts(metrics)
    assert (counted["requests", "A"], counted["requests", "B"]) == (seen["A"], seen["B"])
    assert counted["bytes", "in"] == counted["bytes", "out"] == src.stat().st_size
