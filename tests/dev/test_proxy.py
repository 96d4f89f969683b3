"""FlyProxy in front of tiny real servers on loopback: Fly's replay rules, one at a time.

Each machine is a small Starlette app under its own in-process uvicorn server, answering as
its handler says (serve, or ask for a replay); stopped machines get their server when the
proxy starts them. Requests go through the proxy's own uvicorn server over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from httpx_ws import AsyncWebSocketClient, WebSocketUpgradeError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tenantdb.dev.cluster import Cluster, ClusterConfig
from tenantdb.dev.proxy import (
    MAX_REPLAY_BODY,
    MAX_REPLAYS,
    FlyProxy,
    MachineInfo,
    MachineState,
    MachineUnavailableError,
    ReplayDirective,
)
from tenantdb.dev.regions import EDGE_REGION_HEADER, RegionLatency
from tests.support.servers import LoopbackServer
from tests.support.streamed_lines import assert_each_line_crossed, line_arrivals, two_lines

APP = "testapp"
SRC_RE = re.compile(
    r"instance=(?P<instance>[^;]+);region=(?P<region>[^;]+);t=(?P<t>\d+)(;state=(?P<state>.*))?"
)

Handler = Callable[[Request], Response]


def serves(machine_id: str) -> Handler:
    return lambda request: PlainTextResponse(f"served by {machine_id}")


def replays(value: str, **headers: str) -> Handler:
    return lambda request: Response(b"", 204, headers={"fly-replay": value, **headers})


class Servers:
    """In-process uvicorn servers on free loopback ports, all stopped at teardown.

    In the test's own event loop, not in threads: the proxy is bound to that loop.
    """

    def __init__(self) -> None:
        self._running: list[tuple[LoopbackServer, asyncio.Task[None]]] = []

    async def start(self, app: ASGIApp) -> str:
        # proxy_headers=False: the proxy is the edge, it must see the real client address.
        server = LoopbackServer(app, proxy_headers=False)
        task = asyncio.create_task(server.serve(sockets=[server.socket]))
        self._running.append((server, task))
        while not server.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.005)
        return server.url

    async def close(self) -> None:
        for server, _ in self._running:
            server.should_exit = True
        await asyncio.gather(*(task for _, task in self._running))


@dataclass
class Seen:
    """One request as a machine received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Machine:
    machine_id: str
    handler: Handler
    state: MachineState
    region: str
    autostart: bool = True
    url: str = ""
    starts: int = 0
    seen: list[Seen] = field(default_factory=list)
    start_delay: float = 0.0  # how long a start takes


class Machines:
    """A ``Backends`` of in-process servers: a stopped machine gets its server on first use."""

    app_name = APP

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.by_id: dict[str, Machine] = {}

    def add(
        self,
        machine_id: str,
        handler: Handler | None = None,
        *,
        state: MachineState = "started",
        region: str = "dev",
        autostart: bool = True,
    ) -> Machine:
        machine = Machine(machine_id, handler or serves(machine_id), state, region, autostart)
        self.by_id[machine_id] = machine
        return machine

    def machines(self) -> list[MachineInfo]:
        return [
            MachineInfo(m.machine_id, m.region, m.state, m.autostart) for m in self.by_id.values()
        ]

    @contextlib.asynccontextmanager
    async def use(self, machine_id: str) -> AsyncIterator[str]:
        machine = self.by_id[machine_id]
        if machine.state == "failed":
            raise MachineUnavailableError(f"machine {machine_id} has failed")
        if machine.state != "started":
            machine.starts += 1
            await asyncio.sleep(machine.start_delay)
        if not machine.url:
            machine.url = await self.servers.start(self._app(machine))
        machine.state = "started"
        yield machine.url

    @staticmethod
    def _app(machine: Machine) -> Starlette:
        async def endpoint(request: Request) -> Response:
            body = await request.body()
            machine.seen.append(Seen(request.method, request.url.path, dict(request.headers), body))
            return machine.handler(request)

        return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    machines: Machines
    proxy: FlyProxy
    client: httpx.AsyncClient
    clock: Clock

    def add(
        self,
        machine_id: str,
        handler: Handler | None = None,
        *,
        state: MachineState = "started",
        region: str = "dev",
        autostart: bool = True,
    ) -> Machine:
        return self.machines.add(
            machine_id, handler, state=state, region=region, autostart=autostart
        )


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    running = Servers()
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
async def rig(servers: Servers) -> AsyncIterator[Rig]:
    machines = Machines(servers)
    clock = Clock()
    async with FlyProxy(machines, rng=random.Random(7), clock=clock) as proxy:
        url = await servers.start(proxy)
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
            yield Rig(machines, proxy, client, clock)


