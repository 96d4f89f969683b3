"""Tail hints between real uvicorn machines: a standby follows its holder's hint stream,
not lock.json.

Machines run ``tests.support.replica_app`` over the moto S3 server (the dev DNS responder
answers for them); each machine's id is its port, so ``TENANTDB_HINT_URL`` can name
``http://127.0.0.1:{machine_id}`` as Fly names ``<machine_id>.vm.<app>.internal:<port>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest
from starlette.responses import PlainTextResponse

from tenantdb import TenantDBMiddleware
from tenantdb.config import Settings
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.dev.ports import free_port
from tenantdb.errors import ConfigurationError
from tenantdb.machine.bookmark import Bookmark
from tenantdb.machine.tail_hints import QUIET_END
from tests.support.hint_servers import CountingRelay, HostileHintServer
from tests.support.servers import MachineProcesses, UvicornProcess

APP = "tests.support.replica_app:app"
KEY = "customer_id"
NOTES = "/customers/acme/notes"
TTL = 3.0

Start = Callable[..., UvicornProcess]


def hint_stream(
    client: httpx.AsyncClient, hints: str, after: str
) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
    """A standby's request for a holder's stream of moves past ``after`` (a 60 s wait)."""
    return client.stream(
        "GET",
        hints,
        params={"after": after, "wait": "60"},
        headers={"accept": "application/x-ndjson"},
    )


@pytest.fixture
def dns() -> Iterator[DevDNSServer]:
    with DevDNSServer().run_in_thread() as server:
        yield server


@pytest.fixture
def start(
    tmp_path: Path,
    dns: DevDNSServer,
    subprocess_env: dict[str, str],
    s3_settings_env: dict[str, str],
) -> Iterator[Start]:
    """Start a machine of tenant acme on ``port`` whose id is its port, unless ``machine``
    names another (a server on that port then stands for its hint address), serving ``app``
    (``env`` on top)."""
    with MachineProcesses(tmp_path) as machines:

        def run(
            *, machine: str | None = None, port: int | None = None, app: str = APP, **env: str
        ) -> UvicornProcess:
            port = port or free_port()
            machine = machine or str(port)
            base = {
                **subprocess_env,
                **s3_settings_env,
                "TENANTDB_DNS_SERVER": "{}:{}".format(*dns.address),
                "TENANTDB_LEASE_TTL": f"{TTL:g}",
                "TENANTDB_CHECKPOINT_INTERVAL": "0",
                "TENANTDB_METRICS_PORT": "0",
                "TENANTDB_HINT_URL": "http://127.0.0.1:{machine_id}",
            }
            server = machines.start(app, machine, "acme", {**base, **env}, port=port)
            dns.set_machine(machine, {KEY: "acme"})
            return server

        yield run


def machine_id(server: UvicornProcess) -> str:
    return str(server.port)


def bucket_requests(metrics_port: int) -> float:
    """Every bucket request the machine made so far, from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    found = re.findall(r"^tenantdb_bucket_requests_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    assert found, text[:2000]
    return sum(float(value) for value in found)


async def write(client: httpx.AsyncClient, holder: UvicornProcess, token: str) -> None:
    answer = await client.post(f"{holder.url}{NOTES}", params={"token": token})
    assert answer.status_code == 201, answer.text


async def served_by_replica(client: httpx.AsyncClient, replica: UvicornProcess) -> list[str]:
    """The tokens the replica's own copy holds (it serves the read itself), else []."""
    answer = await client.get(f"{replica.url}{NOTES}")
    if answer.status_code != 200 or answer.headers.get("tenantdb-served-by") != machine_id(replica):
        return []
    tokens: list[str] = answer.json()["tokens"]
    return tokens


# A replica that reads lock.json only every 30 s (its lag may be 60 s): hints alone bring
# writes in.
HINTS_ONLY = {
    "TENANTDB_REPLICA_READS": "1",
    "TENANTDB_FOLLOW_INTERVAL": "30",
    "TENANTDB_MAX_REPLICA_LAG": "60",
    "TENANTDB_READ_WAIT": "0",
}


async def served_within(
    client: httpx.AsyncClient,
    replica: UvicornProcess,
    token: str,
    seconds: float,
    *,
    poll: float = 0.05,
) -> None:
    """Wait until the replica serves ``token`` from its own copy; fail past ``seconds``."""
    started = time.monotonic()
    while token not in await served_by_replica(client, replica):
        waited = time.monotonic() - started
        assert waited < seconds, f"{token!r} not on the replica after {waited:.1f}s"
        await asyncio.sleep(poll)


def test_an_idle_standby_reads_lock_json_at_most_once_per_two_ttls(start: Start) -> None:
    holder = start()
    metrics_port = free_port()
    standby = start(TENANTDB_METRICS_PORT=str(metrics_port))  # polls every 0.5 s without hints
    time.sleep(TTL / 2)  # the standby restored its copy and asks the holder for hints
    before = bucket_requests(metrics_port)
    window = 2 * TTL
    time.sleep(window)
    made = bucket_requests(metrics_port) - before
    # Two TTLs: at most one read, plus one at an edge of the window. At the default TTL of
    # 15 s that is at most 4 requests a minute, where polling made 120.
    print(f"idle standby: {made:g} bucket requests in {window:g}s")
    assert made <= 2, f"the idle standby made {made:g} bucket requests in {window:g}s"
    assert holder.proc.poll() is None
    assert standby.proc.poll() is None


def test_an_idle_replica_serves_past_the_lag_bound_on_hints_alone(start: Start) -> None:
    # The holder's answers "still at your position" keep the copy's lag small: the replica
    # reads lock.json no more often than a standby, and never refuses a read for lag.
    bound = 2.0
    replicas = {"TENANTDB_REPLICA_READS": "1", "TENANTDB_MAX_REPLICA_LAG": f"{bound:g}"}
    holder = start(**replicas)
    metrics_port = free_port()
    replica = start(**replicas, TENANTDB_METRICS_PORT=str(metrics_port))

    async def scenario() -> tuple[float, list[float], int]:
        async with httpx.AsyncClient(timeout=10) as client:
            await write(client, holder, "kept")
            await served_within(client, replica, "kept", 20)
            await asyncio.sleep(TTL / 2)  # the replica asks the holder for hints now
            before = bucket_requests(metrics_port)
            lags: list[float] = []
            refused = 0
            ends = time.monotonic() + 2 * TTL  # three lag bounds
            while time.monotonic() < ends:
                answer = await client.get(f"{replica.url}{NOTES}")
                if answer.headers.get("tenantdb-served-by") == machine_id(replica):
                    lags.append(int(answer.headers["tenantdb-lag-ms"]) / 1000)
                else:
                    refused += 1
                await asyncio.sleep(0.05)
            return bucket_requests(metrics_port) - before, lags, refused

    made, lags, refused = asyncio.run(scenario())
    print(f"idle replica: {made:g} bucket requests in {2 * TTL:g}s, lag max {max(lags):.2f}s")
    assert refused == 0, f"{refused} reads went to the holder"
    # Two hint waits of a quarter of the bound, plus the round trips.
    assert max(lags) < bound / 2 + 0.5, max(lags)
    assert made <= 2, f"the idle replica made {made:g} bucket requests in {2 * TTL:g}s"


def test_a_replica_whose_holder_stops_answering_lags_and_refuses_past_the_bound(
    start: Start,
) -> None:
    # Its plain poll is slow: once the holder is stopped nothing confirms the copy.
    bound = 2.0
    replicas = {
        "TENANTDB_REPLICA_READS": "1",
        "TENANTDB_MAX_REPLICA_LAG": f"{bound:g}",
        "TENANTDB_FOLLOW_INTERVAL": "30",
    }
    holder = start(**replicas)
    replica = start(**replicas)

    async def scenario() -> tuple[list[float], float]:
        async with httpx.AsyncClient(timeout=10) as client:
            await write(client, holder, "kept")
            await served_within(client, replica, "kept", 20)
            holder.proc.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            lags: list[float] = []
            while True:
                answer = await client.get(f"{replica.url}{NOTES}")
                if answer.headers.get("tenantdb-served-by") != machine_id(replica):
                    return lags, time.monotonic() - stopped
                lags.append(int(answer.headers["tenantdb-lag-ms"]) / 1000)
                assert time.monotonic() - stopped < 4 * bound, "still served"
                await asyncio.sleep(0.05)

    try:
        lags, refused_after = asyncio.run(scenario())
    finally:
        holder.proc.send_signal(signal.SIGCONT)
    print(f"refused {refused_after:.2f}s after the holder stopped, last lag {lags[-1]:.2f}s")
    assert lags[-10:] == sorted(lags[-10:]), lags
    assert bound - 0.3 < lags[-1] <= bound
    # The last vouched-for moment was before the stop, at most half the bound before it.
    assert refused_after <= bound + 0.5


def test_a_write_reaches_the_replica_on_a_hint_not_on_the_poll(start: Start) -> None:
    # Without hints the replica would read lock.json again only after 30 s, and still serve
    # its older copy (its lag may be 60 s).
    slow = HINTS_ONLY
    holder = start(**slow)

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await write(client, holder, "first")
            replica = start(**slow)  # its first read of lock.json finds "first"
            await served_within(client, replica, "first", 20)
            for token in ("second", "third"):
                await write(client, holder, token)
                await served_within(client, replica, token, 10, poll=0.01)

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_standby_takes_over_from_a_holder_that_stops_answering_hints(
    start: Start, how: str
) -> None:
    holder = start()
    standby = start()
    time.sleep(TTL / 2)  # the standby waits on the holder's hints now

    async def scenario() -> float:
        async with httpx.AsyncClient(timeout=10) as client:
            await write(client, holder, "before")
            holder.proc.send_signal(getattr(signal, how))
            stopped = time.monotonic()
            while True:
                # Straight to the standby: its fly-replays to the stopped holder are not followed.
                answer = await client.post(f"{standby.url}{NOTES}", params={"token": "after"})
                if answer.status_code == 201:
                    break
                assert time.monotonic() - stopped < 6 * TTL, answer.text
                await asyncio.sleep(0.1)
            took = time.monotonic() - stopped
            read = await client.get(f"{standby.url}{NOTES}")
            assert read.json()["tokens"] == ["before", "after"]
            return took

    try:
        took = asyncio.run(scenario())
    finally:
        if how == "SIGSTOP":
            holder.proc.send_signal(signal.SIGCONT)
    print(f"{how}: the standby took over {took:.2f}s after the holder stopped")
    # The lease runs out one TTL (and S3's one-second granularity) after the holder's last
    # renewal; hints must not make the standby notice it later than polling would.
    assert took < 2 * TTL + 2, f"the standby took over {took:.1f}s after the holder stopped"


def test_malformed_and_foreign_hint_requests_get_a_4xx_and_change_nothing(start: Start) -> None:
    holder = start()
    hints = f"{holder.url}/.tenantdb/tail"
    with httpx.Client(timeout=10) as client:
        assert client.post(f"{holder.url}{NOTES}", params={"token": "kept"}).status_code == 201
        refused = {
            f"{hints}/globex?after=1.1&wait=0": (421, "does not serve tenant globex"),
            f"{hints}/acme": (400, "needs ?after="),
            f"{hints}/acme?after=one&wait=1": (400, "needs ?after="),
            f"{hints}/acme?after=1.1&wait=nan": (400, "needs ?after="),
            f"{hints}/acme?after=1.1&wait=-1": (400, "needs ?after="),
            f"{hints}/acme?after=1.1&wait=1&more=1": (400, "needs ?after="),
            f"{hints}/acme?after=1.1&after=1.2&wait=1": (400, "needs ?after="),
            f"{hints}/acme?after=1.1&wait={'9' * 300}": (400, "needs ?after="),
            f"{hints}/ACME!?after=1.1&wait=1": (400, "not a tail hint request"),
        }
        for url, (status, message) in refused.items():
            answer = client.get(url)
            assert (answer.status_code, message in answer.text) == (status, True), (
                url,
                answer.text,
            )
        posted = client.post(f"{hints}/acme?after=1.1&wait=0")
        assert posted.status_code == 405, posted.text
        # A well-formed request from anyone gets only what a bookmark says.
        answer = client.get(f"{hints}/acme", params={"after": "0.0", "wait": "0"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["holding"] is True
        assert set(answer.json()) == {"holding", "position"}
        read = client.get(f"{holder.url}{NOTES}")
        assert read.json()["tokens"] == ["kept"]
        assert client.get(f"{holder.url}/healthz").status_code == 200


def test_the_holder_keeps_a_bounded_number_of_hint_requests_waiting(start: Start) -> None:
    holder = start(TENANTDB_LEASE_TTL="15")  # hint waits of at most 5 s
    hints = f"{holder.url}/.tenantdb/tail/acme"

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=30) as client:

            async def position() -> str:
                answer = await client.get(hints, params={"after": "0.0", "wait": "0"})
                at: str = answer.json()["position"]
                return at

            async def ask(after: str) -> int:
                answer = await client.get(hints, params={"after": after, "wait": "60"})
                return answer.status_code

            started = time.monotonic()
            at = await position()
            statuses = await asyncio.gather(*(ask(at) for _ in range(40)))
            assert sorted(statuses) == [200] * 32 + [503] * 8, statuses
            # The wait is cut to a third of the holder's TTL, whatever was asked.
            assert time.monotonic() - started < 15, statuses
            # Standbys that stop waiting (their connections closed) give their places back.
            at = await position()
            gone = [asyncio.create_task(ask(at)) for _ in range(32)]
            # A request past another position is answered at once, or refused when full.
            filling = time.monotonic()
            while await ask("0.0") != 503:
                assert time.monotonic() - filling < 30, "the 32 requests never all waited"
                # On a loaded machine the first may reach the end of its wait before the
                # last arrives: those ask again.
                gone = [t if not t.done() else asyncio.create_task(ask(at)) for t in gone]
                await asyncio.sleep(0.05)
            for request in gone:
                request.cancel()
            await asyncio.gather(*gone, return_exceptions=True)
            await asyncio.sleep(0.2)
            assert await ask("0.0") == 200

    asyncio.run(scenario())


@pytest.mark.parametrize("template", ["ftp://{machine_id}", "http://{host}:8080"])
def test_a_bad_hint_url_fails_the_startup_naming_it(tmp_path: Path, template: str) -> None:
    settings = Settings.from_env(
        {
            "TENANT_ID": "acme",
            "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket"),
            "TENANTDB_DATA_DIR": str(tmp_path / "data"),
            "TENANTDB_HINT_URL": template,
        }
    )
    middleware = TenantDBMiddleware(PlainTextResponse("app"), settings=settings)
    error = middleware.startup_error
    assert isinstance(error, ConfigurationError)
    assert error.variable == "TENANTDB_HINT_URL"
    assert "tail hint URL template TENANTDB_HINT_URL=" in str(error)


async def lines_of(response: httpx.Response) -> list[tuple[float, dict[str, object]]]:
    """Each line of a hint stream, with the monotonic time it arrived."""
    lines, pending = [], b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        *whole, pending = pending.split(b"\n")
        lines += [(time.monotonic(), json.loads(line)) for line in whole]
    assert pending == b"", pending
    return lines


def test_the_holder_streams_a_line_at_each_move_and_where_it_stands_at_the_end(
    start: Start,
) -> None:
    holder = start()  # a TTL of 3 s: streams of at most 1 s
    hints = f"{holder.url}/.tenantdb/tail/acme"

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await write(client, holder, "first")
            at = (await client.get(hints, params={"after": "0.0", "wait": "0"})).json()
            started = time.monotonic()
            async with hint_stream(client, hints, at["position"]) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "application/x-ndjson"
                assert response.headers["cache-control"] == "no-store"

                async def writes() -> list[float]:
                    landed = []
                    for n in range(3):
                        await asyncio.sleep(0.15)
                        await write(client, holder, f"moved-{n}")
                        landed.append(time.monotonic())
                    return landed

                landed, lines = await asyncio.gather(writes(), lines_of(response))
            ended = time.monotonic() - started
            # The wait is cut to a third of the TTL; the last line says where it stands.
            assert 0.9 < ended < 2.5, ended
            positions = [Bookmark.parse(str(line["position"])) for _, line in lines]
            assert all(line["holding"] is True for _, line in lines), lines
            assert positions == sorted(positions), lines
            assert len(set(positions)) >= 3, lines
            assert positions[0] > Bookmark.parse(at["position"])
            # Each write was told as it landed, on the one answer, not at its end.
            for n, when in enumerate(landed):
                told = [arrived for arrived, _ in lines if arrived >= when - 0.05]
                assert told, (n, when, lines)
                assert told[0] - when < 0.5, (n, when, lines)
            last = (await client.get(hints, params={"after": "0.0", "wait": "0"})).json()
            assert lines[-1][1] == last

    asyncio.run(scenario())


def test_a_push_wakes_the_replica_without_a_new_hint_request_per_write(start: Start) -> None:
    # Without polls (every 30 s) only hints bring writes in. A long poll is answered at each
    # move and asked again after the replica's read: a request per write. A stream tells
    # every write, and the next is asked for only every 3/4 of a wait (0.75 s at a TTL of 3).
    slow = HINTS_ONLY
    holder_port = free_port()
    with CountingRelay(holder_port) as relay:
        # The holder's hint address is the relay's: the replica's hint requests pass it.
        holder = start(machine=str(relay.port), port=holder_port, **slow)
        replica = start(**slow)

        async def scenario() -> tuple[int, int, float]:
            async with httpx.AsyncClient(timeout=10) as client:
                await write(client, holder, "first")
                await served_within(client, replica, "first", 20)
                before, started = relay.requests, time.monotonic()
                tokens = [f"w{n}" for n in range(12)]
                for token in tokens:
                    await write(client, holder, token)
                    await asyncio.sleep(0.2)
                while tokens[-1] not in await served_by_replica(client, replica):
                    assert time.monotonic() - started < 20, "the writes never reached the replica"
                    await asyncio.sleep(0.01)
                return relay.requests - before, len(tokens), time.monotonic() - started

        asked, written, took = asyncio.run(scenario())
    print(f"{written} writes in {took:.2f}s reached the replica over {asked} hint requests")
    assert asked <= took / 0.75 + 2, asked
    assert asked < written / 2, asked


def test_a_replica_follows_a_holder_that_answers_only_long_polls(start: Start) -> None:
    # A holder of the version before streams: the replica's stream request is answered
    # once, as a long poll (application/json), which the replica takes as a stream of one
    # line, asking again at once.
    slow = HINTS_ONLY
    holder = start(app="tests.support.replica_app:long_polls_only", **slow)
    replica = start(**slow)

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(
                f"{holder.url}/.tenantdb/tail/acme",
                params={"after": "0.0", "wait": "0"},
                headers={"accept": "application/x-ndjson"},
            )
            assert answer.headers["content-type"] == "application/json", answer.headers
            await write(client, holder, "first")
            await served_within(client, replica, "first", 20)
            for token in ("second", "third", "fourth"):
                await write(client, holder, token)
                await served_within(client, replica, token, 5, poll=0.01)

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["cut", "malformed"])
def test_a_hint_stream_cut_mid_line_or_malformed_sends_the_replica_back_to_polling(
    start: Start, how: Literal["cut", "malformed"]
) -> None:
    # The holder's hint address answers each stream with half a line, or a line that is
    # not a holder's: the replica takes none of it and polls lock.json every 0.3 s.
    replicas = {
        "TENANTDB_REPLICA_READS": "1",
        "TENANTDB_FOLLOW_INTERVAL": "0.3",
        "TENANTDB_MAX_REPLICA_LAG": "60",
        "TENANTDB_READ_WAIT": "0",
    }
    with HostileHintServer(how) as hostile:
        holder = start(machine=str(hostile.port), **replicas)
        metrics_port = free_port()
        replica = start(**replicas, TENANTDB_METRICS_PORT=str(metrics_port))

        async def scenario() -> float:
            async with httpx.AsyncClient(timeout=10) as client:
                await write(client, holder, "first")
                await served_within(client, replica, "first", 20)
                before = bucket_requests(metrics_port)
                await asyncio.sleep(3)
                made = bucket_requests(metrics_port) - before
                await write(client, holder, "second")
                written = time.monotonic()
                while "second" not in await served_by_replica(client, replica):
                    assert time.monotonic() - written < 3, "the replica stopped following"
                    await asyncio.sleep(0.01)
                return made

        made = asyncio.run(scenario())
        asked = hostile.requests
    print(f"{how}: {asked} hint requests, {made:g} bucket requests in 3 s")
    assert asked >= 1
    # Polls: about 10 reads of lock.json in 3 s (hints that worked would make at most 1).
    assert made >= 5, made
    assert replica.proc.poll() is None


