"""MachinesClient against a fake Machines API served by a real uvicorn on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from tenantdb.config import Secret
from tenantdb.errors import (
    ConfigurationError,
    InvalidTenantError,
    MachinesAPIError,
    RoutingError,
)
from tenantdb.routing.machines_api import Machine, MachinesClient
from tests.support.fake_machines import FakeMachinesAPI, serve_fake_machines
from tests.support.servers import free_port

TOKEN = "fo1_TOPSECRET-machines-token-5f2a9c"
APP = "tenantdb-test"


@pytest.fixture(scope="module")
def served_api() -> Iterator[FakeMachinesAPI]:
    """One FakeMachinesAPI for the module, served on a free loopback port."""
    with serve_fake_machines(APP, TOKEN) as fake:
        yield fake


@pytest.fixture
def fake_api(served_api: FakeMachinesAPI) -> FakeMachinesAPI:
    """The served fake API, emptied for this test."""
    served_api.reset()
    return served_api


def client_for(fake: FakeMachinesAPI, token: str = TOKEN, **kwargs: Any) -> MachinesClient:
    return MachinesClient(fake.app_name, Secret(token), base_url=fake.base_url, **kwargs)


# --- listing ---


async def test_list_sends_bearer_token_and_no_filter(fake_api: FakeMachinesAPI) -> None:
    a = fake_api.add("acme")
    b = fake_api.add(None)
    async with client_for(fake_api) as client:
        machines = await client.list_machines()
    assert {m.id for m in machines} == {a, b}
    [req] = fake_api.requests
    assert req.method == "GET"
    assert req.path == f"/v1/apps/{APP}/machines"
    assert req.query == {}
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["user-agent"].startswith("tenantdb")


async def test_list_with_metadata_filter_uses_query_params(fake_api: FakeMachinesAPI) -> None:
    acme = fake_api.add("acme")
    fake_api.add("globex")
    async with client_for(fake_api) as client:
        machines = await client.list_machines({"customer_id": "acme"})
    assert [m.id for m in machines] == [acme]
    assert fake_api.requests[0].query == {"metadata.customer_id": "acme"}


async def test_machine_fields_are_parsed(fake_api: FakeMachinesAPI) -> None:
    machine_id = fake_api.add("acme", state="stopped")
    async with client_for(fake_api) as client:
        [machine] = await client.list_machines()
    assert machine == Machine(
        id=machine_id,
        name="acme",
        state="stopped",
        region="ams",
        metadata={"customer_id": "acme"},
        private_ip="fdaa:0:1::2",
        instance_id=f"01INST{machine_id.upper()}",
        image="img:1",
    )
    assert machine.tenant("customer_id") == "acme"
    assert machine.tenant("other_key") is None
    with pytest.raises(TypeError):
        machine.metadata["customer_id"] = "evil"  # type: ignore[index]
    assert machine.to_json()["metadata"] == {"customer_id": "acme"}


async def test_find_tenant_machines_filters_sorts_and_drops_gone(
    fake_api: FakeMachinesAPI,
) -> None:
    ids = sorted(fake_api.add("acme") for _ in range(3))
    fake_api.add("acme", state="destroying")
    fake_api.add("globex")
    async with client_for(fake_api) as client:
        machines = await client.find_tenant_machines("acme")
    assert [m.id for m in machines] == ids
    assert fake_api.requests[0].query == {"metadata.customer_id": "acme"}


async def test_find_tenant_machines_custom_metadata_key(fake_api: FakeMachinesAPI) -> None:
    machine_id = fake_api.add("acme", key="tenant")
    async with client_for(fake_api) as client:
        machines = await client.find_tenant_machines("acme", "tenant")
    assert [m.id for m in machines] == [machine_id]
    assert fake_api.requests[0].query == {"metadata.tenant": "acme"}


async def test_api_ignoring_the_filter_never_returns_other_tenants(
    fake_api: FakeMachinesAPI,
) -> None:
    acme = fake_api.add("acme")
    fake_api.add("globex")
    fake_api.add(None)
    fake_api.list_override = list(fake_api.machines.values())  # the filter is ignored
    async with client_for(fake_api) as client:
        machines = await client.find_tenant_machines("acme")
    assert [m.id for m in machines] == [acme]


@pytest.mark.parametrize(
    "bad_id", ["../../etc/passwd", "ABC", "", "a b", "x" * 64, "id\r\nX-Evil: 1", 123, None]
)
async def test_invalid_machine_id_in_response_is_refused(
    fake_api: FakeMachinesAPI, bad_id: object
) -> None:
    fake_api.list_override = [{"id": bad_id, "state": "started", "config": {}}]
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError) as info:
            await client.list_machines()
    assert info.value.status == 200
    assert "unusable machine" in str(info.value)


@pytest.mark.parametrize("answer", [{"machines": []}, "not json at all"])
async def test_malformed_list_answer_is_an_error(fake_api: FakeMachinesAPI, answer: Any) -> None:
    fake_api.fail_next = (200, answer)
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError) as info:
            await client.list_machines()
    assert info.value.status == 200


async def test_invalid_tenant_in_metadata_is_not_a_tenant(fake_api: FakeMachinesAPI) -> None:
    fake_api.add("Not_A_Tenant")
    async with client_for(fake_api) as client:
        [machine] = await client.list_machines()
    assert machine.tenant("customer_id") is None


# --- creating ---


async def test_create_machine_request_body(fake_api: FakeMachinesAPI) -> None:
    async with client_for(fake_api) as client:
        machine = await client.create_machine(
            "acme",
            image="registry.fly.io/myapp:v3",
            region="ams",
            env={"LOG_LEVEL": "debug"},
            memory_mb=512,
            cpus=2,
        )
    [req] = fake_api.requests
    assert (req.method, req.path) == ("POST", f"/v1/apps/{APP}/machines")
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["content-type"] == "application/json"
    body = req.body
    assert body["region"] == "ams"
    assert body["name"] == "acme"
    config = body["config"]
    assert config["image"] == "registry.fly.io/myapp:v3"
    assert config["metadata"] == {"customer_id": "acme"}
    assert config["env"]["TENANT_ID"] == "acme"
    assert config["env"]["LOG_LEVEL"] == "debug"
    assert config["env"]["TENANTDB_METADATA_KEY"] == "customer_id"
    assert config["guest"] == {"cpu_kind": "shared", "cpus": 2, "memory_mb": 512}
    assert config["auto_destroy"] is False
    assert config["restart"]["policy"] == "on-failure"
    assert config["stop_config"] == {"timeout": 30_000_000_000}
    [service] = config["services"]
    assert service["internal_port"] == 8080
    assert service["protocol"] == "tcp"
    assert service["autostop"] == "stop"
    assert service["autostart"] is True
    assert service["min_machines_running"] == 0
    assert {p["port"] for p in service["ports"]} == {80, 443}
    [check] = service["checks"]  # the middleware's health: red when a needed loop died
    assert (check["type"], check["method"], check["path"]) == ("http", "GET", "/healthz")
    # Flycast is plain HTTP on port 80: forcing HTTPS there breaks every large upload.
    assert not any(p.get("force_https") for p in service["ports"])
    assert config["env"]["PORT"] == "8080"
    # Fly's Prometheus scrapes a Machines API machine only where config.metrics says.
    assert config["metrics"] == {"port": 9091, "path": "/metrics"}
    assert machine.id in fake_api.machines
    assert machine.tenant("customer_id") == "acme"
    assert machine.region == "ams"


async def test_create_machine_options(fake_api: FakeMachinesAPI) -> None:
    async with client_for(fake_api) as client:
        await client.create_machine(
            "acme",
            image="img",
            metadata_key="tenant",
            internal_port=3000,
            autostop="off",
            autostart=False,
            kill_timeout=5,
            env={"TENANTDB_METRICS_PORT": "9100"},
        )
    body = fake_api.requests[0].body
    assert "region" not in body  # Fly picks one
    assert body["config"]["metadata"] == {"tenant": "acme"}
    assert body["config"]["env"]["TENANTDB_METADATA_KEY"] == "tenant"
    assert body["config"]["stop_config"] == {"timeout": 5_000_000_000}
    [service] = body["config"]["services"]
    assert (service["internal_port"], service["autostop"], service["autostart"]) == (
        3000,
        "off",
        False,
    )
    # Scraped where the machine's own TENANTDB_METRICS_PORT says it serves its metrics.
    assert body["config"]["metrics"] == {"port": 9100, "path": "/metrics"}
    # The app must listen where the service sends traffic.
    assert body["config"]["env"]["PORT"] == "3000"


async def test_a_machine_without_metrics_has_no_metrics_config(fake_api: FakeMachinesAPI) -> None:
    async with client_for(fake_api) as client:
        await client.create_machine("acme", image="img", env={"TENANTDB_METRICS_PORT": "0"})
        await client.create_machine("globex", image="img", metrics_port=0)
    assert all("metrics" not in r.body["config"] for r in fake_api.requests)


async def test_autostop_suspend_is_refused_before_any_request(fake_api: FakeMachinesAPI) -> None:
    async with client_for(fake_api) as client:
        with pytest.raises(ConfigurationError, match=r"suspend.*lease"):
            await client.create_machine("acme", image="img", autostop="suspend")
    assert fake_api.requests == []


async def test_env_port_contradicting_the_internal_port_is_refused(
    fake_api: FakeMachinesAPI,
) -> None:
    async with client_for(fake_api) as client:
        with pytest.raises(ConfigurationError, match="PORT"):
            await client.create_machine("acme", image="img", internal_port=3000, env={"PORT": "80"})
    assert fake_api.requests == []


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(5_000_000_000, 5.0), ("60s", 60.0), ("1m30s", 90.0), ("500ms", 0.5), ("soon", None)],
)
async def test_get_machine_reads_the_stop_timeout(
    fake_api: FakeMachinesAPI, raw: object, seconds: float | None
) -> None:
    machine_id = fake_api.add("acme", stop_timeout=raw)
    async with client_for(fake_api) as client:
        machine = await client.get_machine(machine_id)
    assert machine.stop_timeout == seconds


async def test_a_429_carries_its_retry_after(fake_api: FakeMachinesAPI) -> None:
    fake_api.fail_next = (429, {"error": "rate limit exceeded"})
    fake_api.retry_after = "7"
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError) as caught:
            await client.list_machines()
    assert (caught.value.status, caught.value.retry_after) == (429, 7.0)


@pytest.mark.parametrize("tenant", ["Acme", "-acme", "", "a" * 64, "acme/../x", "ac me"])
async def test_invalid_tenant_is_refused_before_any_request(
    fake_api: FakeMachinesAPI, tenant: str
) -> None:
    async with client_for(fake_api) as client:
        with pytest.raises(InvalidTenantError):
            await client.create_machine(tenant, image="img")
        with pytest.raises(InvalidTenantError):
            await client.find_tenant_machines(tenant)
    assert fake_api.requests == []


@pytest.mark.parametrize("name", ["TENANT_ID", "CUSTOMER_ID"])
async def test_env_contradicting_the_tenant_is_refused(
    fake_api: FakeMachinesAPI, name: str
) -> None:
    async with client_for(fake_api) as client:
        with pytest.raises(ConfigurationError, match=name):
            await client.create_machine("acme", image="img", env={name: "globex"})
        # Repeating the tenant's own id is harmless.
        await client.create_machine("acme", image="img", env={name: "acme"})
    assert len(fake_api.requests) == 1


async def test_created_machine_with_other_tenant_metadata_is_an_error(
    fake_api: FakeMachinesAPI,
) -> None:
    fake_api.fail_next = (
        200,
        {"id": "abc123", "state": "created", "config": {"metadata": {"customer_id": "globex"}}},
    )
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError, match="abc123") as info:
            await client.create_machine("acme", image="img")
    assert info.value.tenant == "acme"


# --- stopping and destroying ---


async def test_destroy_machine_forces_by_default(fake_api: FakeMachinesAPI) -> None:
    machine_id = fake_api.add("acme")
    async with client_for(fake_api) as client:
        await client.destroy_machine(machine_id)
    [req] = fake_api.requests
    assert (req.method, req.path) == ("DELETE", f"/v1/apps/{APP}/machines/{machine_id}")
    assert req.query == {"force": "true"}
    assert machine_id not in fake_api.machines


async def test_destroy_running_machine_without_force_is_refused(
    fake_api: FakeMachinesAPI,
) -> None:
    machine_id = fake_api.add("acme")
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError) as info:
            await client.destroy_machine(machine_id, force=False)
    assert info.value.status == 412
    assert fake_api.requests[0].query == {}
    assert "refusing to delete" in str(info.value)


async def test_stop_then_wait_then_destroy(fake_api: FakeMachinesAPI) -> None:
    machine_id = fake_api.add("acme")
    async with client_for(fake_api) as client:
        await client.stop_machine(machine_id)
        await client.wait_for_state(machine_id, "stopped", instance_id="01X", timeout=5)
        await client.destroy_machine(machine_id, force=False)
    stop, wait, delete = fake_api.requests
    assert (stop.method, stop.path) == ("POST", f"/v1/apps/{APP}/machines/{machine_id}/stop")
    assert (wait.method, wait.path) == ("GET", f"/v1/apps/{APP}/machines/{machine_id}/wait")
    assert wait.query == {"state": "stopped", "timeout": "5", "instance_id": "01X"}
    assert delete.method == "DELETE"
    assert machine_id not in fake_api.machines


async def test_wait_gives_up_with_408(fake_api: FakeMachinesAPI) -> None:
    machine_id = fake_api.add("acme")  # never stops
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError) as info:
            await client.wait_for_state(machine_id, "stopped", timeout=1)
    assert info.value.status == 408


@pytest.mark.parametrize("bad_id", ["../acme", "ABC", "", "a/b", "x" * 64])
async def test_invalid_machine_id_argument_is_refused_before_any_request(
    fake_api: FakeMachinesAPI, bad_id: str
) -> None:
    async with client_for(fake_api) as client:
        with pytest.raises(ConfigurationError):
            await client.destroy_machine(bad_id)
        with pytest.raises(ConfigurationError):
            await client.stop_machine(bad_id)
    assert fake_api.requests == []


# --- errors and the token ---


@pytest.mark.parametrize(
    ("status", "body", "detail"),
    [
        (401, {"error": "You must be authenticated"}, "You must be authenticated"),
        (404, {"error": "app not found"}, "app not found"),
        (500, "upstream exploded", "upstream exploded"),
        (503, {"unexpected": "shape"}, ""),
    ],
)
async def test_http_errors_become_machines_api_errors(
    fake_api: FakeMachinesAPI, status: int, body: Any, detail: str
) -> None:
    fake_api.fail_next = (status, body)
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError) as info:
            await client.list_machines()
    err = info.value
    assert isinstance(err, RoutingError)
    assert err.status == status
    assert f"HTTP {status}" in str(err)
    assert detail in str(err)
    assert TOKEN not in str(err)
    assert TOKEN not in repr(err)


async def test_real_401_for_a_wrong_token(fake_api: FakeMachinesAPI) -> None:
    async with client_for(fake_api, token="wrong-token") as client:
        with pytest.raises(MachinesAPIError) as info:
            await client.find_tenant_machines("acme")
    assert info.value.status == 401


async def test_unknown_app_is_404(fake_api: FakeMachinesAPI) -> None:
    client = MachinesClient("no-such-app", Secret(TOKEN), base_url=fake_api.base_url)
    async with client:
        with pytest.raises(MachinesAPIError) as info:
            await client.list_machines()
    assert info.value.status == 404


async def test_destroying_a_missing_machine_is_404(fake_api: FakeMachinesAPI) -> None:
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError) as info:
            await client.destroy_machine("abc123")
    assert info.value.status == 404


async def test_error_body_echoing_the_token_is_scrubbed(fake_api: FakeMachinesAPI) -> None:
    fake_api.fail_next = (400, {"error": f"bad token {TOKEN} for app"})
    async with client_for(fake_api) as client:
        with pytest.raises(MachinesAPIError) as info:
            await client.list_machines()
    assert TOKEN not in str(info.value)
    assert "bad token *** for app" in str(info.value)


async def test_connection_refused_has_no_status() -> None:
    client = MachinesClient(APP, Secret(TOKEN), base_url=f"http://127.0.0.1:{free_port()}")
    async with client:
        with pytest.raises(MachinesAPIError) as info:
            await client.list_machines()
    assert info.value.status is None
    assert info.value.__cause__ is not None  # raised from the httpx error
    assert TOKEN not in str(info.value)


async def test_timeout_is_an_error_without_status(fake_api: FakeMachinesAPI) -> None:
    fake_api.delay = 1.0
    async with client_for(fake_api, timeout=0.2) as client:
        with pytest.raises(MachinesAPIError, match="timed out") as info:
            await client.create_machine("acme", image="img")
    assert info.value.status is None
    assert "may still have taken effect" in str(info.value)


async def test_token_never_in_repr_or_logs(
    fake_api: FakeMachinesAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_api.add("acme")
    client = client_for(fake_api)
    assert TOKEN not in repr(client)
    async with client:
        assert TOKEN not in repr(client)
        machine = await client.create_machine("globex", image="img")
        await client.find_tenant_machines("acme")
        await client.destroy_machine(machine.id)
        fake_api.fail_next = (500, {"error": "boom"})
        with pytest.raises(MachinesAPIError):
            await client.list_machines()
    assert caplog.records, "expected httpx/tenantdb log records to inspect"
    assert TOKEN not in caplog.text
    assert all(TOKEN not in repr(r.__dict__) for r in caplog.records)


async def test_flyv1_macaroon_token_keeps_its_scheme(fake_api: FakeMachinesAPI) -> None:
    fake_api.fail_next = (200, [])
    async with client_for(fake_api, token="FlyV1 fm2_abc,fm2_def") as client:
        await client.list_machines()
    assert fake_api.requests[0].headers["authorization"] == "FlyV1 fm2_abc,fm2_def"


# --- construction ---


def test_constructor_does_no_io_and_validates() -> None:
    # Nothing listens on this port: a constructor doing I/O would fail here.
    client = MachinesClient(APP, Secret(TOKEN), base_url=f"http://127.0.0.1:{free_port()}")
    assert client.base_url.startswith("http://127.0.0.1:")
    with pytest.raises(ConfigurationError):
        MachinesClient("Bad App", Secret(TOKEN))
    with pytest.raises(ConfigurationError):
        MachinesClient(APP, Secret("  "))
    with pytest.raises(ConfigurationError):
        MachinesClient(APP, Secret(TOKEN), base_url="ftp://example.com")
    with pytest.raises(ConfigurationError):
        MachinesClient(APP, Secret(TOKEN), timeout=0)


async def test_calls_outside_async_with_are_refused() -> None:
    client = MachinesClient(APP, Secret(TOKEN))
    with pytest.raises(RuntimeError, match="async with"):
        await client.list_machines()