def force(machine_id: str) -> dict[str, str]:
    return {"fly-force-instance-id": machine_id}


# -- load balancing and autostart ---------------------------------------------------------


async def test_requests_spread_over_started_machines_only(rig: Rig) -> None:
    a, b = rig.add("a"), rig.add("b")
    stopped = rig.add("c", state="stopped")
    answers = [await rig.client.get("/anything") for _ in range(40)]
    assert {r.status_code for r in answers} == {200}
    assert {r.text for r in answers} == {"served by a", "served by b"}
    assert stopped.seen == []
    assert stopped.starts == 0
    assert len(a.seen) + len(b.seen) == 40
    ids = {r.headers["fly-request-id"] for r in answers}
    assert len(ids) == 40
    seen = a.seen[0]
    assert seen.headers["fly-request-id"] in ids
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    assert "fly-replay-src" not in seen.headers
    assert "fly-replay-cache-status" not in seen.headers


async def test_a_machine_is_started_when_none_runs(rig: Rig) -> None:
    only = rig.add("a", state="stopped")
    response = await rig.client.get("/x")
    assert response.text == "served by a"
    assert only.starts == 1
    assert (await rig.client.get("/x")).text == "served by a"
    assert only.starts == 1


async def test_autostart_off_never_starts_a_machine_for_a_request(rig: Rig) -> None:
    # "If no Machines are running, the proxy does not start one and the request will fail."
    asleep = rig.add("a", state="stopped", autostart=False)
    balanced = await rig.client.get("/x")
    assert balanced.status_code == 503
    assert "1 not started, with autostart off" in balanced.text
    forced = await rig.client.get("/x", headers=force("a"))
    assert forced.status_code == 503
    assert "autostart off" in forced.text
    rig.add("b", replays("instance=a"))
    replayed = await rig.client.get("/x", headers={"fly-prefer-instance-id": "a"})
    assert replayed.status_code == 503
    assert "autostart off" in replayed.text
    assert asleep.starts == 0
    assert asleep.seen == []


async def test_forced_instance_and_preferred_instance(rig: Rig) -> None:
    rig.add("a")
    b = rig.add("b", state="stopped")
    rig.add("gone", state="failed")
    assert (await rig.client.get("/", headers=force("b"))).text == "served by b"
    assert b.starts == 1
    failed = await rig.client.get("/", headers=force("gone"))
    assert failed.status_code == 503
    assert "gone has failed" in failed.text
    preferred = await rig.client.get("/", headers={"fly-prefer-instance-id": "gone"})
    assert preferred.status_code == 200
    last = rig.machines.by_id[preferred.text.removeprefix("served by ")].seen[-1]
    assert last.headers["fly-preferred-instance-unavailable"] == "gone"


async def test_client_cannot_forge_proxy_headers(rig: Rig) -> None:
    a = rig.add("a")
    forged = {
        "fly-replay-src": "instance=evil;region=x;t=1",
        "fly-replay-cache-status": "hit",
        "fly-request-id": "mine",
        "x-forwarded-for": "10.0.0.1",
    }
    await rig.client.get("/", headers=forged)
    headers = a.seen[0].headers
    assert "fly-replay-src" not in headers
    assert "fly-replay-cache-status" not in headers
    assert headers["fly-request-id"] != "mine"
    assert headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"


# -- fly-replay -----------------------------------------------------------------------------


