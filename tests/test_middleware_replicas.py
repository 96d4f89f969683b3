"""Read replicas between real uvicorn machines: reads served by a replica, the rest replayed.

Machines run ``tests.support.replica_app`` in local mode with ``TENANTDB_REPLICA_READS=1``
(the dev DNS responder, one shared local bucket): m1 holds tenant acme, m2 is its replica.
``tests.support.replica_client`` follows fly-replay as Fly's proxy does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tenantdb.dev.dns_server import DevDNSServer
from tests.support.replica_client import send
from tests.support.servers import MachineProcesses, UvicornProcess

APP = "tests.support.replica_app:app"
KEY = "customer_id"
NOTES = "/customers/acme/notes"

Start = Callable[..., UvicornProcess]


@pytest.fixture
def dns() -> Iterator[DevDNSServer]:
    with DevDNSServer().run_in_thread() as server:
        yield server


@pytest.fixture
def start(tmp_path: Path, dns: DevDNSServer, subprocess_env: dict[str, str]) -> Iterator[Start]:
    """Start machine ``machine`` of tenant acme with replica reads on (``env`` on top)."""
    with MachineProcesses(tmp_path) as machines:

        def run(machine: str, **env: str) -> UvicornProcess:
            base = {
                **subprocess_env,
                "TENANTDB_DNS_SERVER": "{}:{}".format(*dns.address),
                "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket"),
                "TENANTDB_LEASE_TTL": "3",
                "TENANTDB_CHECKPOINT_INTERVAL": "0",
                "TENANTDB_FOLLOW_INTERVAL": "0.1",
                "TENANTDB_METRICS_PORT": "0",
                "TENANTDB_REPLICA_READS": "1",
            }
            server = machines.start(APP, machine, "acme", {**base, **env})
            dns.set_machine(machine, {KEY: "acme"})
            return server

        yield run


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def replica_ready(urls: dict[str, str], machine: str) -> None:
    """Wait until ``machine`` serves reads itself (its copy followed the holder)."""
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            sent = await send(client, urls, machine, "GET", NOTES)
            if sent.hops == [machine] and sent.response.status_code == 200:
                return
            assert time.monotonic() < deadline, sent.response.text
            await asyncio.sleep(0.1)


def test_a_replica_serves_a_read_with_its_headers_and_a_write_goes_to_the_holder(
    start: Start,
) -> None:
    m1 = start("m1")
    m2 = start("m2")
    urls = {"m1": m1.url, "m2": m2.url}

    async def scenario() -> None:
        await replica_ready(urls, "m2")
        async with httpx.AsyncClient(timeout=10) as client:
            wrote = await send(client, urls, "m2", "POST", f"{NOTES}?token=t1")
            assert wrote.hops == ["m2", "m1"]  # the replica replayed the write
            assert wrote.response.status_code == 201, wrote.response.text
            bookmark = wrote.response.headers["tenantdb-bookmark"]
            cookie = wrote.response.headers["set-cookie"]
            assert f"tenantdb-bookmark={bookmark}" in cookie
            for part in ("Path=/customers/acme", "HttpOnly", "SameSite=Lax", "Max-Age=60"):
                assert part in cookie
            assert "Secure" not in cookie  # plain HTTP here
            read = await send(client, urls, "m2", "GET", NOTES)  # with the cookie
            assert read.hops == ["m2"]
            assert read.response.status_code == 200
            assert read.response.json() == {"machine": "m2", "tokens": ["t1"]}
            assert read.response.headers["tenantdb-served-by"] == "m2"
            assert 0 <= int(read.response.headers["tenantdb-lag-ms"]) < 5000
            assert read.response.headers["tenantdb-waited-ms"].isdigit()
            assert read.response.headers["tenantdb-bookmark"] >= bookmark
            # Behind Fly's proxy, a client that came over HTTPS gets a Secure cookie.
            https = {"x-forwarded-proto": "https"}
            secure = await send(client, urls, "m2", "GET", NOTES, headers=https)
            assert secure.response.headers["set-cookie"].endswith("; Secure")

    run(scenario())


def test_a_get_that_writes_on_a_replica_is_replayed_to_the_holder(start: Start) -> None:
    m1 = start("m1")
    m2 = start("m2")
    urls = {"m1": m1.url, "m2": m2.url}

    async def scenario() -> None:
        await replica_ready(urls, "m2")
        async with httpx.AsyncClient(timeout=10) as client:
            sneaky = await send(client, urls, "m2", "GET", "/customers/acme/sneaky")
            assert sneaky.hops == ["m2", "m1"]  # the replica's answer (a 500) never went out
            assert sneaky.response.json() == {"machine": "m1", "wrote": True}
            read = await send(client, urls, "m2", "GET", NOTES)
            assert read.hops == ["m2"]  # the replica still serves reads
            written = read.response.json()["tokens"]
            assert len(written) == 1  # written once, by the holder
            assert written[0].startswith("sneaky-")

    run(scenario())
    assert "after its answer began" not in m2.log()


def test_a_write_after_a_replicas_answer_began_is_logged_with_its_route(start: Start) -> None:
    m1 = start("m1")
    m2 = start("m2")
    urls = {"m1": m1.url, "m2": m2.url}

    async def scenario() -> None:
        await replica_ready(urls, "m2")
        async with httpx.AsyncClient(timeout=10) as client:
            late = await send(client, urls, "m2", "GET", "/customers/acme/late")
            assert late.hops == ["m2"]  # too late to send it on
            assert late.response.text == "begun;refused"  # the copy was never written

    run(scenario())
    # Logged once the answer is sent: the client can have it a moment before the log does.
    expected = "GET /customers/acme/late tried to write on a replica after its answer began"
    deadline = time.monotonic() + 5
    while expected not in m2.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert expected in m2.log()


def test_a_bookmark_newer_than_the_copy_waits_for_it_or_goes_to_the_holder(
    start: Start,
) -> None:
    m1 = start("m1")
    # Polls far apart: only the waiting read makes the replica look at the log at once.
    m2 = start("m2", TENANTDB_FOLLOW_INTERVAL="5", TENANTDB_READ_WAIT="1")
    urls = {"m1": m1.url, "m2": m2.url}

    async def scenario() -> None:
        await replica_ready(urls, "m2")
        async with httpx.AsyncClient(timeout=10) as client:
            wrote = await send(client, urls, "m1", "POST", f"{NOTES}?token=fresh")
            assert wrote.response.status_code == 201
            read = await send(client, urls, "m2", "GET", NOTES)
            assert read.hops == ["m2"], read.response.text  # waited, then served
            assert read.response.json()["tokens"] == ["fresh"]
            assert int(read.response.headers["tenantdb-waited-ms"]) > 0
        async with httpx.AsyncClient(timeout=10) as stranger:
            generation, _, index = wrote.response.headers["tenantdb-bookmark"].partition(".")
            ahead = {"tenantdb-bookmark": f"{generation}.{int(index) + 50}"}
            started = time.monotonic()
            late = await send(stranger, urls, "m2", "GET", NOTES, headers=ahead)
            assert late.hops == ["m2", "m1"]  # never stale, never an error
            assert late.response.status_code == 200
            assert late.response.json()["machine"] == "m1"
            assert 0.9 <= time.monotonic() - started < 5
            for machine in ("m2", "m1"):  # the same answer from the replica and the holder
                bad = await send(
                    stranger, urls, machine, "GET", NOTES, headers={"tenantdb-bookmark": "x"}
                )
                assert bad.response.status_code == 400
                assert "tenantdb-bookmark" in bad.response.text

    run(scenario())


def test_a_replica_takes_the_lease_when_the_holder_stops(start: Start) -> None:
    m1 = start("m1")
    m2 = start("m2")
    urls = {"m1": m1.url, "m2": m2.url}

    async def before() -> None:
        await replica_ready(urls, "m2")
        async with httpx.AsyncClient(timeout=10) as client:
            wrote = await send(client, urls, "m1", "POST", f"{NOTES}?token=kept")
            assert wrote.response.status_code == 201

    run(before())
    m1.stop()  # graceful: final publish, lease released

    async def after() -> None:
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                wrote = await send(client, urls, "m2", "POST", f"{NOTES}?token=after")
                if wrote.response.status_code == 201:
                    break
                assert time.monotonic() < deadline, wrote.response.text
                await asyncio.sleep(0.1)
            # m2 wrote it; a request that reached it before it saw the release went to m1
            # first, found it gone and came back (fly-replay-failed, as on Fly).
            assert wrote.hops[-1] == "m2", wrote.hops
            assert set(wrote.hops) <= {"m1", "m2"}, wrote.hops
            read = await send(client, urls, "m2", "GET", NOTES)
            assert read.response.json()["tokens"] == ["kept", "after"]
            assert read.response.headers["tenantdb-served-by"] == "m2"
            assert "tenantdb-lag-ms" not in read.response.headers  # the holder's answer

    run(after())
