"""Routing headers a client can forge: they cost no lookup beyond one per tenant per second,
and ``tenantdb-proxied-by`` counts only when signed with the app's key."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

from tenantdb.config import Secret
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.routing.proxy import PROXIED_BY, proxy_key, sign_proxied_by
from tenantdb.storage import LocalBucket
from tests.routing.test_replay import (
    KEY,
    Harness,
    assert_503,
    assert_replay,
    bucket_settings,
    dns,
    harness_factory,
    lock_json,
    meta_name,
    router,
    settings_for,
)

__all__ = ["dns", "harness_factory", "router"]  # fixtures, used by name

FORGED = {
    "fly-replay-src": "instance=m9forged;region=ams;t=1700000000000000",
    "fly-replay-failed": "reason=timeout",
    PROXIED_BY: "m9forged",
}


async def test_forged_routing_headers_cost_one_lookup_per_tenant_per_second(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, local_bucket: LocalBucket
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    await local_bucket.put("tenants/gamma/lock.json", lock_json("gamma", None, "m3gamma"))
    harness: Harness = await harness_factory(
        settings_for(tmp_path, dns, **bucket_settings(local_bucket))
    )
    reads = 0
    original = LocalBucket.get

    async def counting_get(self: LocalBucket, key: str, **options: Any) -> Any:
        nonlocal reads
        reads += 1
        return await original(self, key, **options)

    dns.reset_counters()
    LocalBucket.get = counting_get  # type: ignore[method-assign]
    started = time.monotonic()
    try:
        for _ in range(30):  # one after the other, as a client's requests come
            for name, value in FORGED.items():
                for tenant in ("beta", "gamma"):
                    await harness.get(f"/customers/{tenant}/x", **{name: value})
    finally:
        LocalBucket.get = original  # type: ignore[method-assign]
    # 180 forged requests: before, each cost a DNS query (and for the stopped tenant a
    # lock.json GET); now one fresh lookup per tenant per second at most.
    allowed = 2 + int(time.monotonic() - started)
    assert dns.query_count(meta_name("beta"), "AAAA") <= allowed
    assert dns.query_count(meta_name("gamma"), "AAAA") <= allowed
    assert reads <= allowed


async def test_proxied_by_counts_only_signed_with_the_app_key(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    settings = settings_for(tmp_path, dns, proxy_secret=Secret("app secret"))
    harness: Harness = await harness_factory(settings)
    # Unsigned, or signed with another key: a direct request (replayed, with a cache).
    other = proxy_key(settings_for(tmp_path, dns, proxy_secret=Secret("guess")))
    assert other is not None
    for value in (
        "m2beta",
        sign_proxied_by(other, "m2beta", "GET", "/customers/beta", time.time()),
    ):
        response = await harness.get("/customers/beta", **{PROXIED_BY: value})
        assert_replay(response, "m2beta")
    key = proxy_key(settings)
    assert key is not None
    # Signed for another path or too long ago: not trusted either.
    for value in (
        sign_proxied_by(key, "m2beta", "GET", "/customers/other", time.time()),
        sign_proxied_by(key, "m2beta", "GET", "/customers/beta", time.time() - 600),
    ):
        assert_replay(await harness.get("/customers/beta", **{PROXIED_BY: value}), "m2beta")
    # Signed by a machine of the app: the loop guard holds (beta's machine sent it here).
    signed = sign_proxied_by(key, "m2beta", "GET", "/customers/beta", time.time())
    response = await harness.get("/customers/beta", **{PROXIED_BY: signed})
    assert_503(response, "through the tenantdb body proxy")


async def test_an_oversized_lock_json_is_refused_unread_by_the_router(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, local_bucket: LocalBucket
) -> None:
    await local_bucket.put("tenants/delta/lock.json", b" " * (16 << 20))
    harness: Harness = await harness_factory(
        settings_for(tmp_path, dns, **bucket_settings(local_bucket))
    )
    tracemalloc.start()
    try:
        response = await harness.get("/customers/delta/x")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_503(response, "over the 65536-byte limit")
    assert peak < 4 << 20, f"{peak >> 20} MiB allocated to refuse it"