def test_a_trickling_hint_stream_does_not_keep_a_lapsed_lease_unnoticed(start: Start) -> None:
    # The holder's hint address answers a stream that never ends and never completes a line
    # (a byte every 0.2 s, no read timeout ever fires); meanwhile the holder dies. Each
    # stream must end by its wait and the slack, and the standby poll and take over.
    with HostileHintServer("trickle") as hostile:
        holder = start(machine=str(hostile.port))
        standby = start()
        time.sleep(TTL / 2)  # the standby asks the hint address now

        async def scenario() -> float:
            async with httpx.AsyncClient(timeout=10) as client:
                await write(client, holder, "before")
                holder.proc.send_signal(signal.SIGKILL)
                stopped = time.monotonic()
                while True:
                    answer = await client.post(f"{standby.url}{NOTES}", params={"token": "after"})
                    if answer.status_code == 201:
                        return time.monotonic() - stopped
                    assert time.monotonic() - stopped < 6 * TTL, answer.text
                    await asyncio.sleep(0.1)

        took = asyncio.run(scenario())
        asked = hostile.requests
    print(f"the standby took over {took:.2f}s after the holder died ({asked} hint requests)")
    assert asked >= 1
    assert took < 2 * TTL + 2, f"the standby took over {took:.1f}s after the holder died"