async def test_replay_to_an_instance_with_fly_replay_src(rig: Rig) -> None:
    a = rig.add("a", replays("instance=b;state=from-a"), region="ams")
    b = rig.add("b")
    body = b"x" * 5000
    response = await rig.client.post("/upload?q=1", content=body, headers=force("a"))
    assert response.status_code == 200
    assert response.text == "served by b"
    assert len(a.seen) == 1
    got = b.seen[0]
    assert (got.method, got.path, got.body) == ("POST", "/upload", body)
    src = SRC_RE.fullmatch(got.headers["fly-replay-src"])
    assert src is not None
    assert (src["instance"], src["region"], src["state"]) == ("a", "ams", "from-a")
    assert got.headers["fly-replay-cache-status"] == "miss"
    assert got.headers["fly-request-id"] == response.headers["fly-request-id"]
    [record] = rig.proxy.replay_log
    assert (record.source, record.target, record.via) == ("a", "b", "fly-replay")
    assert (record.method, record.path) == ("POST", "/upload")
    assert record.request_id == response.headers["fly-request-id"]


async def test_elsewhere_leaves_the_answering_machine_out(rig: Rig) -> None:
    rig.add("a", replays("elsewhere=true"))
    rig.add("b")
    rig.add("c")
    answers = [await rig.client.get("/") for _ in range(30)]
    assert {r.text for r in answers} == {"served by b", "served by c"}
    assert rig.proxy.replay_log
    assert all(r.source == "a" and r.target in ("b", "c") for r in rig.proxy.replay_log)


async def test_region_replay(rig: Rig) -> None:
    rig.add("a", replays('region="syd,fra"'), region="ams")
    rig.add("f", region="fra")
    rig.add("s", region="sjc")
    answers = [await rig.client.get("/", headers=force("a")) for _ in range(5)]
    assert {r.text for r in answers} == {"served by f"}


async def test_replay_starts_a_stopped_machine(rig: Rig) -> None:
    rig.add("a", replays("instance=b"))
    b = rig.add("b", state="stopped")
    response = await rig.client.get("/customers/200", headers=force("a"))
    assert response.text == "served by b"
    assert b.starts == 1
    [record] = rig.proxy.replay_log
    assert (record.source, record.target) == ("a", "b")


async def test_routes_list_each_requests_machines_and_how_they_were_chosen(rig: Rig) -> None:
    rig.add("a", router("b"))
    rig.add("b", state="stopped")
    prefer_a = {"fly-prefer-instance-id": "a"}
    await rig.client.get("/customers/100/x", headers=prefer_a)  # a replays it and b wakes up
    await rig.client.get("/customers/100/y", headers=prefer_a)  # cached: straight to b
    await rig.client.get("/customers/300", headers=force("b"))
    await rig.client.get("/customers/300", headers=force("zz"))  # no such machine
    assert [
        (r.path, r.status, [(s.machine_id, s.kind, s.woken) for s in r.steps])
        for r in rig.proxy.routes
    ] == [
        ("/customers/100/x", 200, [("a", "direct", False), ("b", "replayed", True)]),
        ("/customers/100/y", 200, [("b", "cached replay", False)]),
        ("/customers/300", 200, [("b", "direct", False)]),
        ("/customers/300", 502, []),
    ]


async def test_replay_to_failed_or_unknown_machines(rig: Rig) -> None:
    rig.add("a", replays("instance=b"))
    rig.add("b", state="failed")
    rig.add("c", replays("instance=nowhere"))
    failed = await rig.client.get("/", headers=force("a"))
    assert failed.status_code == 503
    assert failed.text.startswith("fly proxy (tenantdb dev):")
    unknown = await rig.client.get("/", headers=force("c"))
    assert unknown.status_code == 502
    assert "no machine nowhere" in unknown.text


async def test_a_replay_to_a_stopping_machine_fails_like_fly(rig: Rig) -> None:
    a = rig.add("a", replays("instance=b"))
    b = rig.add("b", state="stopping")
    response = await rig.client.get("/customers/200", headers=force("a"))
    assert response.status_code == 503
    assert "PM08" in response.text
    assert b.seen == []
    assert len(a.seen) == 1


