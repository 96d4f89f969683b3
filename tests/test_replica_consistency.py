"""A read-your-writes checker over histories of clients reading through replicas.

Three real uvicorn machines of tenant acme (``tests.support.replica_app``, replica reads on;
the embedded bucket or moto's S3 server):
m1 holds it, m2 and m3 are replicas. Clients, each with its own cookie jar (so its own
bookmark), write unique tokens and read the whole list through random machines, following
fly-replay; half-way the holder stops gracefully, or is killed (SIGKILL), and a replica
takes the lease. Over the
history it checks, for every read:

- read-your-writes: the client sees every token of its own that was acknowledged (201)
  before the read began;
- monotonic reads: the client never sees fewer tokens than in a read it made before;
- real states: the list read is a prefix of the final list (tokens get ids in commit order,
  so every state the log had is such a prefix).

``REPLICA_CHECK_OPS`` (per client) makes it run longer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tenantdb.dev.dns_server import DevDNSServer
from tests.support.replica_client import send
from tests.support.servers import MachineProcesses, UvicornProcess

APP = "tests.support.replica_app:app"
NOTES = "/customers/acme/notes"
CLIENTS = 6
OPS = int(os.environ.get("REPLICA_CHECK_OPS", "40"))


@dataclass
class Read:
    client: int
    tokens: list[str]
    acknowledged_before: frozenset[str]  # the client's own, acknowledged before the read
    seen_before: frozenset[str]  # every token the client saw in earlier reads
    served_by: str


@dataclass
class History:
    reads: list[Read] = field(default_factory=list)
    writes: int = 0
    acknowledged: int = 0
    indeterminate: int = 0  # a machine gone, a 503: the write may or may not have happened
    replica_reads: int = 0


def check(reads: list[Read], final: list[str]) -> list[str]:
    """The violations of read-your-writes, monotonic reads and real states in ``reads``."""
    violations: list[str] = []
    for read in reads:
        if missing := read.acknowledged_before - set(read.tokens):
            violations.append(f"client {read.client} missed its own {sorted(missing)}")
        if lost := read.seen_before - set(read.tokens):
            violations.append(f"client {read.client} no longer saw {sorted(lost)}")
        if final[: len(read.tokens)] != read.tokens:
            violations.append(f"client {read.client} read a state the log never had")
    return violations


def test_the_checker_finds_each_kind_of_violation() -> None:
    final = ["a", "b", "c"]
    good = Read(0, ["a", "b"], frozenset({"b"}), frozenset({"a"}), "m2")
    assert check([good], final) == []
    stale = Read(0, ["a"], frozenset({"b"}), frozenset(), "m2")
    assert check([stale], final) == ["client 0 missed its own ['b']"]
    backwards = Read(1, ["a"], frozenset(), frozenset({"a", "b"}), "m3")
    assert check([backwards], final) == ["client 1 no longer saw ['b']"]
    invented = Read(2, ["a", "c"], frozenset(), frozenset(), "m2")
    assert check([invented], final) == ["client 2 read a state the log never had"]


@pytest.fixture(params=["local", "s3"])
def machines(
    request: pytest.FixtureRequest, tmp_path: Path, subprocess_env: dict[str, str]
) -> Iterator[dict[str, UvicornProcess]]:
    if request.param == "s3":
        backend = request.getfixturevalue("s3_settings_env")
    else:
        backend = {"TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket")}
    with DevDNSServer().run_in_thread() as dns, MachineProcesses(tmp_path) as started:
        env = {
            **subprocess_env,
            **backend,
            "TENANTDB_DNS_SERVER": "{}:{}".format(*dns.address),
            "TENANTDB_LEASE_TTL": "3",
            "TENANTDB_CHECKPOINT_INTERVAL": "0",
            "TENANTDB_FOLLOW_INTERVAL": "0.1",
            "TENANTDB_METRICS_PORT": "0",
            "TENANTDB_REPLICA_READS": "1",
        }
        servers = {}
        for machine in ("m1", "m2", "m3"):
            servers[machine] = started.start(APP, machine, "acme", env)
            dns.set_machine(machine, {"customer_id": "acme"})
        yield servers


async def client_run(
    number: int,
    urls: dict[str, str],
    alive: list[str],
    history: History,
    rng: random.Random,
    halfway: asyncio.Event,
) -> None:
    acknowledged: set[str] = set()
    seen: set[str] = set()
    async with httpx.AsyncClient(timeout=10) as client:
        for op in range(OPS):
            if op == OPS // 2:
                halfway.set()
            machine = rng.choice(alive)
            if rng.random() < 0.4:
                token = f"c{number}-{op}"
                history.writes += 1
                try:
                    sent = await send(client, urls, machine, "POST", f"{NOTES}?token={token}")
                except httpx.HTTPError:
                    history.indeterminate += 1
                    continue
                if sent.response.status_code == 201:
                    acknowledged.add(token)
                    history.acknowledged += 1
                else:
                    history.indeterminate += 1
                continue
            before = frozenset(acknowledged)
            try:
                sent = await send(client, urls, machine, "GET", NOTES)
            except httpx.HTTPError:
                continue
            if sent.response.status_code != 200:
                continue  # a 503 while the lease changes hands: no state was read
            tokens = sent.response.json()["tokens"]
            served_by = sent.response.headers.get("tenantdb-served-by", "?")
            history.reads.append(Read(number, tokens, before, frozenset(seen), served_by))
            if "tenantdb-lag-ms" in sent.response.headers:
                history.replica_reads += 1
            seen.update(tokens)


@pytest.mark.long
@pytest.mark.parametrize("end", ["stop", "kill"])
def test_clients_reading_through_replicas_see_their_writes_and_never_go_back(
    machines: dict[str, UvicornProcess], end: str
) -> None:
    urls = {machine: server.url for machine, server in machines.items()}
    alive = list(urls)
    history = History()

    async def run() -> list[str]:
        halfway = asyncio.Event()

        async def handoff() -> None:
            await halfway.wait()
            alive.remove("m1")
            # Stopped in a thread: the clients go on meanwhile. Killed, it leaves its lease
            # to expire, and requests in flight to it unanswered.
            sig = signal.SIGTERM if end == "stop" else signal.SIGKILL
            await asyncio.to_thread(machines["m1"].stop, sig)

        stopper = asyncio.ensure_future(handoff())
        await asyncio.gather(
            *(
                client_run(n, urls, alive, history, random.Random(n), halfway)
                for n in range(CLIENTS)
            )
        )
        await stopper
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(timeout=10) as client:
            while True:  # the final state, from the holder (a write makes sure of it)
                sent = await send(client, urls, "m2", "POST", f"{NOTES}?token=final")
                if sent.response.status_code == 201:
                    final = await send(client, urls, "m2", "GET", NOTES)
                    tokens: list[str] = final.response.json()["tokens"]
                    return tokens
                assert time.monotonic() < deadline, sent.response.text
                await asyncio.sleep(0.1)

    final = asyncio.run(run())
    violations = check(history.reads, final)
    operations = history.writes + len(history.reads)
    print(
        f"\nreplica checker: {operations} operations checked ({history.writes} writes, "
        f"{history.acknowledged} acknowledged, {history.indeterminate} indeterminate; "
        f"{len(history.reads)} reads, {history.replica_reads} served by replicas), "
        f"{len(violations)} violations"
    )
    assert not violations, violations[:10]
    assert history.acknowledged > CLIENTS * OPS // 5
    assert history.replica_reads > len(history.reads) // 4  # replicas did serve
    assert set(final) >= {t for r in history.reads for t in r.acknowledged_before}
