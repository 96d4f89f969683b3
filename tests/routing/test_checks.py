"""Startup checks of a machine's Fly setup: warnings, never a failed startup."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tenantdb.config import Secret, Settings
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.routing.checks import check_machine_setup
from tenantdb.routing.dns import MachineLocator
from tenantdb.routing.machines_api import MachinesClient
from tests.support.fake_machines import FakeMachinesAPI, serve_fake_machines

APP = "checkapp"


@pytest.fixture
def fake() -> Iterator[FakeMachinesAPI]:
    with serve_fake_machines(APP) as api:
        yield api


async def startup_warnings(
    fake: FakeMachinesAPI, machine_id: str, caplog: pytest.LogCaptureFixture
) -> list[str]:
    settings = Settings(app_name=APP, machine_id=machine_id, proxy_url="http://x:1")
    with DevDNSServer(APP).run_in_thread() as dns:
        locator = MachineLocator(APP, nameserver=dns.address)
        async with MachinesClient(APP, Secret("t"), base_url=fake.base_url) as client:
            with caplog.at_level(logging.WARNING, logger="tenantdb.routing"):
                await check_machine_setup(settings, locator, client)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_machine_that_autostops_by_suspending_is_warned_about_at_startup(
    fake: FakeMachinesAPI, caplog: pytest.LogCaptureFixture
) -> None:
    machine_id = fake.add("acme", stop_timeout=30_000_000_000)
    fake.machines[machine_id]["config"].update(
        metrics={"port": 9091, "path": "/metrics"},
        services=[{"internal_port": 8080, "autostop": "suspend"}],
    )
    [warning] = await startup_warnings(fake, machine_id, caplog)
    assert "autostop suspend" in warning
    assert "--autostop=stop" in warning
    assert "lease" in warning


async def test_a_machine_set_up_as_machines_create_does_gets_no_warning(
    fake: FakeMachinesAPI, caplog: pytest.LogCaptureFixture
) -> None:
    machine_id = fake.add("acme", stop_timeout=30_000_000_000)
    fake.machines[machine_id]["config"].update(
        metrics={"port": 9091, "path": "/metrics"},
        services=[{"internal_port": 8080, "autostop": "stop"}],
        restart={"policy": "on-failure"},
    )
    assert await startup_warnings(fake, machine_id, caplog) == []


async def test_a_machine_without_metrics_config_is_warned_about(
    fake: FakeMachinesAPI, caplog: pytest.LogCaptureFixture
) -> None:
    machine_id = fake.add("acme", stop_timeout=30_000_000_000)
    [warning] = await startup_warnings(fake, machine_id, caplog)
    assert "no config.metrics" in warning
    assert "port 9091" in warning