@pytest.mark.parametrize("fallback", ["prefer_self", "force_self"])
async def test_a_failed_replay_falls_back_to_the_machine_that_asked(
    rig: Rig, fallback: str
) -> None:
    def asks_or_explains(request: Request) -> Response:
        failed = request.headers.get("fly-replay-failed")
        if failed is None:
            return Response(b"", 204, headers={"fly-replay": f"instance=b;fallback={fallback}"})
        return PlainTextResponse(f"a explains: {failed}", 503)

    a = rig.add("a", asks_or_explains)
    rig.add("b", state="stopping")
    rig.add("c", replays(f"instance=gone;fallback={fallback}"))
    response = await rig.client.get("/customers/200", headers=force("a"))
    assert response.status_code == 503
    # Fly's format ("The fly-replay-failed Header"): which replay failed, and why.
    assert re.fullmatch(
        r"a explains: instance=b;app=testapp;region=dev;replay_source=a;"
        r"reason=no_candidate;elapsed_ms=\d+",
        response.text,
    )
    assert "fly-replay-src" not in a.seen[1].headers
    # A request that came back cannot be replayed again.
    back = await rig.client.get("/customers/200", headers=force("c"))
    assert back.status_code == 502
    assert "replay fallback" in back.text


async def test_a_replay_with_a_timeout_falls_back_when_the_target_does_not_start_in_time(
    rig: Rig,
) -> None:
    def asks_or_explains(request: Request) -> Response:
        failed = request.headers.get("fly-replay-failed")
        if failed is None:
            replay = "instance=b;timeout=200ms;fallback=prefer_self"
            return Response(b"", 204, headers={"fly-replay": replay})
        return PlainTextResponse(f"a explains: {failed}", 503)

    rig.add("a", asks_or_explains)
    b = rig.add("b", state="stopped")
    b.start_delay = 30.0
    sent = time.monotonic()
    response = await rig.client.get("/customers/200", headers=force("a"))
    took = time.monotonic() - sent
    assert response.status_code == 503
    failed = re.fullmatch(
        r"a explains: instance=b;.*;reason=timeout;elapsed_ms=(\d+)", response.text
    )
    assert failed is not None, response.text
    assert int(failed[1]) >= 200
    assert b.seen == []
    assert 0.2 <= took < 5


async def test_a_replay_within_its_timeout_reaches_a_slow_starting_target(rig: Rig) -> None:
    rig.add("a", replays("instance=b;timeout=5s;fallback=prefer_self"))
    b = rig.add("b", state="stopped")
    b.start_delay = 0.2
    response = await rig.client.get("/customers/200", headers=force("a"))
    assert response.text == "served by b"
    assert b.starts == 1


@pytest.mark.parametrize(
    "replay",
    [
        "instance=b;fallback=prefer_self",
        "instance=b;timeout=2s",
        "instance=b;timeout=2s;fallback=force_self",
    ],
)
async def test_a_cached_replay_with_a_timeout_or_fallback_is_refused_like_fly(
    rig: Rig, replay: str
) -> None:
    cache = {"fly-replay-cache": "/customers/100/*", "fly-replay-cache-ttl-secs": "30"}
    rig.add("a", replays(replay, **cache))
    b = rig.add("b")
    response = await rig.client.get("/customers/100/x", headers=force("a"))
    assert response.status_code == 502
    assert "PA03" in response.text
    assert b.seen == []
    # Nothing was cached either: the next request goes to a again.
    again = await rig.client.get("/customers/100/y", headers={"fly-prefer-instance-id": "a"})
    assert "PA03" in again.text


async def test_a_replay_timeout_that_is_no_duration_is_refused_like_fly(rig: Rig) -> None:
    rig.add("a", replays("instance=b;timeout=soon;fallback=prefer_self"))
    rig.add("b")
    response = await rig.client.get("/", headers=force("a"))
    assert response.status_code == 502
    assert "PA03" in response.text


async def test_invalidate_counts_only_on_a_replay(rig: Rig) -> None:
    rig.add("a", router("b"))
    b = rig.add("b")
    prefer_a = {"fly-prefer-instance-id": "a"}
    await rig.client.get("/customers/100/x", headers=prefer_a)
    # An error carrying the header is not the documented invalidation: the route stays.
    b.handler = lambda request: PlainTextResponse(
        "gone", 404, headers={"fly-replay-cache": "invalidate"}
    )
    for _ in range(2):
        assert (await rig.client.get("/customers/100/x", headers=prefer_a)).status_code == 404
    assert [r.via for r in rig.proxy.replay_log] == ["fly-replay", "cache", "cache"]


