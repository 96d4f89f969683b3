"""`tenantdb dev` with encryption at rest: real machine processes write through the counter
demo with TENANTDB_ENCRYPTION_KEY set, hand the tenant off and restart, and no byte of any
object in the bucket holds what the app wrote in the clear."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import httpx
import pytest

from tenantdb.crypto import parse_keyring
from tenantdb.dev.cluster import Cluster, ClusterConfig
from tenantdb.storage.encrypted import EncryptedBucket
from tenantdb.storage.local import LocalBucket

JSON = {"accept": "application/json"}
KEY = base64.b64encode(bytes(range(32))).decode()
# In every database the demo makes (its schema, so page 1 of snapshots and segments).
MARKER = b"CREATE TABLE counter"
pytestmark = pytest.mark.usefixtures("clean_environment")


def config(tmp_path: Path) -> ClusterConfig:
    return ClusterConfig(
        port=0,
        state_dir=tmp_path / "state",
        tenants=("100",),
        machines_per_tenant=2,
        kill_timeout=10,
        env={
            "TENANTDB_ENCRYPTION_KEY": f"k1:{KEY}",
            "TENANTDB_LEASE_TTL": "30",
            "TENANTDB_CHECKPOINT_INTERVAL": "0.3",
        },
    )


async def count(http: httpx.AsyncClient) -> tuple[int, str]:
    """One visit: (the count it made, the machine that made it).

    While the lease changes hands a machine may answer 503 ("retry shortly"), as on Fly:
    the visit is retried then, for 15 s at most.
    """
    deadline = time.monotonic() + 15
    while (answer := await http.get("/customers/100", headers=JSON)).status_code == 503:
        assert time.monotonic() < deadline, answer.text
        await asyncio.sleep(0.1)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body["count"], body["machine_id"]


async def objects(root: Path) -> dict[str, bytes]:
    """Every object's stored bytes, lock.json and key.json included."""
    async with LocalBucket(root) as bucket:
        return {info.key: (await bucket.get(info.key)).body for info in await bucket.list("")}


async def opened_snapshot(root: Path, key: str) -> bytes:
    keyring = parse_keyring(f"k1:{KEY}", variable="TENANTDB_ENCRYPTION_KEY")
    async with EncryptedBucket(LocalBucket(root), keyring, prefix="tenants/") as bucket:
        dest = root.parent / "opened.sqlite3"
        await bucket.download_file(key, dest)
        return dest.read_bytes()


async def test_the_demo_runs_encrypted_across_a_handoff_and_a_restart_leaving_no_plaintext(
    tmp_path: Path,
) -> None:
    async with (
        Cluster(config(tmp_path)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=30) as http,
    ):
        counts = [await count(http) for _ in range(10)]
        assert [c for c, _ in counts] == list(range(1, 11))
        [holder] = {m for _, m in counts}
        await cluster.stop_machine(holder)  # SIGINT, as Fly stops it: the standby follows
        after, standby = await count(http)
        assert (after, standby != holder) == (11, True)
        await asyncio.sleep(0.7)  # a couple of checkpoint intervals: a sealed snapshot
    async with (
        Cluster(config(tmp_path)) as cluster,
        httpx.AsyncClient(base_url=cluster.url, trust_env=False, timeout=30) as http,
    ):
        assert (await count(http))[0] == 12
    root = tmp_path / "state" / "bucket"
    stored = await objects(root)
    snapshots = [k for k in stored if "/snapshots/" in k]
    assert snapshots
    assert "tenants/100/key.json" in stored
    assert [k for k, body in stored.items() if MARKER in body] == []
    assert [k for k, body in stored.items() if b"SQLite format 3" in body] == []
    # The scan can see the marker: each snapshot holds it once opened.
    for key in snapshots:
        assert MARKER in await opened_snapshot(root, key)
