"""Fixtures for the fault tests: a fault-injecting proxy in front of the test S3 server.

- ``fault_proxy``: a running ``FaultProxy`` in front of the session's moto server.
- ``s3``: one fresh bucket seen two ways: through the proxy (what tenantdb uses, faults
  and all) and directly (what the test uses to look at the truth), plus helpers to build
  TenantDB settings, open buckets and read ``lock.json``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Secret, Settings
from tenantdb.storage import RetryPolicy
from tenantdb.storage.s3 import S3Bucket
from tests.support.fault_proxy import FaultProxy
from tests.support.s3_server import (
    DUMMY_ACCESS_KEY_ID,
    DUMMY_REGION,
    DUMMY_SECRET_ACCESS_KEY,
    s3_client,
    s3_env,
)

TTL = 3.0
# Fast retries so that fault tests spend their time on faults, not on backoff.
FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05)
MiB = 1 << 20


@dataclass
class ProxiedS3:
    """A fresh bucket on the test S3 server, reachable directly and through the proxy."""

    endpoint: str
    proxy: FaultProxy
    name: str
    tmp_path: Path
    stack: AsyncExitStack
    _client: Any = field(default=None, repr=False)

    @property
    def client(self) -> Any:
        """A plain boto3 client on the S3 server itself (no proxy, no faults)."""
        if self._client is None:
            self._client = s3_client(self.endpoint)
        return self._client

    async def open(self, *, proxied: bool = True, **options: Any) -> S3Bucket:
        """An opened S3Bucket on this bucket, through the proxy unless ``proxied=False``."""
        options.setdefault("retry", FAST_RETRY)
        options.setdefault("connect_timeout", 1.0)
        options.setdefault("read_timeout", 2.0)
        options.setdefault("multipart_threshold", 6 * MiB)
        options.setdefault("part_size", 5 * MiB)
        bucket = S3Bucket(
            self.name,
            endpoint_url=self.proxy.url if proxied else self.endpoint,
            region=DUMMY_REGION,
            access_key_id=DUMMY_ACCESS_KEY_ID,
            secret_access_key=Secret(DUMMY_SECRET_ACCESS_KEY),
            **options,
        )
        return await self.stack.enter_async_context(bucket)

    def settings(self, machine: str, tenant: str = "acme", **overrides: Any) -> Settings:
        """Settings of machine ``machine`` (its own data dir); the bucket is passed apart."""
        values: dict[str, Any] = {
            "tenant": tenant,
            "machine_id": machine,
            "data_dir": self.tmp_path / machine,
            "lease_ttl": TTL,
            "checkpoint_interval": 0,
            "sync_interval": 3600,  # the tests decide when to ship: sync(), stop()
            "kill_timeout": 5,
        }
        values.update(overrides)
        return Settings(**values)

    def env(self, *, proxied: bool = True) -> dict[str, str]:
        """Environment variables naming this bucket, for subprocess servers."""
        return s3_env(self.name, self.proxy.url if proxied else self.endpoint)

    def get(self, key: str) -> bytes:
        """An object's bytes, read directly."""
        body: bytes = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return body

    def lock(self, tenant: str = "acme") -> dict[str, Any]:
        """The tenant's lock.json, read directly."""
        record: dict[str, Any] = json.loads(self.get(f"tenants/{tenant}/lock.json"))
        return record

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix``, read directly."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))

    def put(self, key: str, body: bytes) -> None:
        """Write an object directly (as something other than tenantdb would)."""
        self.client.put_object(Bucket=self.name, Key=key, Body=body)


@pytest.fixture
def fault_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's S3 server (no faults yet)."""
    with FaultProxy(s3_endpoint, seed=1234) as proxy:
        yield proxy


@pytest.fixture
async def s3(s3_endpoint: str, fault_proxy: FaultProxy, tmp_path: Path) -> AsyncIterator[ProxiedS3]:
    """A fresh bucket, reachable through ``fault_proxy`` and directly."""
    name = f"faults-{uuid.uuid4().hex[:16]}"
    async with AsyncExitStack() as stack:
        bucket = ProxiedS3(s3_endpoint, fault_proxy, name, tmp_path, stack)
        bucket.client.create_bucket(Bucket=name)
        yield bucket
        # The bucket objects must close before the proxy stops.
    if bucket._client is not None:
        bucket._client.close()