async def test_force_https_redirects_plain_http(servers: Servers) -> None:
    machines = Machines(servers)
    machines.add("a")
    async with FlyProxy(machines, force_https=True) as proxy:
        url = await servers.start(proxy)
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            response = await client.post("/customers/1/upload?x=1", content=b"z" * 2_000_000)
    assert response.status_code == 301
    assert response.headers["location"].endswith("/customers/1/upload?x=1")
    assert response.headers["location"].startswith("https://")
    assert machines.by_id["a"].seen == []


def test_dev_machines_get_the_service_of_tenantdb_machines_create() -> None:
    # Flycast is plain HTTP: a port 80 that forces HTTPS turns every large upload into a 301.
    assert Cluster(ClusterConfig()).proxy.force_https is False


@pytest.mark.parametrize("size", [MAX_REPLAY_BODY, MAX_REPLAY_BODY + 1])
async def test_bodies_over_1_mb_are_not_replayed(rig: Rig, size: int) -> None:
    assert MAX_REPLAY_BODY == 1_000_000  # Fly's limit is "1MB"
    rig.add("a", replays("instance=b"))
    b = rig.add("b")
    response = await rig.client.post("/upload", content=b"z" * size, headers=force("a"))
    if size == MAX_REPLAY_BODY:
        assert response.status_code == 200
        assert len(b.seen[0].body) == size
    else:
        assert response.status_code == 502
        assert "cannot replay" in response.text
        assert b.seen == []


async def test_large_bodies_stream_to_a_machine_that_serves_them(rig: Rig) -> None:
    a = rig.add("a")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * (1 << 20)

    response = await rig.client.post("/upload", content=chunks(), headers=force("a"))
    assert response.status_code == 200
    assert len(a.seen[0].body) == 3 << 20


async def test_replays_stop_after_ten(rig: Rig) -> None:
    a = rig.add("a", replays("instance=b"))
    b = rig.add("b", replays("instance=a"))
    response = await rig.client.get("/loop", headers=force("a"))
    assert response.status_code == 502
    assert f"gave up after {MAX_REPLAYS} replays" in response.text
    assert len(a.seen) + len(b.seen) == MAX_REPLAYS + 1
    assert len(rig.proxy.replay_log) == MAX_REPLAYS


# -- the replay cache -------------------------------------------------------------------------


def router(owner: str, **headers: str) -> Handler:
    """A machine that replays tenant paths to ``owner`` and caches the route."""
    cache = {"fly-replay-cache": "/customers/100/*", "fly-replay-cache-ttl-secs": "30"}
    return replays(f"instance={owner}", **{**cache, **headers})


async def test_replay_cache_routes_straight_to_the_target(rig: Rig) -> None:
    a = rig.add("a", router("b"))
    b = rig.add("b")
    prefer_a = {"fly-prefer-instance-id": "a"}
    first = await rig.client.get("/customers/100/notes", headers=prefer_a)
    second = await rig.client.get("/customers/100/notes/7", headers=prefer_a)
    other_path = await rig.client.get("/customers/1000", headers=prefer_a)
    assert [first.text, second.text, other_path.text] == ["served by b"] * 3
    assert [s.path for s in a.seen] == ["/customers/100/notes", "/customers/1000"]
    assert b.seen[1].headers["fly-replay-cache-status"] == "hit"
    assert "fly-replay-src" not in b.seen[1].headers
    assert [(r.source, r.target, r.via) for r in rig.proxy.replay_log] == [
        ("a", "b", "fly-replay"),
        ("a", "b", "cache"),
        ("a", "b", "fly-replay"),
    ]
    # Expired: the route goes back through the machine that set it.
    rig.clock.now += 31
    await rig.client.get("/customers/100/notes", headers=prefer_a)
    assert len(a.seen) == 3


