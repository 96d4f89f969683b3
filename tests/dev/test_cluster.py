"""The local Fly emulation with real machine processes: identities, DNS, stop/start/kill,
idle stops, failures that leave nothing behind, and `tenantdb dev` itself."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import httpx
import pytest
from httpx_ws import AsyncWebSocketClient, WebSocketDisconnect
from prometheus_client.parser import text_string_to_metric_families

from tenantdb.dev.cluster import Cluster, ClusterConfig
from tenantdb.dev.proxy import MachineUnavailableError
from tenantdb.dev.websocket_relay import MAX_MESSAGE_BYTES
from tenantdb.errors import ConfigurationError, TenantDBError
from tenantdb.storage.local import LocalBucket
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
JSON = {"accept": "application/json"}
# The developer's shell must not point the machines at a real bucket or app.
pytestmark = pytest.mark.usefixtures("clean_environment")


def config(tmp_path: Path, **options: Any) -> ClusterConfig:
    options = {"tenants": ("100",), "kill_timeout": 10, **options}
    return ClusterConfig(port=0, state_dir=tmp_path / "state", **options)


def force(machine_id: str) -> dict[str, str]:
    return {**JSON, "fly-force-instance-id": machine_id}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_for(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def ask(cluster: Cluster, name: str, rdtype: str) -> dns.message.Message:
    host, port = cluster.dns.address
    return await dns.asyncquery.udp(dns.message.make_query(name, rdtype), host, 2, port)


async def test_machines_have_fly_identities_dns_records_and_keep_data(tmp_path: Path) -> None:
    async with (
        Cluster(config(tmp_path, tenants=("100", "200"), regions=("ams",))) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False) as client,
    ):
        status = cluster.status()
        assert [m.tenant for m in status] == ["100", "200"]
        for m in status:
            assert re.fullmatch(r"[0-9a-f]{14}", m.machine_id)
            assert m.state == "started"
            assert m.pid is not None
            assert alive(m.pid)
            answer = await client.get(f"/customers/{m.tenant}", headers=force(m.machine_id))
            assert answer.json() == {
                "tenant": m.tenant,
                "count": 1,
                "machine_id": m.machine_id,
                "region": "ams",
            }
        first = status[0]
        name = "100.customer_id.kv._metadata.tenantdb-dev.internal."
        [address] = [r.to_text() for r in (await ask(cluster, name, "AAAA")).answer[0]]
        ptr = await ask(cluster, dns.reversename.from_address(address).to_text(), "PTR")
        assert ptr.answer[0][0].to_text() == f"{first.machine_id}.vm.tenantdb-dev.internal."

        await cluster.stop_machine(first.machine_id)
        assert cluster.status()[0].state == "stopped"
        assert cluster.status()[0].pid is None
        assert not alive(first.pid)  # type: ignore[arg-type]
        assert (await ask(cluster, name, "AAAA")).rcode() == dns.rcode.NXDOMAIN

        # A request for the stopped machine starts it; the data survived the stop.
        again = await client.get("/customers/100", headers=force(first.machine_id))
        assert again.json()["count"] == 2
        assert cluster.status()[0].state == "started"
        assert (await ask(cluster, name, "AAAA")).answer
        pids = [m.pid for m in cluster.status()]
    assert not any(alive(pid) for pid in pids if pid is not None)
    assert cluster.stopped_cleanly


async def test_each_machine_serves_its_own_tenants_metrics_on_its_own_port(
    tmp_path: Path,
) -> None:
    tenants = ("100", "200", "300")
    async with (
        Cluster(config(tmp_path, tenants=tenants)) as cluster,
        httpx.AsyncClient(trust_env=False) as client,
    ):
        status = cluster.status()
        ports = [m.metrics_port for m in status]
        assert None not in ports
        assert len(set(ports)) == len(tenants)
        for m in status:
            scrape = await client.get(f"http://127.0.0.1:{m.metrics_port}/metrics")
            assert scrape.status_code == 200
            served = {
                sample.labels["tenant"]
                for family in text_string_to_metric_families(scrape.text)
                for sample in family.samples
                if sample.name == "tenantdb_lease_generation"
            }
            assert served == {m.tenant}
        state = (await client.get(f"{cluster.url}/_dev/state")).json()
        assert {m["id"]: m["metrics_port"] for m in state["machines"]} == {
            m.machine_id: m.metrics_port for m in status
        }


async def test_a_restart_brings_back_the_same_machines(tmp_path: Path) -> None:
    two = config(tmp_path, machines_per_tenant=2)
    async with Cluster(two) as cluster:
        ids = cluster.machine_ids("100")
    assert len(ids) == 2
    async with Cluster(two) as cluster:
        assert cluster.machine_ids("100") == ids
    async with Cluster(replace(two, tenants=("100", "300"), machines_per_tenant=1)) as cluster:
        assert cluster.machine_ids("100") == ids[:1]
        assert len(cluster.machine_ids("300")) == 1


async def test_a_killed_machine_has_failed_until_started_again(tmp_path: Path) -> None:
    async with (
        Cluster(config(tmp_path)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False) as client,
    ):
        [machine] = cluster.status()
        assert (await client.get("/customers/100", headers=force(machine.machine_id))).is_success
        await cluster.kill_machine(machine.machine_id)
        assert cluster.status()[0].state == "failed"
        assert not alive(machine.pid)  # type: ignore[arg-type]
        forced = await client.get("/customers/100", headers=force(machine.machine_id))
        assert forced.status_code == 503
        assert "has failed" in forced.text
        balanced = await client.get("/customers/100", headers=JSON)
        assert balanced.status_code == 503
        assert "no machine of app tenantdb-dev can take the request" in balanced.text
        await cluster.start_machine(machine.machine_id)
        # The same machine comes back to its own lease and local file: nothing is lost.
        assert (await client.get("/customers/100", headers=JSON)).json()["count"] == 2


async def lock_json(cluster: Cluster, tenant: str) -> dict[str, Any]:
    async with LocalBucket(cluster.bucket_settings().local_bucket_dir) as bucket:
        lock: dict[str, Any] = json.loads((await bucket.get(f"tenants/{tenant}/lock.json")).body)
    return lock


async def test_idle_machines_stop_themselves_with_exit_0_and_start_on_the_next_request(
    tmp_path: Path,
) -> None:
    async with (
        Cluster(config(tmp_path, idle_stop=0.5)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False) as client,
    ):
        assert (await client.get("/customers/100", headers=JSON)).json()["count"] == 1
        await wait_for(lambda: cluster.status()[0].state == "stopped")
        # The machine ended itself, as on Fly (restart policy on-failure keeps it stopped).
        assert cluster.status()[0].exit_code == 0
        assert (await lock_json(cluster, "100"))["released"] == "idle"
        shown = (await client.get("/_dev/state")).json()  # what the dashboard shows
        assert (shown["machines"][0]["state"], shown["machines"][0]["exit_code"]) == (
            "stopped",
            0,
        )
        assert shown["tenants"][0]["lock"]["released"] == "idle"
        woken = await client.get("/customers/100", headers=JSON)
        assert woken.json()["count"] == 2
        assert cluster.status()[0].state == "started"


async def test_an_idle_tenants_standby_stops_too_and_a_request_wakes_one_machine(
    tmp_path: Path,
) -> None:
    async with (
        Cluster(config(tmp_path, idle_stop=1.5, machines_per_tenant=2)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False) as client,
    ):
        assert (await client.get("/customers/100", headers=JSON)).json()["count"] == 1
        await wait_for(lambda: all(m.state == "stopped" for m in cluster.status()))
        assert [m.exit_code for m in cluster.status()] == [0, 0]
        lock = await lock_json(cluster, "100")
        assert (lock["owner"], lock["released"]) == (None, "idle")
        woken = await client.get("/customers/100", headers=JSON)
        assert woken.json()["count"] == 2
        assert sorted(m.state for m in cluster.status()) == ["started", "stopped"]


async def test_with_autostart_off_a_replay_does_not_start_a_stopped_machine(
    tmp_path: Path,
) -> None:
    options = {"tenants": ("100", "200"), "autostart": False}
    async with (
        Cluster(config(tmp_path, **options)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False) as client,
    ):
        [asleep] = cluster.machine_ids("100")
        assert (await client.get("/customers/100", headers=force(asleep))).is_success
        await cluster.stop_machine(asleep)
        # The running machine finds the stopped owner in lock.json and replays there; the
        # proxy does not start it, so the replay falls back to the machine that asked.
        refused = await client.get("/customers/100", headers=JSON)
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert "fly-replay-failed" in error
        # Fly's fly-replay-failed: the machine the replay was for, and a documented reason.
        assert f"instance={asleep};app=tenantdb-dev;" in error
        assert ";reason=no_candidate;" in error
        assert refused.headers["retry-after"]
        assert [m.state for m in cluster.status()] == ["stopped", "started"]
        await cluster.start_machine(asleep)
        assert (await client.get("/customers/100", headers=JSON)).json()["count"] == 2


async def test_a_websocket_follows_fly_replay_to_the_tenants_machine(tmp_path: Path) -> None:
    options = {"tenants": ("100", "200"), "app_module": "tests.support.routing_app:app"}
    async with (
        Cluster(config(tmp_path, **options)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False) as client,
    ):
        [asker] = cluster.machine_ids("100")
        [owner] = cluster.machine_ids("200")
        connect = AsyncWebSocketClient(client, max_message_size_bytes=MAX_MESSAGE_BYTES).connect(
            "/customers/200/ws", subprotocols=["chat"], headers=force(asker)
        )
        async with connect as socket:
            assert socket.subprotocol == "chat"
            assert await socket.receive_json() == {
                "tenant": "200",
                "machine": owner,
                "replayed_from": f"instance={asker}",
            }
            for text in ("one", "two" * 50_000):
                await socket.send_text(text)
                assert await socket.receive_text() == f"echo {text}"
            await socket.send_text("bye")
            with pytest.raises(WebSocketDisconnect) as closed:
                await socket.receive_text()
        assert (closed.value.code, closed.value.reason) == (4000, "bye")
        last = cluster.replay_log[-1]
        assert (last.source, last.target, last.path) == (asker, owner, "/customers/200/ws")


async def test_a_machine_that_never_listens_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    cluster = Cluster(config(tmp_path, command=(sys.executable, "-c", script), start_timeout=1))
    with pytest.raises(MachineUnavailableError, match="did not listen"):
        await cluster.start()
    assert not alive(int(pid_file.read_text()))
    assert [m.state for m in cluster.status()] == ["stopped"]


async def test_a_machine_ignoring_sigint_is_killed_after_the_kill_timeout(tmp_path: Path) -> None:
    script = (
        "import os, signal, socket, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
        "time.sleep(60)\n"
    )
    options = {"command": (sys.executable, "-c", script), "kill_timeout": 1}
    async with Cluster(config(tmp_path, **options)) as cluster:
        [machine] = cluster.status()
        began = time.monotonic()
        await cluster.stop_machine(machine.machine_id)
        assert 1 <= time.monotonic() - began < 5
        assert not alive(machine.pid)  # type: ignore[arg-type]
        assert not cluster.stopped_cleanly


async def test_a_busy_port_is_reported(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cluster = Cluster(replace(config(tmp_path), port=busy.getsockname()[1]))
        with pytest.raises(
            ConfigurationError, match="choose another port with `tenantdb dev --port N`"
        ):
            await cluster.start()
    assert [m.state for m in cluster.status()] == ["stopped"]


def test_bad_configurations_are_refused(tmp_path: Path) -> None:
    for bad in [
        {"tenants": ()},
        {"tenants": ("100", "100")},
        {"tenants": ("Not_A_Tenant",)},
        {"machines_per_tenant": 0},
        {"app_name": "Bad App"},
        {"kill_timeout": 0},
    ]:
        with pytest.raises(TenantDBError):
            config(tmp_path, **bad)


# -- tenantdb dev ---------------------------------------------------------------------------


def _lines(stream: Any) -> Iterator[str]:
    """Lines of a pipe read by a thread, so the test never blocks on it."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (line := lines.get(timeout=30)) is not None:
        yield line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_tenantdb_dev_serves_and_stops_every_machine(
    tmp_path: Path, subprocess_env: dict[str, str], sig: signal.Signals
) -> None:
    port = free_port()
    log_path = tmp_path / "dev.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tenantdb.cli", "dev", "--port", str(port)),
                *("--tenants", "100,200", "--state-dir", str(tmp_path / "state")),
            ],
            cwd=ROOT,
            env=subprocess_env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            output = []
            for line in _lines(proc.stdout):
                output.append(line)
                if line.startswith("Open "):
                    break
            assert output[-1].startswith(f"Open http://127.0.0.1:{port}/customers/100")
            pids = [int(p) for p in re.findall(r"pid (\d+)", "".join(output))]
            assert len(pids) == 2
            # Each machine's own metrics, named in the summary.
            metrics = re.findall(r"metrics (http://127\.0\.0\.1:\d+/metrics)", "".join(output))
            assert len(set(metrics)) == 2
            answers = [
                httpx.get(f"http://127.0.0.1:{port}/customers/200", headers=JSON, trust_env=False)
                for _ in range(12)
            ]
            assert [a.json()["count"] for a in answers] == list(range(1, 13))
            proc.send_signal(sig)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not any(alive(pid) for pid in pids)
    text = log_path.read_text()
    assert "replay GET /customers/200" in text
    assert text.count("lease released") == 2
