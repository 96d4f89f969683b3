"""The `tenantdb dev` dashboard answers only this computer's own browser: a page that
rebinds its DNS name to 127.0.0.1 cannot read the state or press the machine buttons."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tenantdb.dev.cluster import Cluster, ClusterConfig

pytestmark = pytest.mark.usefixtures("clean_environment")
ACTION = {"x-tenantdb-dev": "1"}


async def test_dashboard_refuses_a_rebound_host_and_a_foreign_origin(tmp_path: Path) -> None:
    config = ClusterConfig(tenants=("100",), port=0, state_dir=tmp_path / "state", kill_timeout=10)
    async with Cluster(config) as cluster, httpx.AsyncClient(timeout=10) as client:
        port = cluster.url.rsplit(":", 1)[1]
        machine = cluster.status()[0].machine_id
        stop = f"{cluster.url}/_dev/machines/{machine}/stop"
        # DNS rebinding: the browser sends the attacker's name as Host, and as Origin.
        rebound = {"host": f"attacker.example:{port}", "origin": f"http://attacker.example:{port}"}
        for method, url, headers in (
            ("GET", f"{cluster.url}/_dev/state", {"host": rebound["host"]}),
            ("POST", stop, {**ACTION, **rebound}),
            ("POST", stop, {**ACTION, "origin": f"http://attacker.example:{port}"}),
        ):
            answer = await client.request(method, url, headers=headers)
            assert answer.status_code == 403, (method, headers, answer.text)
        assert cluster.status()[0].state == "started"  # no button was pressed
        # This computer's own browser, by either loopback name: answered.
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            state = await client.get(f"{cluster.url}/_dev/state", headers={"host": host})
            assert state.status_code == 200, state.text
        own = {**ACTION, "origin": f"http://localhost:{port}"}
        stopped = await client.post(stop, headers=own)
        assert stopped.status_code == 200, stopped.text
        assert cluster.status()[0].state == "stopped"
