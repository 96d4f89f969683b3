"""Routing between real uvicorn servers: replays, stopped owners, large bodies streamed across.

Two emulated machines run ``tests.support.routing_app`` in local mode (no FLY_APP_NAME, the
dev DNS responder named by TENANTDB_DNS_SERVER, one shared local bucket): m1 serves tenant
acme, m2 serves tenant beta. Requests for beta sent to m1 must reach m2.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tenantdb.dev.dns_server import DevDNSServer
from tests.support.servers import MachineProcesses, UvicornProcess

APP = "tests.support.routing_app:app"
KEY = "customer_id"
MiB = 1 << 20
PAYLOAD = os.urandom(3 * MiB)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()

Start = Callable[..., UvicornProcess]


@pytest.fixture
def dns() -> Iterator[DevDNSServer]:
    with DevDNSServer().run_in_thread() as server:
        yield server


@pytest.fixture
def start(tmp_path: Path, dns: DevDNSServer, subprocess_env: dict[str, str]) -> Iterator[Start]:
    """Start a machine serving ``tenant``; ``urls`` are the other machines it can stream to."""
    with MachineProcesses(tmp_path) as machines:

        def run(
            machine: str, tenant: str, urls: dict[str, str] | None = None, **env: str
        ) -> UvicornProcess:
            base = {
                **subprocess_env,
                "TENANTDB_DNS_SERVER": "{}:{}".format(*dns.address),
                "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket"),
                "TENANTDB_LEASE_TTL": "3",
                "ROUTING_TEST_MACHINE_URLS": json.dumps(urls or {}),
                "TENANTDB_PROXY_SECRET": "routing test",  # a local bucket has no secret key
            }
            server = machines.start(APP, machine, tenant, {**base, **env})
            dns.set_machine(machine, {KEY: tenant})
            return server

        yield run


@pytest.fixture
def pair(start: Start) -> tuple[UvicornProcess, UvicornProcess]:
    m2 = start("m2", "beta")
    m1 = start("m1", "acme", {"m2": m2.url})
    return m1, m2


def test_foreign_tenant_is_replayed_to_its_machine(
    pair: tuple[UvicornProcess, UvicornProcess], dns: DevDNSServer
) -> None:
    m1, m2 = pair
    response = httpx.get(f"{m1.url}/customers/beta/orders")
    assert response.status_code == 204, response.text
    # A cached replay carries no timeout or fallback: Fly refuses them there.
    assert response.headers["fly-replay"] == "instance=m2"
    assert response.headers["fly-replay-cache"] == "/customers/beta/*"
    assert response.content == b""
    # The owner serves its own tenant.
    own = httpx.get(f"{m2.url}/customers/beta")
    assert own.json() == {"tenant": "beta", "machine": "m2"}


def test_stopped_owner_is_found_in_lock_json(
    pair: tuple[UvicornProcess, UvicornProcess], dns: DevDNSServer
) -> None:
    m1, _ = pair
    dns.set_machine("m2", {KEY: "beta"}, running=False)  # out of DNS, still in lock.json
    response = httpx.get(f"{m1.url}/customers/beta")
    assert response.status_code == 204, response.text
    assert response.headers["fly-replay"] == "instance=m2;timeout=2s;fallback=prefer_self"
    assert "fly-replay-cache" not in response.headers
    missing = httpx.get(f"{m1.url}/customers/nobody", headers={"accept": "application/json"})
    assert missing.status_code == 404
    assert missing.json()["error"].startswith("no machine serves tenant nobody")


def test_large_body_is_streamed_to_the_owner(pair: tuple[UvicornProcess, UvicornProcess]) -> None:
    m1, _ = pair
    response = httpx.post(f"{m1.url}/customers/beta/upload?note=big", content=PAYLOAD, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["x-upload"] == "done"
    assert response.json() == {
        "tenant": "beta",
        "machine": "m2",
        "size": len(PAYLOAD),
        "sha256": PAYLOAD_SHA,
        "proxied_by": "m1",
        "query": "note=big",
        "host": m1.url.removeprefix("http://"),
    }


def test_chunked_body_is_streamed_once_it_outgrows_a_replay(
    pair: tuple[UvicornProcess, UvicornProcess],
) -> None:
    m1, _ = pair

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(PAYLOAD), 100_000):
            yield PAYLOAD[start : start + 100_000]

    response = httpx.put(f"{m1.url}/customers/beta/upload", content=chunks(), timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["sha256"] == PAYLOAD_SHA
    assert response.json()["size"] == len(PAYLOAD)
    assert response.json()["machine"] == "m2"

    def small() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 1000

    replayed = httpx.post(f"{m1.url}/customers/beta/upload", content=small())
    assert replayed.status_code == 204
    assert replayed.headers["fly-replay"] == "instance=m2"


def test_large_body_is_413_when_proxying_is_off(start: Start) -> None:
    m2 = start("m2", "beta")
    m3 = start("m3", "gamma", {"m2": m2.url}, ROUTING_TEST_PROXY_LARGE_BODIES="0")
    response = httpx.post(f"{m3.url}/customers/beta/upload", content=PAYLOAD, timeout=30)
    assert response.status_code == 413
    assert "proxy_large_bodies=False" in response.text


def test_dns_failure_is_503_not_500(
    pair: tuple[UvicornProcess, UvicornProcess], dns: DevDNSServer
) -> None:
    m1, _ = pair
    for mode in ("servfail", "silent"):
        dns.mode = mode  # type: ignore[assignment]
        response = httpx.get(f"{m1.url}/customers/delta", timeout=10)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "2"
        assert "DNS lookup for tenant delta" in response.text
    assert "Traceback" not in m1.log()
