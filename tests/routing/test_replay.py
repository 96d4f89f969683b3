"""The Router through TenantDBMiddleware, in process, with a real DNS responder on loopback UDP.

The middleware runs without a tenant of its own (a pure router) unless a test says otherwise;
requests go through httpx.ASGITransport, so bodies arrive in the chunks the client sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tenantdb import TenantDBMiddleware
from tenantdb.config import Secret, Settings
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.errors import ConfigurationError
from tenantdb.routing.arrival import ReplaySource
from tenantdb.routing.proxy import proxy_key, sign_proxied_by
from tenantdb.routing.replay import LOCAL_APP_NAME, Router
from tenantdb.storage import Bucket, LocalBucket
from tenantdb.storage.s3 import S3Bucket
from tenantdb.tenants import TenantPattern
from tests.support.fake_machines import FakeMachinesAPI, serve_fake_machines
from tests.support.lifespan import lifespan
from tests.support.s3_server import DUMMY_ACCESS_KEY_ID, DUMMY_REGION, DUMMY_SECRET_ACCESS_KEY

APP = "routeapp"
KEY = "customer_id"
SELF = "m0self"
MiB = 1 << 20


def meta_name(tenant: str, app: str = APP) -> str:
    return f"{tenant}.{KEY}.kv._metadata.{app}.internal."


async def inner(request: Request) -> Response:
    return PlainTextResponse("inner app")


INNER = Starlette(routes=[Route("/{path:path}", inner, methods=["GET", "POST"])])


@pytest.fixture
async def dns() -> AsyncIterator[DevDNSServer]:
    async with DevDNSServer(APP) as server:
        yield server


def settings_for(tmp_path: Path, dns: DevDNSServer | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "app_name": APP,
        "machine_id": SELF,
        "dns_server": dns.address if dns is not None else None,
        "local_bucket_dir": tmp_path / "bucket",
        "data_dir": tmp_path / "data",
        "metrics_port": 0,  # 9091 may be taken by another server on this machine
    }
    values.update(overrides)
    return Settings(**values)


def bucket_settings(bucket: Bucket) -> dict[str, Any]:
    """Settings fields naming the same storage as an opened test bucket."""
    if isinstance(bucket, LocalBucket):
        return {"local_bucket_dir": bucket.root}
    assert isinstance(bucket, S3Bucket)
    return {
        "bucket_name": bucket.name,
        "endpoint_url": bucket.endpoint_url,
        "region": DUMMY_REGION,
        "access_key_id": DUMMY_ACCESS_KEY_ID,
        "secret_access_key": Secret(DUMMY_SECRET_ACCESS_KEY),
    }


def lock_json(tenant: str, owner: str | None, last_owner: str | None) -> bytes:
    return json.dumps(
        {
            "format": 1,
            "tenant": tenant,
            "owner": owner,
            "region": "ams",
            "generation": 3,
            "seq": 7,
            "ttl_seconds": 15,
            "snapshot": None,
            "last_owner": last_owner,
        }
    ).encode()


class Harness:
    """A started middleware and a client to it."""

    def __init__(self, middleware: TenantDBMiddleware, client: httpx.AsyncClient) -> None:
        self.middleware = middleware
        self.client = client

    async def get(self, path: str, **headers: str) -> httpx.Response:
        return await self.client.get(path, headers=headers)


@pytest.fixture
async def harness_factory() -> AsyncIterator[Any]:
    stacks: list[Any] = []

    async def make(settings: Settings, **options: Any) -> Harness:
        middleware = TenantDBMiddleware(INNER, settings=settings, **options)
        running = lifespan(middleware)
        await running.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=middleware), base_url="http://tenantdb.test"
        )
        stacks.append((running, client))
        return Harness(middleware, client)

    yield make
    for running, client in reversed(stacks):
        await client.aclose()
        await running.__aexit__(None, None, None)


@pytest.fixture
async def router(harness_factory: Any, dns: DevDNSServer, tmp_path: Path) -> Harness:
    harness: Harness = await harness_factory(settings_for(tmp_path, dns))
    return harness


def assert_replay(response: httpx.Response, machine_id: str) -> None:
    """A replay to ``machine_id``: cached (no timeout, no fallback) or with the fallback."""
    assert response.status_code == 204, response.text
    if response.headers.get("fly-replay-cache", "invalidate") != "invalidate":
        assert response.headers["fly-replay"] == f"instance={machine_id}"
    else:
        assert response.headers["fly-replay"] == (
            f"instance={machine_id};timeout=2s;fallback=prefer_self"
        )
    assert response.content == b""


def assert_503(response: httpx.Response, *fragments: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    for fragment in fragments:
        assert fragment in response.text, response.text


# --- lookups -----------------------------------------------------------------------------


async def test_running_machine_gets_a_replay_with_a_replay_cache(
    router: Harness, dns: DevDNSServer
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    response = await router.get("/customers/beta/orders/7")
    assert_replay(response, "m2beta")
    assert response.headers["fly-replay-cache"] == "/customers/beta/*"
    assert response.headers["fly-replay-cache-ttl-secs"] == "30"
    assert "fly-replay-cache-status" not in response.headers


async def test_bare_tenant_path_is_replayed_without_a_cache_it_would_not_match(
    router: Harness, dns: DevDNSServer
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    response = await router.get("/customers/beta")
    assert_replay(response, "m2beta")
    assert "fly-replay-cache" not in response.headers


async def test_answers_are_cached(router: Harness, dns: DevDNSServer) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    for _ in range(5):
        assert_replay(await router.get("/customers/beta/x"), "m2beta")
    assert dns.query_count(meta_name("beta"), "AAAA") == 1


async def test_unknown_tenant_is_404_naming_what_was_asked(router: Harness) -> None:
    response = await router.get("/customers/nobody", accept="application/json")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error.startswith("no machine serves tenant nobody")
    assert "DNS" in error
    assert "lock.json" in error
    assert "fly-replay" not in response.headers


async def test_own_paths_and_other_paths_reach_the_app(router: Harness) -> None:
    response = await router.get("/about")
    assert response.status_code == 200
    assert response.text == "inner app"
    health = await router.get("/healthz")  # the middleware's own: a router has no loop to lose
    assert (health.status_code, health.text) == (200, "ok\n")


# --- stopped machines: lock.json --------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "last_owner", "expected"),
    [(None, "m2beta", "m2beta"), ("m3beta", "m2beta", "m3beta"), ("m3beta", None, "m3beta")],
)
async def test_stopped_machine_is_found_in_lock_json(
    harness_factory: Any,
    dns: DevDNSServer,
    tmp_path: Path,
    bucket: Bucket,
    owner: str | None,
    last_owner: str | None,
    expected: str,
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"}, running=False)  # DNS lists running machines only
    await bucket.put("tenants/beta/lock.json", lock_json("beta", owner, last_owner))
    harness = await harness_factory(settings_for(tmp_path, dns, **bucket_settings(bucket)))
    response = await harness.get("/customers/beta/orders")
    assert_replay(response, expected)
    # A stopped machine is a hint, not a place to pin later requests to.
    assert "fly-replay-cache" not in response.headers


async def test_damaged_lock_json_is_503(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, bucket: Bucket
) -> None:
    await bucket.put("tenants/beta/lock.json", b"{not json")
    harness = await harness_factory(settings_for(tmp_path, dns, **bucket_settings(bucket)))
    assert_503(await harness.get("/customers/beta"), "tenants/beta/lock.json is damaged")


@pytest.mark.parametrize(
    "log",
    [
        {"inline": ["é"]},  # not ASCII: a plain ValueError from b64decode, a 500 before
        {"updated_at": "yesterday"},
    ],
)
async def test_a_lock_json_with_a_bad_log_field_is_503_not_500(
    harness_factory: Any,
    dns: DevDNSServer,
    tmp_path: Path,
    local_bucket: LocalBucket,
    log: dict[str, Any],
) -> None:
    data = json.loads(lock_json("beta", "m2beta", None))
    data["log"] = {
        "base": 1,
        "tail": 1,
        "state": "0" * 16,
        "db_pages": 1,
        "runs": [[3, 1]],
        "updated_at": "2026-12-01T10:00:00+00:00",
        **log,
    }
    await local_bucket.put("tenants/beta/lock.json", json.dumps(data).encode())
    harness = await harness_factory(settings_for(tmp_path, dns, **bucket_settings(local_bucket)))
    assert_503(await harness.get("/customers/beta"), "tenants/beta/lock.json is damaged")


async def test_lock_json_naming_no_usable_machine_is_404(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, local_bucket: LocalBucket
) -> None:
    # An owner that could smuggle bytes into the fly-replay header is never used.
    await local_bucket.put(
        "tenants/beta/lock.json", lock_json("beta", "m2;elsewhere=true", "M2 BETA")
    )
    harness = await harness_factory(settings_for(tmp_path, dns, **bucket_settings(local_bucket)))
    response = await harness.get("/customers/beta")
    assert response.status_code == 404
    assert "its lock.json names no machine" in response.text


async def test_storage_error_is_503(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    settings = settings_for(
        tmp_path, dns, **{**bucket_settings(s3_bucket), "bucket_name": "no-such-bucket-here"}
    )
    harness = await harness_factory(settings)
    assert_503(await harness.get("/customers/beta"), "cannot be found right now")


# --- Machines API fallback --------------------------------------------------------------


@pytest.fixture
def machines_api() -> Iterator[FakeMachinesAPI]:
    with serve_fake_machines(APP) as fake:
        yield fake


async def test_machines_api_is_the_last_resort(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, machines_api: FakeMachinesAPI
) -> None:
    machines_api.add("zeta", state="stopped", machine_id="m9zeta")
    machines_api.add("other", state="stopped", machine_id="m1other")
    settings = settings_for(
        tmp_path,
        dns,
        fly_api_token=Secret("fo1_test-token"),
        machines_api_url=machines_api.base_url,
    )
    harness = await harness_factory(settings)
    assert_replay(await harness.get("/customers/zeta/a"), "m9zeta")
    response = await harness.get("/customers/nobody")
    assert response.status_code == 404
    assert "the Machines API lists no machine for it" in response.text


@pytest.fixture
async def zeta_via_api(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, machines_api: FakeMachinesAPI
) -> Harness:
    """A router with a Machines API token; tenant zeta's stopped machine is known to the API."""
    machines_api.add("zeta", state="stopped", machine_id="m9zeta")
    settings = settings_for(
        tmp_path, dns, fly_api_token=Secret("tok"), machines_api_url=machines_api.base_url
    )
    harness: Harness = await harness_factory(settings)
    machines_api.requests.clear()  # the startup check read this machine once
    return harness


