"""Isolation: a request reaches only the database of the tenant in its path, and only on the
machine holding that tenant's lease, whatever tricks its raw path plays.

Two tenants (100 and 200) have data in one bucket. A uvicorn server is tenant 100's
machine; a second one is configured for tenant 100 too but stands by (the lease is held).
Raw request targets go over a plain socket, so nothing normalises them on the way.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from example_app import MIGRATIONS
from tenantdb.machine.database import TenantDB
from tests.faults.conftest import ProxiedS3
from tests.support.servers import MachineProcesses, UvicornProcess

APP = "tests.support.apps:starlette_app"
COUNTS = {"100": 5, "200": 7}

# Raw request targets: the tenant whose path each is (None: not a valid tenant path), and
# whether tenant 100's machine serves it (the app has a route for /customers/{tenant} only).
TARGETS: dict[str, tuple[str | None, bool]] = {
    "/customers/100": ("100", True),
    "/customers/100?tenant=200": ("100", True),
    "/customers/%31%30%30": ("100", True),  # percent-encoded digits: still tenant 100's URL
    "/customers/1%30%30": ("100", True),
    "/customers/100#/../200": (None, False),  # "100#" is not a tenant id
    # Dot segments, literal or percent-encoded: 400 on every machine (no tenant decided on
    # a path that a client or proxy on the way would resolve to another).
    "/customers/100/../200": (None, False),
    "/customers/100/..%2F200": (None, False),
    "/customers/100%2F..%2F200": (None, False),
    "/customers/100/../../customers/200": (None, False),
    "/customers/100%2f": ("100", False),  # a redirect to /customers/100
    "/customers/200": ("200", False),
    "/customers/%32%30%30": ("200", False),
    "http://127.0.0.1/customers/200": (None, False),  # absolute form: no route matches
    "/customers/200%2F..": (None, False),
    "/customers/200%2F..%2F100": (None, False),
    "/customers/200/../100": (None, False),
    "/customers/%2e%2e/200": (None, False),
    "/customers/./200": (None, False),
    "/customers//200": (None, False),
    "//customers/200": (None, False),
    "/customers/100.": (None, False),
    "/customers/100..": (None, False),
    "/customers/200.": (None, False),
    "/customers/100%00": (None, False),
    "/customers/100%20": (None, False),
    "/customers/100;200": (None, False),
    "/customers/100%3B200": (None, False),
    "/customers/%EF%BC%92%EF%BC%90%EF%BC%90": (None, False),  # fullwidth digits
    "/CUSTOMERS/200": (None, False),
    "/Customers/100": (None, False),
}


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def raw_get(port: int, target: str) -> RawAnswer:
    """Send ``GET <target>`` exactly as written and read the answer until the server closes."""
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(int(status_line.split()[1]), headers, body)


StartServer = Callable[..., UvicornProcess]


@pytest.fixture
def start_server(tmp_path: Path, s3: ProxiedS3) -> Iterator[StartServer]:
    with MachineProcesses(tmp_path) as machines:

        def start(machine: str, **env: str) -> UvicornProcess:
            base = {**s3.env(proxied=False), "TENANTDB_CHECKPOINT_INTERVAL": "0"}
            return machines.start(APP, machine, "100", {**base, **env})

        yield start


async def seed(s3: ProxiedS3) -> None:
    """Give tenants 100 and 200 their own counts, published in the bucket."""
    bucket = await s3.open(proxied=False)
    for tenant, count in COUNTS.items():
        tdb = TenantDB(s3.settings("seed", tenant), migrations=MIGRATIONS, bucket=bucket)
        async with tdb, tdb.connection() as db:
            await db.execute("UPDATE counter SET count = ?", [count])
            await db.commit()


async def counts_in_bucket(s3: ProxiedS3) -> dict[str, int]:
    """Each tenant's count, as a new machine would find it in the bucket."""
    bucket = await s3.open(proxied=False)
    counts = {}
    for tenant in COUNTS:
        tdb = TenantDB(s3.settings("reader", tenant), migrations=MIGRATIONS, bucket=bucket)
        async with tdb, tdb.connection() as db, db.execute("SELECT count FROM counter") as cur:
            row = await cur.fetchone()
        assert row is not None
        counts[tenant] = int(row[0])
    return counts


async def test_raw_path_tricks_reach_only_the_tenant_in_the_path_on_its_holder(
    s3: ProxiedS3, start_server: StartServer, tmp_path: Path
) -> None:
    await seed(s3)
    lock_200 = s3.lock("200")
    holder = start_server("m100")
    standby = start_server("m2", FLY_APP_NAME="isolation-app")
    served = 0
    for target, (tenant, expect_served) in TARGETS.items():
        answer = raw_get(holder.port, target)
        assert answer.status < 500, (target, answer.status, answer.body)
        if expect_served:
            assert answer.status == 200, (target, answer.status, answer.body)
            body = answer.json()
            assert isinstance(body, dict)
            assert body["tenant"] == "100", (target, body)
            served += 1
            assert body["count"] == COUNTS["100"] + served, (target, body)
        else:
            expected = {"100": (307, 404), "200": (404,), None: (400, 404)}[tenant]
            assert answer.status in expected, (target, answer.status, answer.body)
        # The standby never serves tenant 100: it replays to the holder or answers 503.
        other = raw_get(standby.port, target)
        assert other.status != 200 or tenant is None, (target, other.body)
        assert other.status < 500 or other.status == 503, (target, other.status, other.body)
        if tenant is None:
            assert other.status in (400, 404), (target, other.status, other.body)
        else:
            # Tenant 100's requests go to its holder; tenant 200's (the standby routes
            # foreign tenants too) to the machine that last held 200.
            assert other.status in (204, 503), (target, other.status, other.body)
        if other.status == 204:
            holder_of = {"100": "m100", "200": "seed"}[tenant or ""]
            # A standby's replay to its holder is never cached: it has the fallback.
            fallback = f"instance={holder_of};timeout=2s;fallback=prefer_self"
            cached = f"instance={holder_of}"
            assert other.headers["fly-replay"] in (fallback, cached), (
                target,
                other,
            )
            assert other.body == b""
    replay = raw_get(standby.port, "/customers/100").headers["fly-replay"]
    assert replay == "instance=m100;timeout=2s;fallback=prefer_self"

    # The standby stops first: stopped after the holder, it could take tenant 100 over in
    # between, and a kill would then leave its lease standing in the reader's way.
    assert standby.stop() in (0, -15)
    assert holder.stop() in (0, -15)
    # Tenant 200 was never opened, written or published by these machines.
    assert s3.lock("200") == lock_200
    for machine in ("m100", "m2"):
        assert not list((tmp_path / machine).glob("200*")), machine
    assert await counts_in_bucket(s3) == {"100": COUNTS["100"] + served, "200": COUNTS["200"]}