async def test_replay_cache_is_invalidated_by_the_target(rig: Rig) -> None:
    a = rig.add("a", router("b"))
    b = rig.add("b")
    prefer_a = {"fly-prefer-instance-id": "a"}
    await rig.client.get("/customers/100/x", headers=prefer_a)
    # The tenant moved to a: b sends cached requests back and drops the cache entry.
    a.handler = serves("a")
    b.handler = replays("instance=a", **{"fly-replay-cache": "invalidate"})
    moved = await rig.client.get("/customers/100/x", headers=prefer_a)
    assert moved.text == "served by a"
    assert b.seen[-1].headers["fly-replay-cache-status"] == "hit"
    after = await rig.client.get("/customers/100/x", headers=prefer_a)
    assert after.text == "served by a"
    assert len(b.seen) == 2
    assert [(r.source, r.target, r.via) for r in rig.proxy.replay_log] == [
        ("a", "b", "fly-replay"),
        ("a", "b", "cache"),
        ("b", "a", "fly-replay"),
    ]


async def test_replay_cache_bypass_needs_the_targets_consent(rig: Rig) -> None:
    a = rig.add("a", router("b", **{"fly-replay-cache-allow-bypass": "yes"}))
    b = rig.add("b")
    headers = {"fly-prefer-instance-id": "a", "fly-replay-cache-control": "skip"}
    await rig.client.get("/customers/100/x", headers=headers)
    await rig.client.get("/customers/100/x", headers=headers)
    assert len(a.seen) == 2
    assert b.seen[-1].headers["fly-replay-cache-status"] == "bypass"


@pytest.mark.parametrize(
    ("headers", "path"),
    [
        ({"fly-replay-cache-ttl-secs": "5"}, "/customers/100/x"),
        ({"fly-replay-cache-ttl-secs": "soon"}, "/customers/100/x"),
        ({"fly-replay-cache": "example.com:8080/customers/100/*"}, "/customers/100/x"),
        ({"fly-replay-cache": "/customers/100"}, "/customers/100/x"),
        ({}, "/customers/200/x"),
    ],
    ids=["short-ttl", "bad-ttl", "port", "no-wildcard", "not-matching"],
)
async def test_replay_cache_instructions_fly_refuses_are_ignored(
    rig: Rig, headers: dict[str, str], path: str
) -> None:
    a = rig.add("a", router("b", **headers))
    rig.add("b")
    for _ in range(2):
        assert (await rig.client.get(path, headers={"fly-prefer-instance-id": "a"})).is_success
    assert len(a.seen) == 2


async def test_a_cached_replay_cannot_carry_state(rig: Rig) -> None:
    a = rig.add("a", router("b;state=s"))
    rig.add("b")
    for _ in range(2):
        await rig.client.get("/customers/100/x", headers={"fly-prefer-instance-id": "a"})
    assert len(a.seen) == 2


async def test_replay_cache_with_an_explicit_domain(rig: Rig) -> None:
    a = rig.add("a", router("b", **{"fly-replay-cache": "tenants.example/customers/100/*"}))
    rig.add("b")
    host = {"fly-prefer-instance-id": "a", "host": "tenants.example:8080"}
    for _ in range(2):
        await rig.client.get("/customers/100/x", headers=host)
    other_host = {"fly-prefer-instance-id": "a", "host": "elsewhere.example"}
    await rig.client.get("/customers/100/x", headers=other_host)
    assert len(a.seen) == 2


async def test_a_websocket_handshake_no_machine_upgrades_gets_its_answer(rig: Rig) -> None:
    # The machines here serve HTTP routes only: their server refuses the upgrade (403), and
    # the proxy hands that answer on as a websocket denial response.
    rig.add("a")
    with pytest.raises(WebSocketUpgradeError) as refused:
        async with AsyncWebSocketClient(rig.client).connect("/ws", headers=force("a")):
            pass
    assert refused.value.response.status_code == 403
    assert "fly-request-id" in refused.value.response.headers


# -- parsing ------------------------------------------------------------------------------


def test_replay_directive_parsing() -> None:
    directive = ReplayDirective.parse(
        'instance=abc ; region="iad,ord" ;elsewhere=TRUE;state=x=y;z=1'
    )
    assert directive == ReplayDirective(
        instance="abc", regions=("iad", "ord"), elsewhere=True, state="x=y"
    )
    assert ReplayDirective.parse("prefer_instance=m1;app=other") == ReplayDirective(
        prefer_instance="m1", app="other"
    )


