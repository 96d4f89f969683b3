"""Prometheus metrics of a real machine: scraped on their own port before and after requests,
a replay, a 404 and a checkpoint, parsed with prometheus_client's own parser.

m1 serves tenant acme (``tests.support.apps:starlette_app`` under uvicorn), m2 serves beta;
the dev DNS responder tells m1 where beta is, as Fly's internal DNS would.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.errors import ObjectNotFoundError
from tenantdb.metrics import Metrics, MetricsServer
from tenantdb.storage import LocalBucket
from tenantdb.storage.metered import MeteredBucket
from tests.support.servers import MachineProcesses, UvicornProcess, free_port

APP = "tests.support.apps:starlette_app"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, by name and labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when it does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(port: int, check: Callable[[Samples], bool], timeout: float = 15) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


@pytest.fixture
def machines(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> Iterator[tuple[UvicornProcess, int]]:
    """m1 (acme, metrics on a free port, a checkpoint every second) and m2 (beta)."""
    with DevDNSServer().run_in_thread() as dns, MachineProcesses(tmp_path) as machines:
        base = {
            **subprocess_env,
            "TENANTDB_DNS_SERVER": "{}:{}".format(*dns.address),
            "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket"),
            "TENANTDB_METRICS_PORT": "0",
        }
        machines.start(APP, "m2", "beta", base)
        dns.set_machine("m2", {"customer_id": "beta"})
        port = free_port()
        m1 = machines.start(
            APP,
            "m1",
            "acme",
            {**base, "TENANTDB_METRICS_PORT": str(port), "TENANTDB_CHECKPOINT_INTERVAL": "1"},
        )
        dns.set_machine("m1", {"customer_id": "acme"})
        yield m1, port


def test_the_metrics_move_with_requests_replays_and_checkpoints(
    machines: tuple[UvicornProcess, int],
) -> None:
    m1, port = machines
    before = scrape(port)
    assert value(before, "tenantdb_lease_state", tenant="acme", state="serving") == 1
    assert value(before, "tenantdb_lease_state", tenant="acme", state="standby") == 0
    assert value(before, "tenantdb_lease_generation", tenant="acme") >= 1

    with httpx.Client(base_url=m1.url, timeout=10) as http:
        for _ in range(3):
            assert http.get("/customers/acme").status_code == 200
        # The bare tenant path cannot match a replay cache glob: replayed uncached.
        for path in ("/customers/beta", "/customers/beta/visits"):
            assert http.get(path).headers["fly-replay"].startswith("instance=m2")
        assert http.get("/customers/nobody").status_code == 404
    after = scrape(port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tenantdb_routing_decisions_total", outcome="local") == 3
    assert moved("tenantdb_routing_decisions_total", outcome="replay") == 1
    assert moved("tenantdb_routing_decisions_total", outcome="cached_replay") == 1
    assert moved("tenantdb_routing_decisions_total", outcome="404") == 1
    assert moved("tenantdb_lookup_seconds_count", source="dns") == 2  # beta once (cached), nobody
    # Every write was held by the output gate until the bucket had it.
    assert moved("tenantdb_gate_responses_total", outcome="durable") == 3
    assert moved("tenantdb_gate_wait_seconds_count") == 3
    assert value(after, "tenantdb_gate_held_responses") == 0
    assert moved("tenantdb_shipped_segments_total") >= 1
    assert moved("tenantdb_shipped_bytes_total") > 0
    assert moved("tenantdb_publish_seconds_count") >= 1
    assert value(after, "tenantdb_log_lag_seconds", tenant="acme") == 0

    checkpointed = wait_for(
        port,
        lambda s: (
            value(s, "tenantdb_checkpoint_seconds_count")
            > value(after, "tenantdb_checkpoint_seconds_count")
        ),
    )
    assert value(checkpointed, "tenantdb_checkpoint_seconds_count") > value(
        after, "tenantdb_checkpoint_seconds_count"
    )
    assert value(checkpointed, "tenantdb_upload_seconds_count", object="snapshot") > value(
        after, "tenantdb_upload_seconds_count", object="snapshot"
    )


def test_each_middleware_has_a_registry_of_its_own() -> None:
    first, second = Metrics(), Metrics()
    first.routed("local")
    assert 'tenantdb_routing_decisions_total{outcome="local"} 1.0' in first.text()
    assert "outcome=" not in second.text()


def test_a_new_tenants_first_start_and_lookups_of_unknown_tenants_are_no_bucket_errors(
    machines: tuple[UvicornProcess, int],
) -> None:
    # acme never ran before: its first start found no lock.json, as does the lookup of a
    # tenant that has none. Both are answers, not failures of the bucket.
    m1, port = machines
    assert httpx.get(f"{m1.url}/customers/nobody", timeout=10).status_code == 404
    errors = {k: v for k, v in scrape(port).items() if k[0] == "tenantdb_bucket_errors_total"}
    assert errors == {}


async def test_a_missing_object_other_than_lock_json_is_a_bucket_error(tmp_path: Path) -> None:
    metrics = Metrics()
    async with MeteredBucket(LocalBucket(tmp_path / "bucket"), metrics) as bucket:
        with pytest.raises(ObjectNotFoundError):
            await bucket.get("tenants/acme/lock.json")
        with pytest.raises(ObjectNotFoundError):
            await bucket.get("tenants/acme/log/00000001/1.seg")
    assert 'tenantdb_bucket_errors_total{kind="object_not_found"} 1.0' in metrics.text()


async def test_the_metrics_server_listens_on_loopback_unless_given_a_host() -> None:
    port = free_port()
    async with MetricsServer(Metrics(), port) as server:
        assert server.address == f"127.0.0.1:{port}"
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{outward_address()}:{port}/metrics", timeout=5)


def outward_address() -> str:
    """This computer's address on its way out (no packet is sent), which is not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        address: str = probe.getsockname()[0]
    return address
