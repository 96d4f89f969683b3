"""TenantDBMiddleware served by real uvicorn processes with the real S3 server."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.s3_server import s3_client
from tests.support.servers import MachineProcesses, UvicornProcess

APPS = {
    "starlette": "tests.support.apps:starlette_app",
    "fastapi": "tests.support.apps:fastapi_app",
}

StartServer = Callable[..., UvicornProcess]


@pytest.fixture
def start_server(tmp_path: Path, s3_settings_env: dict[str, str]) -> Iterator[StartServer]:
    """Start counter servers for tenant acme; each machine id gets its own data dir."""
    with MachineProcesses(tmp_path) as machines:

        def start(
            app: str = APPS["starlette"], machine: str = "m1", *, ready: bool = True, **env: str
        ) -> UvicornProcess:
            base = {**s3_settings_env, "TENANTDB_LEASE_TTL": "3"}
            return machines.start(app, machine, "acme", {**base, **env}, ready=ready)

        yield start


def read_lock(env: dict[str, str]) -> dict[str, Any]:
    """lock.json of tenant acme, read straight from the S3 server."""
    client = s3_client(env["AWS_ENDPOINT_URL_S3"])
    body = client.get_object(Bucket=env["BUCKET_NAME"], Key="tenants/acme/lock.json")["Body"]
    lock: dict[str, Any] = json.loads(body.read())
    return lock


def count_of(server: UvicornProcess) -> int:
    """The count after one more visit, minus that visit."""
    response = httpx.get(f"{server.url}/customers/acme", timeout=10)
    assert response.status_code == 200, response.text
    return int(response.json()["count"]) - 1


async def visit_many(url: str, n: int, concurrency: int, delay: float = 0) -> list[int]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with semaphore:
                try:
                    response = await client.get(
                        f"{url}/customers/acme", params={"delay": delay} if delay else None
                    )
                except httpx.HTTPError:
                    return 0
                return response.status_code

        return await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.parametrize("app", sorted(APPS))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_count_survives_a_graceful_restart(
    start_server: StartServer, s3_settings_env: dict[str, str], app: str, sig: signal.Signals
) -> None:
    server = start_server(APPS[app])
    statuses = asyncio.run(visit_many(server.url, 200, 16))
    assert statuses == [200] * 200
    assert server.stop(sig) in (0, -sig)  # uvicorn re-raises the signal after its shutdown
    assert read_lock(s3_settings_env)["owner"] is None  # published, then released
    restarted = start_server(APPS[app], "m2")  # another machine: only the bucket carries data
    assert count_of(restarted) == 200


@pytest.mark.long
def test_sigterm_under_load_keeps_every_acknowledged_increment(
    start_server: StartServer,
) -> None:
    server = start_server()

    async def load_then_sigterm() -> list[int]:
        # Each request stays 2 s in the handler, so all 50 are inside it at the signal even
        # on a loaded machine (with 0.5 s and a signal at 0.25 s, a full-suite run once
        # signalled before any was accepted, and none was acknowledged).
        load = asyncio.create_task(visit_many(server.url, 50, 50, delay=2.0))
        await asyncio.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        return await load

    statuses = asyncio.run(load_then_sigterm())
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    acknowledged = statuses.count(200)
    assert acknowledged > 0
    restarted = start_server(machine="m2")
    assert count_of(restarted) == acknowledged


def test_a_killed_machine_loses_at_most_what_came_after_its_last_checkpoint(
    start_server: StartServer,
) -> None:
    server = start_server(TENANTDB_CHECKPOINT_INTERVAL="0.5")
    assert asyncio.run(visit_many(server.url, 30, 8)) == [200] * 30
    time.sleep(1.5)  # at least one checkpoint interval
    assert asyncio.run(visit_many(server.url, 5, 1)) == [200] * 5
    server.stop(signal.SIGKILL)
    started = time.monotonic()
    restarted = start_server(machine="m2", ready=False)
    restarted.wait_ready(timeout=30)
    count = count_of_when_serving(restarted)
    assert 30 <= count <= 35
    assert time.monotonic() - started >= 2  # it had to wait for the 3 s lease to expire


def count_of_when_serving(server: UvicornProcess, timeout: float = 30) -> int:
    """Wait through the standby (503s) until this machine serves, then read the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(
            f"{server.url}/customers/acme", headers={"accept": "application/json"}, timeout=10
        )
        if response.status_code == 200:
            return int(response.json()["count"]) - 1
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        time.sleep(0.2)
    raise TimeoutError(server.log())


def test_a_second_process_on_the_same_data_dir_fails_at_startup(
    start_server: StartServer,
) -> None:
    start_server()
    second = start_server(machine="m1", ready=False)
    assert second.proc.wait(30) != 0
    assert "locked by another tenantdb process" in second.log()


@pytest.mark.parametrize("lifespan", ["auto", "on"])
@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("TENANT_ID", "Acme", "allowed: a lowercase DNS label"),
        ("TENANTDB_LEASE_TTL", "abc", "allowed: a number of seconds, at least 3"),
        ("TENANTDB_LEASE_TTL", "1", "allowed: a number of seconds, at least 3"),
        ("TENANTDB_DNS_SERVER", "nonsense", "allowed: host:port"),
    ],
)
def test_bad_configuration_stops_the_server_at_startup_with_one_line(
    tmp_path: Path,
    subprocess_env: dict[str, str],
    lifespan: str,
    variable: str,
    value: str,
    allowed: str,
) -> None:
    env = {
        **subprocess_env,
        "TENANT_ID": "acme",
        "TENANTDB_DATA_DIR": str(tmp_path / "data"),
        "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket"),
        variable: value,
    }
    server = UvicornProcess(
        "example_app:app", env, tmp_path / "server.log", inherit_environ=False, lifespan=lifespan
    )
    try:
        code = server.proc.wait(60)
    finally:
        server.close()
    log = server.log()
    assert code == 3, log  # uvicorn's "startup failed"
    named = [line for line in log.splitlines() if f"{variable}={value!r}" in line]
    assert len(named) == 1, log  # printed once
    assert allowed in named[0], log
    assert "Traceback" not in log
    assert not (tmp_path / "data").exists()


def test_a_machine_restarted_on_its_data_directory_does_not_probe_the_store_again(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The probe's five requests were made at every start, a wake on a volume included.
    noted = tmp_path / "m1" / ".tenantdb.conditional-writes"
    server = start_server()
    assert count_of(server) == 0
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    inode = noted.stat().st_ino  # replaced (a new inode) by every probe that passes
    server = start_server()
    assert count_of(server) == 1
    assert server.stop() in (0, -signal.SIGTERM)
    assert noted.stat().st_ino == inode