async def test_routes_record_who_served_and_the_bookmarks_of_replica_reads(rig: Rig) -> None:
    def replica(request: Request) -> Response:
        headers = {"tenantdb-served-by": "m2", "tenantdb-bookmark": "3.14"}
        return PlainTextResponse("read", headers=headers)

    rig.add("m2", replica)
    response = await rig.client.get("/customers/acme", headers={"cookie": "tenantdb-bookmark=3.12"})
    assert response.status_code == 200
    record = rig.proxy.routes[-1]
    assert (record.served_by, record.carried, record.bookmark) == ("m2", "3.12", "3.14")
    plain = await rig.client.get("/customers/acme", headers={"tenantdb-bookmark": "x"})
    assert plain.status_code == 200
    assert rig.proxy.routes[-1].carried == "malformed"


async def test_a_cookie_one_client_was_set_never_reaches_another_clients_request(
    rig: Rig,
) -> None:
    # The proxy's own HTTP client once kept every Set-Cookie and sent it with later
    # requests: a bookmark cookie of one client then came with everyone's requests.
    a = rig.add(
        "a", lambda request: PlainTextResponse("set", headers={"set-cookie": "secret=1; Path=/"})
    )
    assert (await rig.client.get("/first")).headers["set-cookie"] == "secret=1; Path=/"
    async with httpx.AsyncClient(base_url=str(rig.client.base_url), trust_env=False) as other:
        assert (await other.get("/second")).status_code == 200
    assert "cookie" not in a.seen[-1].headers


# -- regions ------------------------------------------------------------------------------


async def test_a_request_goes_to_a_machine_in_the_region_it_entered_in(servers: Servers) -> None:
    machines = Machines(servers)
    for machine_id, region in (("a1", "ams"), ("a2", "ams"), ("f1", "fra")):
        machines.add(machine_id, region=region)
    async with FlyProxy(machines, rng=random.Random(7), edge_region="ams") as proxy:
        url = await servers.start(proxy)
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            near = [await client.get("/x") for _ in range(10)]
            far = [await client.get("/x", headers={EDGE_REGION_HEADER: "fra"}) for _ in range(5)]
    assert {r.text for r in near} == {"served by a1", "served by a2"}
    assert {r.text for r in far} == {"served by f1"}
    # Machines see Fly's Fly-Region, the region the request entered in, not the dev header.
    seen = machines.by_id["f1"].seen[-1].headers
    assert seen["fly-region"] == "fra"
    assert EDGE_REGION_HEADER not in seen
    assert [r.edge for r in proxy.routes][-1] == "fra"


async def test_a_hop_to_another_region_waits_the_latency_each_way(servers: Servers) -> None:
    machines = Machines(servers)
    machines.add("a", replays("instance=f"), region="ams")
    machines.add("f", region="fra")
    latency = RegionLatency(0.2)
    async with FlyProxy(machines, edge_region="ams", latency=latency) as proxy:
        url = await servers.start(proxy)
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            began = time.monotonic()
            replayed = await client.get("/x")
            crossing = time.monotonic() - began
            began = time.monotonic()
            local = await client.get("/x", headers={EDGE_REGION_HEADER: "fra", **force("f")})
            staying = time.monotonic() - began
    assert replayed.text == "served by f"
    assert crossing >= 2 * latency.one_way
    assert local.text == "served by f"
    assert staying < 2 * latency.one_way


async def test_each_chunk_of_an_answer_from_another_region_crosses_the_latency(
    servers: Servers,
) -> None:
    sent: list[float] = []
    machines = Machines(servers)
    machines.add("a", replays("instance=f"), region="ams")
    machines.add("f", lambda request: two_lines(sent), region="fra")
    latency = RegionLatency(0.2)
    async with FlyProxy(machines, edge_region="ams", latency=latency) as proxy:
        url = await servers.start(proxy)
        async with (
            httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as client,
            client.stream("GET", "/x") as answer,
        ):
            came = await line_arrivals(answer)
    assert_each_line_crossed(sent, came, latency.one_way)
