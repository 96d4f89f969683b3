"""The cost meter: usage records in keys, their writer, and what `tenantdb status` makes of
them (the last day's requests and a month's estimate), on both buckets."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tenantdb.errors import TransientStorageError
from tenantdb.machine.usage import UsageReporter
from tenantdb.metrics import Metrics
from tenantdb.protocol.usage import Usage, UsageRecord, parse_usage_key, usage_key
from tenantdb.replication.history import read_history
from tenantdb.storage import Bucket
from tenantdb.storage.metered import MeteredBucket
from tests.support.s3_server import s3_client
from tests.support.servers import MachineProcesses
from tests.test_cli_tenants import cli_env, run, tenant, write  # noqa: F401 (cli_env: a fixture)

pytestmark = pytest.mark.usefixtures("clean_environment")

NONCE = "0123456789ab"


def reading(key: str) -> UsageRecord | None:
    return parse_usage_key(key.removeprefix("tenants/acme/"))


def test_a_usage_record_round_trips_through_its_key() -> None:
    record = UsageRecord(1_765_000_000_000, Usage(12, 340, 5_600, 78_000))
    key = usage_key("tenants/", "acme", record, NONCE)
    assert key == f"tenants/acme/usage/1765000000000-a12-b340-i5600-o78000-{NONCE}"
    assert reading(key) == record


@pytest.mark.parametrize(
    "rest",
    [
        "usage/1765000000000-a1-b2-i3-o4",  # no nonce
        "usage/1765000000000-a1-b2-i3-o4-0123456789AB",  # not lower-case hex
        "usage/1765000000000-a1-b2-i3-o4-0123456789ab.json",
        "usage/1765000000000-a-1-b2-i3-o4-0123456789ab",
        "usage/1765000000000-a1234567890123456-b2-i3-o4-0123456789ab",  # 16 digits
        "usage/999999999999999-a1-b2-i3-o4-0123456789ab",  # past the year 9000
        "usage/1765000000000-a1-b2-i3-o4-0123456789ab/more",
        "usage/notes.txt",
    ],
)
def test_a_key_that_is_not_a_usage_record_is_none(rest: str) -> None:
    assert parse_usage_key(rest) is None


class FailingPuts:
    """``bucket`` whose next ``failures`` writes fail, as a storage outage would."""

    def __init__(self, bucket: Bucket, failures: int) -> None:
        self.inner = bucket
        self.failures = failures

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def put(self, key: str, body: bytes, **conditions: str) -> object:
        if self.failures:
            self.failures -= 1
            raise TransientStorageError("injected: the bucket is unavailable", key=key)
        return await self.inner.put(key, body, **conditions)


async def records(bucket: Bucket) -> list[UsageRecord]:
    found = [reading(info.key) for info in await bucket.list("tenants/acme/usage/")]
    return [r for r in found if r is not None]


async def test_the_reporter_records_each_interval_and_at_exit_and_nothing_when_idle(
    bucket: Bucket,
) -> None:
    metrics = Metrics()
    metered = MeteredBucket(bucket, metrics, tenant="acme")
    reporter = UsageReporter(metered, metrics, tenant="acme", prefix="tenants/", interval=0.2)
    async with reporter:
        await metered.put("tenants/acme/some-object", b"x" * 100)  # 1 A, 100 bytes in
        await metered.get("tenants/acme/some-object")  # 1 B, 100 bytes out
        await asyncio.sleep(0.3)
        [first] = await records(bucket)
        assert first.usage == Usage(class_a=1, class_b=1, bytes_in=100, bytes_out=100)
        await asyncio.sleep(0.6)  # idle: the record's own PUT alone makes no record
        assert len(await records(bucket)) == 1
        await metered.get("tenants/acme/some-object")
    found = sorted(await records(bucket), key=lambda r: r.ended_ms)
    assert [r.usage for r in found] == [first.usage, Usage(1, 1, 0, 100)]  # written at exit


async def test_a_record_that_cannot_be_written_is_counted_into_the_next(bucket: Bucket) -> None:
    metrics = Metrics()
    failing = FailingPuts(bucket, failures=1)
    metered = MeteredBucket(failing, metrics, tenant="acme")  # type: ignore[arg-type]
    reporter = UsageReporter(metered, metrics, tenant="acme", prefix="tenants/", interval=3600)
    async with reporter:
        for _ in range(3):
            await metered.list("tenants/acme/")  # 3 A
        await reporter.record()  # fails: logged, kept
        assert await records(bucket) == []
    [record] = await records(bucket)
    assert record.usage.class_a == 3 + 1  # and the failed PUT (metered.py counts it)


async def test_status_shows_the_last_days_requests_and_a_monthly_estimate(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("cli_env")  # the command reads this bucket
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 2)
    now = datetime.now(UTC)

    async def put_record(ago: timedelta, usage: Usage, nonce: str) -> str:
        ended = int((now - ago).timestamp() * 1000)
        key = usage_key("tenants/", "acme", UsageRecord(ended, usage), nonce)
        await bucket.put(key, b"", if_none_match="*")
        return key

    await put_record(timedelta(hours=1), Usage(100_000, 1_000_000, 10, 20), "0" * 12)
    await put_record(timedelta(hours=20), Usage(20_000, 200_000, 1, 2), "1" * 12)
    old = await put_record(timedelta(days=3), Usage(9_999_999, 0, 0, 0), "2" * 12)
    monkeypatch.setenv("TENANTDB_PRICE_STORAGE", "0")
    code, out, err = await run("status", "acme", "--json")
    assert (code, err) == (0, "")
    [status] = json.loads(out)
    cost = status["cost"]
    assert cost["last_day"] == {
        "class_a": 120_000,
        "class_b": 1_200_000,
        "bytes_in": 11,
        "bytes_out": 22,
    }
    assert cost["stored_bytes"] > 0
    # At Tigris's list prices: 30 x (120 x $0.005 + 1,200 x $0.0005) = $36.
    assert cost["monthly_usd"] == pytest.approx(36.0)
    monkeypatch.setenv("TENANTDB_PRICE_CLASS_A", "0.01")
    code, out, _ = await run("status", "acme")
    header, row = out.splitlines()
    assert "REQUESTS A/B (DAY)" in header
    assert "120,000 / 1,200,000" in row
    assert "$54.00" in row  # 30 x (120 x $0.01 + 1,200 x $0.0005)
    # Retention deletes a record a day older than its cutoff, and only such records.
    history = await read_history(bucket, "acme", prefix="tenants/")
    usage_gone = [
        k for k in history.expendable(now - timedelta(days=1), keep_snapshots=5) if "/usage/" in k
    ]
    assert usage_gone == [old]


def test_a_machine_records_its_usage_when_it_stops(
    tmp_path: Path, s3_settings_env: dict[str, str]
) -> None:
    with MachineProcesses(tmp_path) as machines:
        env = {**s3_settings_env, "TENANTDB_LEASE_TTL": "3"}
        server = machines.start("tests.support.apps:starlette_app", "m1", "acme", env)
        for _ in range(3):
            assert httpx.get(f"{server.url}/customers/acme", timeout=10).status_code == 200
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    client = s3_client(s3_settings_env["AWS_ENDPOINT_URL_S3"])
    listed = client.list_objects_v2(
        Bucket=s3_settings_env["BUCKET_NAME"], Prefix="tenants/acme/usage/"
    )
    [record] = [reading(o["Key"]) for o in listed["Contents"]]
    assert record is not None
    # At least the three writes' CASes, the start's and the stop's (class A), and the
    # start's reads (class B).
    assert record.usage.class_a >= 3 + 2
    assert record.usage.class_b >= 1
    assert record.usage.bytes_in > 0