async def test_one_cached_app_wide_list_answers_every_tenant(
    zeta_via_api: Harness, machines_api: FakeMachinesAPI
) -> None:
    # The API allows about one list per second: unknown tenant ids must not spend it.
    harness = zeta_via_api
    unknown = await asyncio.gather(*(harness.get(f"/customers/nobody{n}") for n in range(50)))
    assert {r.status_code for r in unknown} == {404}
    assert_replay(await harness.get("/customers/zeta/a"), "m9zeta")
    assert machines_api.queries == [{}]  # one list, unfiltered, for 51 tenants


async def test_a_429_pauses_the_machines_api_until_retry_after(
    zeta_via_api: Harness, machines_api: FakeMachinesAPI
) -> None:
    harness = zeta_via_api
    machines_api.fail_next = (429, {"error": "rate limited"})
    machines_api.retry_after = "30"
    assert_503(await harness.get("/customers/zeta"), "HTTP 429")
    harness.middleware.router.invalidate("zeta")  # not the failure cache: the pause answers
    assert_503(await harness.get("/customers/zeta"), "not asked again for")
    assert len(machines_api.requests) == 1


async def test_machines_that_fall_through_together_pause_for_different_times_after_a_429(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, machines_api: FakeMachinesAPI
) -> None:
    machines_api.add("zeta", state="stopped", machine_id="m9zeta")
    pauses = []
    for n in range(3):
        settings = settings_for(
            tmp_path / f"m{n}",
            dns,
            fly_api_token=Secret("tok"),
            machines_api_url=machines_api.base_url,
        )
        harness = await harness_factory(settings)
        machines_api.fail_next = (429, {"error": "rate limited"})
        machines_api.retry_after = "30"
        assert_503(await harness.get("/customers/zeta"), "HTTP 429")
        harness.middleware.router.invalidate("zeta")
        paused = await harness.get("/customers/zeta")
        match = re.search(r"not asked again for ([0-9.]+)s", paused.text)
        assert match is not None, paused.text
        pauses.append(float(match[1]))
    # Retry-After, plus up to half as long again, different on each machine.
    assert all(29 <= p <= 45 for p in pauses), pauses
    assert len(set(pauses)) == 3, pauses


