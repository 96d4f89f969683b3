"""The counter demo end to end, through the local Fly emulation with real machine processes.

Requests enter the emulated Fly proxy, land on a random machine, and reach the tenant's own
machine through the middleware's fly-replay answers (foreign-tenant routing, or a standby
replaying to the lease holder). Counts must come out exact, across restarts, idle stops and
the loss of a machine.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from example_app import app, create_app
from tenantdb.dev.cluster import Cluster, ClusterConfig
from tests.support.apps import local_acme_settings

ROOT = Path(__file__).resolve().parents[1]
TENANTS = ("100", "200", "300")
JSON = {"accept": "application/json"}
# The developer's shell must not point the machines at a real bucket or app.
pytestmark = pytest.mark.usefixtures("clean_environment")


def config(tmp_path: Path, **options: Any) -> ClusterConfig:
    return ClusterConfig(port=0, state_dir=tmp_path / "state", kill_timeout=10, **options)


def client(cluster: Cluster) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=cluster.url, headers=JSON, timeout=30, trust_env=False)


async def visit(http: httpx.AsyncClient, tenant: str, **headers: str) -> httpx.Response:
    return await http.get(f"/customers/{tenant}", headers=headers)


@pytest.mark.long
async def test_600_requests_each_counted_once_by_their_tenants_machine(tmp_path: Path) -> None:
    rng = random.Random(600)
    plan = [rng.choice(TENANTS) for _ in range(600)]
    async with Cluster(config(tmp_path)) as cluster, client(cluster) as http:
        owner = {t: cluster.machine_ids(t)[0] for t in TENANTS}
        gate = asyncio.Semaphore(20)

        async def one(tenant: str) -> httpx.Response:
            async with gate:
                return await visit(http, tenant)

        answers = await asyncio.gather(*(one(t) for t in plan))
        assert [(a.status_code, a.text) for a in answers if a.status_code != 200] == []
        for tenant in TENANTS:
            mine = [a.json() for a in answers if a.json()["tenant"] == tenant]
            assert len(mine) == plan.count(tenant)
            # Every visit counted once: the counts are exactly 1..n, in some order.
            assert sorted(a["count"] for a in mine) == list(range(1, len(mine) + 1))
            assert {a["machine_id"] for a in mine} == {owner[tenant]}
        replays = Counter(r.request_id for r in cluster.replay_log)
        assert max(replays.values()) == 1
        tenant_of = {a.headers["fly-request-id"]: a.json()["tenant"] for a in answers}
        for record in cluster.replay_log:
            assert record.via == "fly-replay"
            assert record.target == owner[tenant_of[record.request_id]]
        # Load balancing lands about two requests in three on another tenant's machine.
        assert 300 < len(replays) < 500
        for tenant in TENANTS:
            assert (await visit(http, tenant)).json()["count"] == plan.count(tenant) + 1


async def test_bodies_too_large_to_replay_still_reach_their_tenant(tmp_path: Path) -> None:
    body = b"x" * (2 << 20)
    async with Cluster(config(tmp_path)) as cluster, client(cluster) as http:
        owner = cluster.machine_ids("200")[0]
        answers = [
            (await http.request("GET", "/customers/200", content=body)).json() for _ in range(12)
        ]
        assert [a["count"] for a in answers] == list(range(1, 13))
        assert {a["machine_id"] for a in answers} == {owner}
        # Fly cannot replay them: the machine that got one streamed it to the owner itself.
        assert cluster.replay_log == []


async def test_counts_continue_after_everything_restarts(tmp_path: Path) -> None:
    counts = dict.fromkeys(TENANTS, 0)
    async with Cluster(config(tmp_path)) as cluster, client(cluster) as http:
        for i in range(30):
            tenant = TENANTS[i % 3]
            counts[tenant] += 1
            assert (await visit(http, tenant)).json()["count"] == counts[tenant]
    async with Cluster(config(tmp_path)) as cluster, client(cluster) as http:
        for tenant in TENANTS:
            assert (await visit(http, tenant)).json()["count"] == counts[tenant] + 1


async def test_an_idle_stopped_machine_is_started_by_a_replay(tmp_path: Path) -> None:
    async with (
        Cluster(config(tmp_path, tenants=("100", "200"), idle_stop=1.0)) as cluster,
        client(cluster) as http,
    ):
        [sleeper] = cluster.machine_ids("100")
        [waker] = cluster.machine_ids("200")
        assert (await visit(http, "100", **{"fly-force-instance-id": sleeper})).is_success
        await wait_for(lambda: {m.state for m in cluster.status()} == {"stopped"})
        await cluster.start_machine(waker)
        # The only running machine gets it, finds the stopped owner in the bucket's
        # lock.json, and its fly-replay makes the proxy start that machine.
        answer = await visit(http, "100")
        assert answer.json() == {
            "tenant": "100",
            "count": 2,
            "machine_id": sleeper,
            "region": "dev",
        }
        last = cluster.replay_log[-1]
        assert (last.source, last.target, last.via) == (waker, sleeper, "fly-replay")
        assert last.request_id == answer.headers["fly-request-id"]


async def test_a_standby_replays_to_the_holder_then_takes_over(tmp_path: Path) -> None:
    lease = {"TENANTDB_LEASE_TTL": "3", "TENANTDB_CHECKPOINT_INTERVAL": "0.3"}
    options = {"tenants": ("100",), "machines_per_tenant": 2, "env": lease}
    async with Cluster(config(tmp_path, **options)) as cluster, client(cluster) as http:
        answers = [(await visit(http, "100")).json() for _ in range(20)]
        assert [a["count"] for a in answers] == list(range(1, 21))
        [holder] = {a["machine_id"] for a in answers}
        [standby] = set(cluster.machine_ids("100")) - {holder}
        assert cluster.replay_log
        assert {(r.source, r.target) for r in cluster.replay_log} == {(standby, holder)}

        await asyncio.sleep(1.0)  # a few checkpoint intervals: count 20 is published
        await cluster.kill_machine(holder)
        killed = time.monotonic()
        while True:
            answer = await visit(http, "100")
            if answer.status_code == 200:
                break
            # Until the lease expires the standby still points at the dead holder.
            assert answer.status_code == 503
            assert time.monotonic() - killed < 15
            await asyncio.sleep(0.2)
        assert answer.json() == {
            "tenant": "100",
            "count": 21,
            "machine_id": standby,
            "region": "dev",
        }


async def wait_for(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


# -- deployable as it is: the Fly.io files agree with each other and with the app ----------


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_fly_toml_stops_machines_gracefully_and_on_demand() -> None:
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    assert fly["kill_signal"] in ("SIGINT", "SIGTERM")
    assert fly["kill_timeout"] >= 30
    assert fly["env"]["TENANTDB_KILL_TIMEOUT"] == str(fly["kill_timeout"])
    service = fly["http_service"]
    assert service["internal_port"] == int(fly["env"]["PORT"]) == 8080
    assert service["auto_stop_machines"] == "stop"
    assert service["auto_start_machines"] is True
    assert service["min_machines_running"] == 0
    [check] = service["checks"]
    assert check["path"] == "/healthz"
    [middleware] = app.user_middleware
    assert middleware.kwargs.get("health_path", "/healthz") == check["path"]


def test_dockerfile_builds_the_demo_for_fly() -> None:
    lines = dockerfile()
    assert re.fullmatch(r"FROM python:3\.1[12]-slim", lines[0])
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user not in ("root", "0")
    [cmd] = [line for line in lines if line.startswith("CMD ")]
    assert json.loads(cmd.removeprefix("CMD ")) == ["python", "-m", "example_app"]
    env = dict(
        pair.split("=", 1) for line in lines if line.startswith("ENV ") for pair in line.split()[1:]
    )
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    assert env["PORT"] == "8080"
    assert env["TENANTDB_KILL_TIMEOUT"] == str(fly["kill_timeout"])
    assert env["TENANTDB_DATA_DIR"] == fly["env"]["TENANTDB_DATA_DIR"]
    copies = [line for line in lines if line.startswith(("COPY ", "RUN pip", "RUN python"))]
    # Dependencies are installed before the source is copied, so source edits reuse that layer.
    assert copies[0] == "COPY pyproject.toml ./"
    assert "pip install" in copies[1]
    assert all(c.startswith("COPY ") for c in copies[2:])


def test_dockerfile_installs_exactly_the_project_dependencies(tmp_path: Path) -> None:
    [run] = [line for line in dockerfile() if "tomllib" in line]
    script = re.search(r'python -c "(.*?)" >', run)
    assert script is not None
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    # The shell keeps backslashes in double quotes: Python sees the same string.
    printed = subprocess.run(
        [sys.executable, "-c", script[1]], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert printed == project["dependencies"]


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    text = (ROOT / ".dockerignore").read_text()
    rules = [line for line in text.splitlines() if line and line[0] != "#"]
    assert rules[0] == "*"
    allowed = {r for r in rules if r.startswith("!")}
    assert allowed == {"!pyproject.toml", "!tenantdb/", "!example_app/"}


def test_make_demo_installs_only_the_package_and_takes_a_port(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    plan = subprocess.run(
        # --no-print-directory: under `make test`, the inherited MAKELEVEL adds those lines.
        ["make", "-n", "--no-print-directory", "demo", f"VENV={venv}", "PORT=8081"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    installs = [line for line in plan if "pip install" in line and "--upgrade pip" not in line]
    assert installs == [f"{venv}/bin/python -m pip install --quiet -e ."]  # no test extras
    assert plan[-1] == f"{venv}/bin/tenantdb dev --port 8081"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tools = {"pytest", "moto", "mypy", "hypothesis", "ruff", "fastapi"}
    assert not {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]} & tools


def test_the_demo_pages_explain_and_head_does_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_MACHINE_ID", "m1owner")
    demo = create_app(settings=local_acme_settings(tmp_path))
    with TestClient(demo) as http:
        home = http.get("/")
        assert home.headers["content-type"].startswith("text/html")
        for tenant in TENANTS:
            assert f'<a href="/customers/{tenant}">tenant {tenant}</a>' in home.text
        assert "fly-replay" in home.text  # what happens on a visit
        # ...and when it is answered, as the default durability does it.
        assert "The page is sent once the bucket\nhas the visit" in home.text

        assert http.head("/customers/acme").status_code == 200
        assert http.get("/customers/acme", headers=JSON).json()["count"] == 1  # HEAD did not count

        replayed = http.get(
            "/customers/acme", headers={"fly-replay-src": "instance=m2other;region=ams;t=1"}
        )
        assert "was received by machine m2other and replayed to m1owner" in replayed.text
        direct = http.get("/customers/acme")
        assert "was received by machine m1owner itself" in direct.text