def test_the_holder_counts_hint_streams_among_its_bounded_waiters(start: Start) -> None:
    holder = start(TENANTDB_LEASE_TTL="15")  # streams of at most 5 s
    hints = f"{holder.url}/.tenantdb/tail/acme"

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            at = (await client.get(hints, params={"after": "0.0", "wait": "0"})).json()

            async def stream() -> tuple[int, str, float]:
                started = time.monotonic()
                async with hint_stream(client, hints, at["position"]) as response:
                    body = (await response.aread()).decode()
                    return response.status_code, body, time.monotonic() - started

            answers = await asyncio.gather(*(stream() for _ in range(40)))
            statuses = sorted(status for status, _, _ in answers)
            assert statuses == [200] * 32 + [503] * 8, statuses
            for status, body, took in answers:
                if status == 200:
                    # Nothing moved: one line at the end of the wait, cut to 5 s.
                    assert json.loads(body) == at, body
                    assert body.endswith("\n"), body
                    assert 4.5 < took < 10, took
            # Every place is free again once the streams ended.
            again = await asyncio.gather(*(stream() for _ in range(2)))
            assert [status for status, _, _ in again] == [200, 200]

    asyncio.run(scenario())


def test_a_holder_that_stops_after_writes_is_not_held_up_by_its_standbys_streams(
    start: Start,
) -> None:
    # A TTL of 60 s: streams of up to 20 s. A server that stops gracefully waits for the
    # requests in flight, the standby's hint streams among them, before its final publish
    # and release; a stream that told of writes ends a second after the last.
    holder = start(TENANTDB_LEASE_TTL="60")
    standby = start(TENANTDB_LEASE_TTL="60")
    time.sleep(1.5)  # the standby streams from the holder now

    async def writes() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            for n in range(20):
                await write(client, holder, f"w{n}")
                await asyncio.sleep(0.05)

    asyncio.run(writes())
    started = time.monotonic()
    code = holder.stop(signal.SIGTERM, timeout=60)
    took = time.monotonic() - started
    print(f"the holder exited {code} {took:.2f}s after SIGTERM")
    assert code == -signal.SIGTERM, holder.log()[-3000:]  # uvicorn raises it again at the end
    assert took < QUIET_END + 4, took
    assert standby.proc.poll() is None