async def test_machines_api_failure_is_503(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, machines_api: FakeMachinesAPI
) -> None:
    machines_api.fail_always = (500, {"error": "internal error"})
    settings = settings_for(
        tmp_path, dns, fly_api_token=Secret("tok"), machines_api_url=machines_api.base_url
    )
    harness = await harness_factory(settings)
    assert_503(await harness.get("/customers/zeta"), "HTTP 500")


async def test_machines_api_is_not_asked_without_a_token(
    router: Harness, machines_api: FakeMachinesAPI
) -> None:
    machines_api.add("zeta", state="stopped", machine_id="m9zeta")
    assert (await router.get("/customers/zeta")).status_code == 404
    assert machines_api.queries == []


# --- concurrency ------------------------------------------------------------------------


async def test_a_burst_for_one_tenant_makes_one_dns_lookup(
    router: Harness, dns: DevDNSServer
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    dns.reset_counters()  # the startup check looked up the Flycast address
    responses = await asyncio.gather(
        *(router.get(f"/customers/beta/item/{n}") for n in range(1000))
    )
    assert {r.status_code for r in responses} == {204}
    assert {r.headers["fly-replay"] for r in responses} == {"instance=m2beta"}
    # One AAAA and one TXT query: at most 2 queries for 1,000 requests.
    assert dns.query_count() <= 2
    assert dns.query_count(meta_name("beta"), "AAAA") == 1


async def test_a_burst_for_a_stopped_tenant_reads_lock_json_once(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, local_bucket: LocalBucket
) -> None:
    await local_bucket.put("tenants/beta/lock.json", lock_json("beta", None, "m2beta"))
    harness = await harness_factory(settings_for(tmp_path, dns, **bucket_settings(local_bucket)))
    reads = 0
    router = harness.middleware.router
    original = LocalBucket.get

    async def counting_get(self: LocalBucket, key: str, **options: Any) -> Any:
        nonlocal reads
        reads += 1
        return await original(self, key, **options)

    LocalBucket.get = counting_get  # type: ignore[method-assign]
    try:
        responses = await asyncio.gather(*(harness.get("/customers/beta") for _ in range(200)))
    finally:
        LocalBucket.get = original  # type: ignore[method-assign]
    assert {r.status_code for r in responses} == {204}
    assert reads == 1
    assert dns.query_count(meta_name("beta"), "AAAA") == 1
    assert router.enabled


# --- loop guard -------------------------------------------------------------------------


async def test_replayed_request_is_re_resolved_without_the_cache(
    router: Harness, dns: DevDNSServer
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    assert_replay(await router.get("/customers/beta/x"), "m2beta")  # cached now
    dns.set_machine("m2beta", {KEY: "beta"}, running=False)
    dns.set_machine("m3beta", {KEY: "beta"})
    # m2beta replayed it here (it no longer serves beta): the cache says m2beta, a fresh
    # lookup says m3beta, so it goes on to m3beta, without a replay cache (one hop only).
    response = await router.get(
        "/customers/beta/x", **{"fly-replay-src": "instance=m2beta;region=ams;t=1700000000000000"}
    )
    assert_replay(response, "m3beta")
    assert "fly-replay-cache" not in response.headers
    assert dns.query_count(meta_name("beta"), "AAAA") == 2
    # The fresh answer is cached for the next direct request.
    assert_replay(await router.get("/customers/beta/x"), "m3beta")
    assert dns.query_count(meta_name("beta"), "AAAA") == 2


@pytest.mark.parametrize(
    ("running", "points"),
    [("m2beta", "machine m2beta again"), (SELF, "this machine"), (None, "no machine")],
)
async def test_loop_guard_answers_503_instead_of_replaying_blindly(
    router: Harness, dns: DevDNSServer, running: str | None, points: str
) -> None:
    if running is not None:
        dns.set_machine(running, {KEY: "beta"})
    response = await router.get(
        "/customers/beta", **{"fly-replay-src": "instance=m2beta;region=ams;t=1"}
    )
    assert_503(response, "from machine m2beta through fly-replay", f"points at {points}")
    assert "fly-replay" not in response.headers
    assert dns.query_count(meta_name("beta"), "AAAA") == 1


async def test_replay_failed_is_503_and_forgets_the_cached_answer(
    router: Harness, dns: DevDNSServer
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    assert_replay(await router.get("/customers/beta"), "m2beta")
    response = await router.get("/customers/beta", **{"fly-replay-failed": "reason=timeout"})
    assert_503(response, "fly-replay-failed: reason=timeout")
    assert "fly-replay" not in response.headers
    assert_replay(await router.get("/customers/beta"), "m2beta")
    assert dns.query_count(meta_name("beta"), "AAAA") == 2  # asked again after the failure


@pytest.mark.parametrize(
    "value",
    ["garbage", "instance=", "instance=BAD ID;region=ams", ";;;", "region=ams;t=1", "t=x"],
)
async def test_malformed_replay_src_is_ignored(
    router: Harness, dns: DevDNSServer, value: str
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    response = await router.get("/customers/beta/x", **{"fly-replay-src": value})
    assert_replay(response, "m2beta")
    assert response.headers["fly-replay-cache"] == "/customers/beta/*"  # a direct request


async def test_cached_replay_to_the_wrong_machine_invalidates_the_cache(
    router: Harness, dns: DevDNSServer
) -> None:
    dns.set_machine("m3beta", {KEY: "beta"})
    response = await router.get("/customers/beta/x", **{"fly-replay-cache-status": "hit"})
    assert_replay(response, "m3beta")
    assert response.headers["fly-replay-cache"] == "invalidate"
    assert "fly-replay-cache-ttl-secs" not in response.headers
    # No machine to send it to: Fly documents the invalidation on a replay back to the
    # app, not on an error, so the request goes to another machine, which answers afresh.
    gone = await router.get("/customers/gone/x", **{"fly-replay-cache-status": "hit"})
    assert gone.status_code == 204
    assert gone.headers["fly-replay"] == "elsewhere=true;timeout=2s;fallback=prefer_self"
    assert gone.headers["fly-replay-cache"] == "invalidate"


async def test_a_cache_miss_is_an_ordinary_replay(router: Harness, dns: DevDNSServer) -> None:
    dns.set_machine("m3beta", {KEY: "beta"})
    response = await router.get("/customers/beta/x", **{"fly-replay-cache-status": "miss"})
    assert_replay(response, "m3beta")
    assert response.headers["fly-replay-cache"] == "/customers/beta/*"


async def test_proxied_request_is_not_proxied_back(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    settings = settings_for(tmp_path, dns, proxy_secret=Secret("app secret"))
    router = await harness_factory(settings)
    key = proxy_key(settings)
    assert key is not None
    signed = sign_proxied_by(key, "m2beta", "GET", "/customers/beta", time.time())
    response = await router.get("/customers/beta", **{"tenantdb-proxied-by": signed})
    assert_503(response, "through the tenantdb body proxy")


# --- DNS failures -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["silent", "servfail"])
async def test_dns_failure_is_503_with_retry_after(
    router: Harness, dns: DevDNSServer, mode: Any
) -> None:
    dns.mode = mode
    started = time.monotonic()
    response = await router.get("/customers/beta", accept="application/json")
    assert time.monotonic() - started < 5
    assert_503(response, "cannot be found right now")
    assert response.json()["status"] == 503
    # The failure is remembered briefly: the next requests do not wait for DNS again.
    dns.mode = "normal"
    dns.set_machine("m2beta", {KEY: "beta"})
    dns.reset_counters()
    started = time.monotonic()
    assert_503(await router.get("/customers/beta"), "cannot be found right now")
    assert time.monotonic() - started < 0.5
    assert dns.query_count() == 0
    # Then it is asked again, and succeeds.
    deadline = time.monotonic() + 5
    while (response := await router.get("/customers/beta")).status_code == 503:
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.1)
    assert_replay(response, "m2beta")


@pytest.mark.parametrize("mode", ["silent", "servfail"])
async def test_dns_failure_falls_back_to_lock_json(
    harness_factory: Any,
    dns: DevDNSServer,
    tmp_path: Path,
    local_bucket: LocalBucket,
    mode: Any,
) -> None:
    await local_bucket.put("tenants/beta/lock.json", lock_json("beta", "m2beta", None))
    await local_bucket.put("tenants/gamma/lock.json", lock_json("gamma", None, "m3gamma"))
    harness = await harness_factory(settings_for(tmp_path, dns, **bucket_settings(local_bucket)))
    dns.mode = mode
    assert_replay(await harness.get("/customers/beta"), "m2beta")
    # A slow or broken DNS server is not asked again for every tenant: the next one costs
    # no DNS query and no timeout.
    dns.reset_counters()
    started = time.monotonic()
    assert_replay(await harness.get("/customers/gamma"), "m3gamma")
    assert time.monotonic() - started < 0.5
    assert dns.query_count() == 0
    # Nothing else knows the tenant: "no machine" would be a guess, so 503, not 404.
    assert_503(await harness.get("/customers/delta"), "DNS")


# --- large bodies -----------------------------------------------------------------------


async def test_small_chunked_body_is_replayed(router: Harness, dns: DevDNSServer) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * (64 * 1024)

    response = await router.client.post("/customers/beta/upload", content=body())
    assert_replay(response, "m2beta")


async def test_large_bodies_are_413_when_proxying_is_off(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    harness = await harness_factory(settings_for(tmp_path, dns), proxy_large_bodies=False)
    response = await harness.client.post("/customers/beta/upload", content=b"x" * (3 * MiB))
    assert response.status_code == 413
    assert f"a body of {3 * MiB} bytes larger than the 1 MB" in response.text
    assert "proxy_large_bodies=False" in response.text

    async def body() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"y" * (64 * 1024)

    response = await harness.client.post("/customers/beta/upload", content=body())
    assert response.status_code == 413
    assert "a streamed body" in response.text
    # Fly's limit is "1MB": 1,000,000 bytes fit in a replay, one more byte does not.
    response = await harness.client.post("/customers/beta/upload", content=b"z" * 1_000_000)
    assert_replay(response, "m2beta")
    response = await harness.client.post("/customers/beta/upload", content=b"z" * 1_000_001)
    assert response.status_code == 413


async def test_unreachable_machine_for_a_large_body_is_503(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    harness = await harness_factory(
        settings_for(tmp_path, dns), machine_url=lambda machine_id: "http://127.0.0.1:9"
    )
    response = await harness.client.post("/customers/beta/upload", content=b"x" * (2 * MiB))
    assert_503(response, "machine m2beta directly")


# --- replay_to: this machine's own tenant, held elsewhere --------------------------------


async def replay_to(router: Router, path: str, holder: str, **headers: str) -> httpx.Response:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await router.replay_to(scope, receive, send, holder, "acme")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path, headers=headers)


async def test_replay_to_the_lease_holder(dns: DevDNSServer, tmp_path: Path) -> None:
    async with Router(settings_for(tmp_path, dns), TenantPattern()) as router:
        response = await replay_to(router, "/customers/acme/x", "m7holder")
        assert_replay(response, "m7holder")
        assert "fly-replay-cache" not in response.headers
        bounced = await replay_to(
            router, "/customers/acme/x", "m7holder", **{"fly-replay-src": "instance=m7holder"}
        )
        assert_503(bounced, "machine m7holder holds its lease but sent this request here")
        bad = await replay_to(router, "/customers/acme", "evil;app=other")
        assert_503(bad, "is not a Fly machine id")
        assert "fly-replay" not in bad.headers


# --- local mode and construction ---------------------------------------------------------


async def test_local_mode_without_a_tenant_warns_and_its_404_says_which_variable_to_set(
    harness_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tenantdb"):
        harness = await harness_factory(settings_for(tmp_path, None, app_name=None))
    assert not harness.middleware.router.can_replay
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "TENANT_ID is not set, so this machine serves no tenant; "
        "set TENANT_ID to the tenant this server should serve"
    ]
    response = await harness.get("/customers/beta")
    assert response.status_code == 404
    assert "this machine serves no tenant (TENANT_ID=beta would serve this one)" in response.text
    assert "routing other tenants to their machines needs Fly.io (FLY_APP_NAME)" in response.text


async def test_local_mode_with_a_tenant_says_which_one_it_serves(
    harness_factory: Any, tmp_path: Path
) -> None:
    harness = await harness_factory(settings_for(tmp_path, None, app_name=None, tenant="acme"))
    response = await harness.get("/customers/beta")
    assert response.status_code == 404
    assert "tenant beta is not served here: this machine serves tenant acme" in response.text


async def test_local_mode_with_a_dns_server_uses_the_dev_app_name(
    harness_factory: Any, tmp_path: Path
) -> None:
    async with DevDNSServer() as dev:
        assert dev.app_name == LOCAL_APP_NAME
        dev.set_machine("m2beta", {KEY: "beta"})
        harness = await harness_factory(settings_for(tmp_path, dev, app_name=None))
        assert_replay(await harness.get("/customers/beta/x"), "m2beta")


def test_constructing_a_router_does_no_io(tmp_path: Path) -> None:
    settings = Settings(
        app_name=APP,
        dns_server=("127.0.0.1", 9),
        bucket_name="nowhere",
        endpoint_url="http://127.0.0.1:9",
        fly_api_token=Secret("tok"),
    )
    router = Router(settings, TenantPattern())
    assert router.enabled
    assert repr(router) == f"Router(app={APP!r}, machine={settings.machine_id!r})"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"replay_cache_ttl": 5}, "at least 10s"),
        ({"cache_ttl": -1}, "TTLs"),
        ({"dns_timeout": 0}, "timeouts"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Router(Settings(app_name=APP), TenantPattern(), **options)


def test_proxy_url_template_names_the_machine() -> None:
    router = Router(Settings(app_name=APP, port=8081), TenantPattern())
    # On Fly, Flycast by default: it starts stopped machines and reaches 0.0.0.0 binds.
    assert router.machine_url("m2beta") == f"http://{APP}.flycast"
    internal = Router(Settings(dns_server=("127.0.0.1", 53), port=8081), TenantPattern())
    assert internal.machine_url("m2beta") == f"http://m2beta.vm.{LOCAL_APP_NAME}.internal:8081"
    env = {"TENANTDB_DNS_SERVER": "127.0.0.1:53", "TENANTDB_PROXY_URL": "http://10.0.0.1:{port}"}
    local = Router(Settings.from_env(env), TenantPattern())
    assert local.machine_url("m2beta") == "http://10.0.0.1:8080"
    assert (
        Router(Settings(app_name=APP), TenantPattern(), machine_url=str.upper).machine_url("m2")
        == "M2"
    )


@pytest.mark.parametrize("template", ["http://{machine}.x", "ftp://{machine_id}", "http://{0}"])
def test_bad_proxy_url_template_is_refused(template: str) -> None:
    with pytest.raises(ConfigurationError, match="proxy URL template") as raised:
        Router(Settings(app_name=APP, proxy_url=template), TenantPattern())
    assert f"TENANTDB_PROXY_URL={template!r}" in str(raised.value)
    assert raised.value.variable == "TENANTDB_PROXY_URL"


async def test_replay_cache_can_be_turned_off(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    middleware = TenantDBMiddleware(INNER, settings=settings_for(tmp_path, dns))
    middleware.router = Router(middleware.settings, middleware.pattern, replay_cache_ttl=0)
    async with lifespan(middleware):
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/customers/beta/x")
    assert_replay(response, "m2beta")
    assert "fly-replay-cache" not in response.headers


async def test_not_started_router_is_503(dns: DevDNSServer, tmp_path: Path) -> None:
    middleware = TenantDBMiddleware(INNER, settings=settings_for(tmp_path, dns))
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/customers/beta")
    assert_503(response, "must run the ASGI lifespan")


# --- startup checks ---------------------------------------------------------------------


@pytest.mark.parametrize(("stop_timeout", "warned"), [(5_000_000_000, True), ("60s", False)])
async def test_a_stop_timeout_shorter_than_the_kill_timeout_is_warned_about(
    dns: DevDNSServer,
    tmp_path: Path,
    machines_api: FakeMachinesAPI,
    caplog: pytest.LogCaptureFixture,
    stop_timeout: object,
    warned: bool,
) -> None:
    machines_api.add("alpha", machine_id=SELF, stop_timeout=stop_timeout)
    settings = settings_for(
        tmp_path,
        dns,
        kill_timeout=60.0,
        fly_api_token=Secret("tok"),
        machines_api_url=machines_api.base_url,
    )
    async with Router(settings, TenantPattern()):
        pass
    warnings = [r.getMessage() for r in caplog.records if "TENANTDB_KILL_TIMEOUT" in r.getMessage()]
    assert bool(warnings) is warned, warnings
    if warned:
        assert "5s timeout" in warnings[0]
        assert "tok" not in warnings[0]


async def test_a_missing_flycast_address_is_warned_about(
    dns: DevDNSServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def flycast_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "allocate-v6 --private" in r.getMessage()]

    async with Router(settings_for(tmp_path, dns), TenantPattern()):
        pass
    assert len(flycast_warnings()) == 1
    caplog.clear()
    dns.add_record(f"{APP}.flycast.", "AAAA", "fdaa:0:1:0:1::2")
    async with Router(settings_for(tmp_path, dns), TenantPattern()):
        pass
    assert flycast_warnings() == []


# --- hypothesis: arbitrary replay headers never cause an unintended 5xx ------------------

header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=120,
)
replay_src = st.one_of(
    header_text,
    st.builds(
        lambda instance, region, t, state: (
            f"instance={instance};region={region};t={t};state={state}"
        ),
        st.sampled_from(["m2beta", "m0self", "m3beta", "", "M2", "m2beta;x", "-"]),
        st.sampled_from(["ams", "", "x;y"]),
        st.one_of(st.integers(), header_text),
        header_text,
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    src=st.none() | replay_src,
    failed=st.none() | replay_src,
    cache_status=st.none() | st.sampled_from(["hit", "miss", "HIT", "bypass", ""]),
    tenant=st.sampled_from(["beta", "nobody", "m0self"]),
)
async def test_replay_headers_never_cause_an_unintended_5xx(
    router: Harness,
    dns: DevDNSServer,
    src: str | None,
    failed: str | None,
    cache_status: str | None,
    tenant: str,
) -> None:
    dns.set_machine("m2beta", {KEY: "beta"})
    headers = {
        name: value
        for name, value in (
            ("fly-replay-src", src),
            ("fly-replay-failed", failed),
            ("fly-replay-cache-status", cache_status),
        )
        if value is not None
    }
    response = await router.client.get(
        f"/customers/{tenant}/x", headers={k: v.encode("latin-1") for k, v in headers.items()}
    )
    assert response.status_code in (204, 404, 503), response.text
    if response.status_code == 503:
        assert response.headers["retry-after"] == "2"
        # Only the loop guard and replay failures answer 503 here.
        replayed = src is not None and ReplaySource.parse(src) is not None
        assert failed is not None or replayed, response.text
    if response.status_code == 204:
        # A stale cached route with nowhere to go is sent back to the app's load balancing.
        hit = (cache_status or "").strip().lower() == "hit"
        replayed = src is not None and ReplaySource.parse(src) is not None
        elsewhere = hit and not replayed and tenant != "beta"
        expected = "elsewhere=true" if elsewhere else "instance=m2beta"
        cached = response.headers.get("fly-replay-cache", "invalidate") != "invalidate"
        suffix = "" if cached else ";timeout=2s;fallback=prefer_self"
        assert response.headers["fly-replay"] == f"{expected}{suffix}"
        assert failed is None


# --- cached replays and fallbacks ----------------------------------------------------------


async def test_a_replay_is_either_cached_or_has_a_timeout_and_fallback(
    router: Harness, dns: DevDNSServer
) -> None:
    # Fly: "The timeout and fallback fields cannot be set in the fly-replay intended to be
    # cached"; tenantdb dev's proxy answers such a replay with PA03.
    dns.set_machine("m2beta", {KEY: "beta"})
    cached = await router.get("/customers/beta/orders")
    assert cached.headers["fly-replay-cache"] == "/customers/beta/*"
    assert cached.headers["fly-replay"] == "instance=m2beta"
    # The bare tenant path cannot be matched by a cache glob: uncached, with the fallback.
    uncached = await router.get("/customers/beta")
    assert "fly-replay-cache" not in uncached.headers
    assert uncached.headers["fly-replay"] == "instance=m2beta;timeout=2s;fallback=prefer_self"


async def test_with_replica_reads_no_replay_cache_pins_writes_to_a_replica(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path
) -> None:
    # DNS lists the tenant's replica (the lowest id) beside its holder.
    dns.set_machine("m1replica", {KEY: "beta"})
    dns.set_machine("m2holder", {KEY: "beta"})
    harness = await harness_factory(settings_for(tmp_path, dns, replica_reads=True))
    for method in ("GET", "POST"):
        response = await harness.client.request(method, "/customers/beta/orders")
        assert_replay(response, "m1replica")  # a replica serves a read, replays a write
        assert "fly-replay-cache" not in response.headers


@pytest.mark.parametrize(("replica_reads", "expected"), [(True, "m2near"), (False, "m1far")])
async def test_with_replica_reads_a_machine_of_the_tenant_in_this_region_comes_first(
    harness_factory: Any, dns: DevDNSServer, tmp_path: Path, replica_reads: bool, expected: str
) -> None:
    dns.set_machine("m1far", {KEY: "beta"}, region="fra")
    dns.set_machine("m2near", {KEY: "beta"}, region="ams")
    dns.set_machine("m0other", {KEY: "gamma"}, region="ams")
    settings = settings_for(tmp_path, dns, fly_region="ams", replica_reads=replica_reads)
    harness = await harness_factory(settings)
    assert_replay(await harness.get("/customers/beta/orders"), expected)
