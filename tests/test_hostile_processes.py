"""Crafted objects in the bucket of real machine processes: serve on, or refuse loudly.

Real uvicorn processes serve the counter app of ``tests/support/apps.py`` on moto's S3: a
holder and a standby of tenant ``acme``, and tenant ``globex``. Each crafted object of
issue 22 is placed in the bucket while they run (an attacker with the bucket's credentials:
unconditional writes), and the test asserts the one outcome the code chooses for it:

- **keeps serving** (a snapshot key with a 15-digit time, a takeover record of 60,000 ``[``,
  one with tail 10**12 beside an empty far segment key, a db_pages bomb carried inline by
  lock.json): writes are answered 200, ``lock.json``'s log tail advances, a restore
  (``tenantdb restore``, a subprocess) has every acknowledged write, the standby stays
  green; and after them all the standby takes over and serves;
- **refuses loudly, stays up** (lock.json damaged in any field): 503 saying the tenant's
  lock.json is damaged, both machines red, the log naming the key, no exit (a restart would
  meet the same lock.json; docs/guarantees.md), and serving again once it is repaired;
- **serves, but red** (a foreign segment at the key the holder uploads next): commits stay
  durable inline in lock.json, but the health check turns red and the log names the key;
- **serves, restores refuse** (a published segment replaced by an oversized one): restores
  fail naming the key, never older.

Throughout, /healthz answers within 2 s (the event loop is never blocked), never green with
a dead or stuck loop, and ``tenantdb status --json`` exits and lists globex, naming acme's
damaged object on stderr when it cannot read it. No case fails stop (exit 70): none kills a
loop with an exception it does not expect (tests/test_fail_stop.py injects those).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from example_app import MIGRATIONS
from tenantdb.config import Secret, Settings
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.carried import decode_block, encode_block
from tenantdb.replication.segment import SEGMENT_MAX_BYTES
from tests.conftest import create_s3_bucket
from tests.replication.test_segment import raw_segment
from tests.support.s3_server import s3_client, s3_env
from tests.support.servers import ROOT, UvicornProcess

LOCK = "tenants/acme/lock.json"
APP = "tests.support.apps:starlette_app"
HEALTH_TIMEOUT = 2.0  # /healthz must answer within this, always
_SCRUBBED = ("AWS_", "BUCKET_NAME", "TENANTDB_", "FLY_", "TENANT_ID", "CUSTOMER_ID")


def clean_env(endpoint: str, bucket: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {
        **env,
        **s3_env(bucket, endpoint),
        "TENANTDB_LEASE_TTL": "3",
        "TENANTDB_FOLLOW_INTERVAL": "0.2",
        "TENANTDB_METRICS_PORT": "0",
        "TENANTDB_KILL_TIMEOUT": "5",
    }


@dataclass
class Bucket:
    """The test's view of the bucket: plain boto3 reads and unconditional writes."""

    endpoint: str
    name: str
    client: Any = field(init=False)

    def __post_init__(self) -> None:
        self.client = s3_client(self.endpoint)

    def get(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return body

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def lock(self) -> dict[str, Any]:
        lock: dict[str, Any] = json.loads(self.get(LOCK))
        return lock

    def keys(self, prefix: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return [o["Key"] for o in listed.get("Contents", [])]


class Machine:
    """A uvicorn process serving the counter app as one machine of ``tenant``."""

    def __init__(self, root: Path, env: dict[str, str], tenant: str, machine: str) -> None:
        self.name = machine
        self.server = UvicornProcess(
            APP,
            {
                **env,
                "TENANT_ID": tenant,
                "FLY_MACHINE_ID": machine,
                "TENANTDB_DATA_DIR": str(root / machine),
            },
            root / f"{machine}.log",
            inherit_environ=False,
        )

    def health(self) -> httpx.Response:
        """/healthz, which must answer within ``HEALTH_TIMEOUT`` (a blocked loop would not)."""
        try:
            return httpx.get(f"{self.server.url}/healthz", timeout=HEALTH_TIMEOUT)
        except httpx.TimeoutException:
            pytest.fail(f"{self.name}'s /healthz did not answer within 2 s:\n{self.log()}")

    def visit(self, tenant: str = "acme", timeout: float = 15) -> httpx.Response:
        return httpx.get(f"{self.server.url}/customers/{tenant}", timeout=timeout)

    def log(self) -> str:
        return self.server.log()

    def close(self) -> None:
        self.server.close()


def eventually(
    what: str, condition: Callable[[], bool], *machines: Machine, timeout: float = 20
) -> None:
    """Poll ``condition`` until true, checking every machine's /healthz answers meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        for machine in machines:
            if machine.server.proc.poll() is None:
                machine.health()
        if condition():
            return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {m.name}\n{m.log()[-6000:]}" for m in machines)
            pytest.fail(f"not within {timeout}s: {what}\n{logs}")
        time.sleep(0.1)


def settle(*machines: Machine, seconds: float = 1.5) -> None:
    """Let the standby's polls and the holder's renewals meet what was just placed."""
    until = time.monotonic() + seconds
    eventually("", lambda: time.monotonic() > until, *machines)


def tenantdb_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantdb.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def restored_count(env: dict[str, str], out: Path) -> int:
    """The counter in a fresh ``tenantdb restore acme`` of the bucket as it is now."""
    done = tenantdb_cli(env, "restore", "acme", "-o", str(out), "--force")
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(out) as db:
        (count,) = db.execute("SELECT count FROM counter").fetchone()
    return int(count)


def assert_status_lists_globex(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = tenantdb_cli(env, "status", "--json")
    assert "Traceback" not in done.stderr, done.stderr
    assert "globex" in [t["tenant"] for t in json.loads(done.stdout)], done.stdout
    return done


def count_of(answer: httpx.Response) -> int:
    assert answer.status_code == 200, answer.text
    return int(answer.json()["count"])


# ---------------------------------------------------------------------------------------
# The crafted objects. Each takes the bucket (and the lock as it stands) and returns the
# keys it placed.


def snapshot_key_with_a_15_digit_time(bucket: Bucket) -> list[str]:
    key = "tenants/acme/snapshots/00000001-00000001-000000000001-999999999999999-ab.sqlite3"
    bucket.put(key, b"")
    return [key]


def takeover_record_of_60000_brackets(bucket: Bucket) -> list[str]:
    key = f"tenants/acme/history/{bucket.lock()['generation'] + 1:08d}.json"
    bucket.put(key, b"[" * 60_000)
    return [key]


def takeover_record_with_a_huge_tail_and_a_far_segment(bucket: Bucket) -> list[str]:
    # Near the generations the next holders take: a planner stepping index by index to
    # 10**12 would block the loop; a record past the log must be refused.
    generation = bucket.lock()["generation"] + 2
    record = {
        "generation": generation,
        "owner": "\x1b]0;forged\x07",
        "region": "ams",
        "at": "2026-12-01T10:00:00.000+00:00",
        "tail": 10**12,
        "snapshot": None,
        "claim": "forged",
    }
    keys = [
        f"tenants/acme/history/{generation:08d}.json",
        f"tenants/acme/log/{generation:08d}/000999999999.seg",
    ]
    bucket.put(keys[0], json.dumps(record).encode())
    bucket.put(keys[1], b"")
    return keys


def rewrite_lock(bucket: Bucket, change: Callable[[dict[str, Any]], None]) -> None:
    lock = bucket.lock()
    change(lock)
    bucket.put(LOCK, json.dumps(lock).encode())


def carried(log: dict[str, Any]) -> list[bytes]:
    """The segments a lock.json's log carries (none: no block)."""
    block = log.get("carried")
    return list(decode_block(base64.b64decode(block), max_count=256) or []) if block else []


def inline_not_base64(bucket: Bucket) -> None:
    """The list of base64 segments locks carried before blocks, with an item that is not."""

    def change(lock: dict[str, Any]) -> None:
        lock["log"].pop("carried", None)
        lock["log"]["inline"] = ["é"]

    rewrite_lock(bucket, change)


def carried_block_not_zlib(bucket: Bucket) -> None:
    rewrite_lock(
        bucket, lambda lock: lock["log"].update(carried=base64.b64encode(b"x" * 99).decode())
    )


def carried_block_inflating_past_its_bound(bucket: Bucket) -> None:
    """A block of a few KiB that inflates to 64 MiB of zeros (a few frames long each)."""
    bomb = zlib.compress(bytes(64 << 20), 9)[: 24 * 1024 - 1]  # cut: inflating must stop first
    rewrite_lock(bucket, lambda lock: lock["log"].update(carried=base64.b64encode(bomb).decode()))


def tail_of_a_billion(bucket: Bucket) -> None:
    rewrite_lock(bucket, lambda lock: lock["log"].update(tail=10**9))


def free_form_updated_at(bucket: Bucket) -> None:
    rewrite_lock(bucket, lambda lock: lock["log"].update(updated_at="last tuesday"))


def escapes_in_owner_and_region(bucket: Bucket) -> None:
    rewrite_lock(
        bucket, lambda lock: lock.update(owner="\x1b[2J\x1b]0;pwned\x07", region="\x1b[31mams")
    )


def db_pages_bomb(lock: dict[str, Any], index: int) -> bytes:
    """A segment of no pages that claims 2**32-1 of them, changing nothing (prev_state ==
    state): it passes every check but the growth bound."""
    state = int(lock["log"]["state"], 16)
    return raw_segment(
        generation=lock["generation"],
        index=index,
        page_size=4096,
        db_pages=2**32 - 1,
        prev_state=state,
        state=state,
        pages=(),
        page_count=0,
    )


def db_pages_bomb_carried_inline(bucket: Bucket) -> list[str]:
    """Appended to lock.json's log, carried inline (the holder is fenced by the rewrite)."""
    lock = bucket.lock()
    log = lock["log"]
    index = log["tail"] + 1
    block = encode_block([*carried(log), db_pages_bomb(lock, index)])
    log.update(tail=index, carried=base64.b64encode(block).decode())
    bucket.put(LOCK, json.dumps(lock).encode())
    return [LOCK]


def db_pages_bomb_at_the_next_keys(bucket: Bucket) -> list[str]:
    """At every key the pack the holder uploads next can have (it starts at the oldest
    segment lock.json carries and holds at most 32)."""
    lock = bucket.lock()
    log = lock["log"]
    first = log["tail"] - len(carried(log)) + 1
    keys = []
    for last in range(first, first + 32):
        key = f"tenants/acme/log/{lock['generation']:08d}/{first:012d}-{last:012d}.pack"
        bucket.put(key, db_pages_bomb(lock, first))
        keys.append(key)
    return keys


KEEPS_SERVING = {
    "snapshot key with a 15-digit time": snapshot_key_with_a_15_digit_time,
    "takeover record of 60,000 [": takeover_record_of_60000_brackets,
    "takeover record with tail 10**12 and a far empty segment": (
        takeover_record_with_a_huge_tail_and_a_far_segment
    ),
    "a segment with page_count=0 and db_pages=2**32-1 carried inline by lock.json": (
        db_pages_bomb_carried_inline
    ),
}

DAMAGED_LOCKS = {
    'lock.json with "inline": ["é"]': inline_not_base64,
    "lock.json with a carried block that is not zlib": carried_block_not_zlib,
    "lock.json with a carried block inflating to 64 MiB": carried_block_inflating_past_its_bound,
    'lock.json with "tail": 10**9': tail_of_a_billion,
    "lock.json with a free-form updated_at": free_form_updated_at,
    "lock.json with escape sequences in owner and region": escapes_in_owner_and_region,
}


# ---------------------------------------------------------------------------------------
# Keep serving: one holder, one standby and globex meet every object in turn. (One test, not
# one per object: the cases share the machines, in order, and xdist_group does not hold them
# on one worker with pytest 9.)


@contextlib.contextmanager
def scenario(name: str) -> Iterator[None]:
    """Name the crafted object in any failure of the block."""
    try:
        yield
    except (AssertionError, pytest.fail.Exception) as exc:
        raise AssertionError(f"with {name}: {exc}") from exc


@dataclass
class Cluster:
    bucket: Bucket
    env: dict[str, str]
    holder: Machine
    standby: Machine
    globex: Machine
    root: Path
    placed: list[str] = field(default_factory=list)  # the keys of the cases so far


@contextlib.contextmanager
def cluster_of(endpoint: str, root: Path) -> Iterator[Cluster]:
    """A new bucket, a holder (m1) and a standby (m2) of acme, and globex (g1)."""
    name = create_s3_bucket(endpoint)
    env = clean_env(endpoint, name)
    machines: list[Machine] = []
    try:
        for tenant, machine_id in [("acme", "m1"), ("acme", "m2"), ("globex", "g1")]:
            machines.append(Machine(root, env, tenant, machine_id))
            machines[-1].server.wait_ready()
        holder, standby, globex = machines
        count_of(holder.visit())
        count_of(globex.visit("globex"))
        assert json.loads(Bucket(endpoint, name).get(LOCK))["owner"] == "m1"
        yield Cluster(Bucket(endpoint, name), env, holder, standby, globex, root)
    finally:
        for machine in machines:
            machine.close()


def assert_keeps_serving(cluster: Cluster) -> None:
    holder, standby = cluster.holder, cluster.standby
    tail = cluster.bucket.lock()["log"]["tail"]
    for _ in range(3):
        count = count_of(holder.visit())  # bucket durability: answered once shipped
    assert cluster.bucket.lock()["log"]["tail"] > tail, "nothing shipped since the object"
    for machine in (holder, standby, cluster.globex):
        health = machine.health()
        assert health.status_code == 200, (machine.name, health.text, machine.log()[-4000:])
    out = cluster.root / f"restored-{uuid.uuid4().hex}.sqlite3"
    assert restored_count(cluster.env, out) == count
    status = assert_status_lists_globex(cluster.env)
    if status.returncode != 0:  # acme's objects cannot all be read: which one, by name
        assert status.returncode == 1, status.stderr
        assert status.stderr.startswith("tenantdb: error: tenant acme: "), status.stderr
        assert any(key in status.stderr for key in cluster.placed), status.stderr
    assert holder.server.proc.poll() is None
    assert standby.server.proc.poll() is None


@pytest.mark.long
def test_the_holder_keeps_serving_past_each_object_then_the_standby_takes_over(
    s3_endpoint: str, tmp_path: Path
) -> None:
    """After the objects, the new holder's takeover, restore and garbage collection meet them
    all (its takeover record's key is one a crafted record took) and it serves all the same."""
    with cluster_of(s3_endpoint, tmp_path) as cluster:
        for crafted, place in KEEPS_SERVING.items():
            with scenario(crafted):
                cluster.placed.extend(place(cluster.bucket))
                settle(cluster.holder, cluster.standby)
                assert_keeps_serving(cluster)
        count = count_of(cluster.holder.visit())
        cluster.holder.server.stop()  # a deploy: SIGTERM, a final publish, lease released
        standby = cluster.standby
        eventually("the standby serves", lambda: standby.visit().status_code == 200, standby)
        assert count_of(standby.visit()) == count + 2
        assert standby.health().status_code == 200
        assert cluster.bucket.lock()["owner"] == "m2"
        out = tmp_path / "restored-after-takeover.sqlite3"
        assert restored_count(cluster.env, out) == count + 2
        assert_status_lists_globex(cluster.env)


# ---------------------------------------------------------------------------------------
# Refuse loudly and stay up: fresh machines for each case.


def seed_globex(endpoint: str, bucket: str, root: Path) -> None:
    """Tenant globex in the same bucket, written once by a machine of this process."""

    async def seed() -> None:
        env = s3_env(bucket, endpoint)
        settings = Settings(
            tenant="globex",
            machine_id="g1",
            data_dir=root / "g1",
            bucket_name=bucket,
            endpoint_url=endpoint,
            region=env["AWS_REGION"],
            access_key_id=env["AWS_ACCESS_KEY_ID"],
            secret_access_key=Secret(env["AWS_SECRET_ACCESS_KEY"]),
            lease_ttl=3,
            metrics_port=0,
        )
        async with TenantDB(settings, migrations=MIGRATIONS) as tdb, tdb.connection() as db:
            await db.execute("UPDATE counter SET count = count + 1")
            await db.commit()

    asyncio.run(seed())


@dataclass
class Pair:
    bucket: Bucket
    env: dict[str, str]
    holder: Machine
    standby: Machine
    root: Path


@contextlib.contextmanager
def fresh_pair(endpoint: str, root: Path, **env: str) -> Iterator[Pair]:
    """A new bucket with globex in it, and a holder (m1) and a standby (m2) of acme."""
    name = create_s3_bucket(endpoint)
    seed_globex(endpoint, name, root)
    env = {**clean_env(endpoint, name), **env}
    machines: list[Machine] = []
    try:
        for machine_id in ("m1", "m2"):  # one after the other: m1 takes the lease
            machines.append(Machine(root, env, "acme", machine_id))
            machines[-1].server.wait_ready()
        holder, standby = machines
        yield Pair(Bucket(endpoint, name), env, holder, standby, root)
    finally:
        for machine in machines:
            machine.close()


def assert_refused_until_repaired(pair: Pair, place: Callable[[Bucket], None]) -> None:
    holder, standby = pair.holder, pair.standby
    count_of(holder.visit())
    original = pair.bucket.get(LOCK)
    place(pair.bucket)
    # Its CAS cannot land on a lock it did not write: never a 200.
    assert holder.visit().status_code == 503
    reason = "the tenant's lock.json is damaged"
    eventually(
        "both machines' /healthz turn red",
        lambda: all(reason in m.health().text for m in (holder, standby)),
        holder,
        standby,
    )
    answer = holder.visit()
    assert answer.status_code == 503, answer.text
    assert answer.text == f"tenant acme is unavailable here: {reason}; retry shortly\n"
    assert answer.headers["retry-after"]
    assert f"{LOCK} is damaged" in holder.log()
    assert "Traceback" not in holder.log() + standby.log()
    time.sleep(1)  # and it stays so: up, red, reading lock.json again and again
    assert holder.health().status_code == 503
    assert holder.server.proc.poll() is None, holder.log()
    assert standby.server.proc.poll() is None, standby.log()
    status = assert_status_lists_globex(pair.env)
    assert status.returncode == 1
    assert f"{LOCK} is damaged" in status.stderr
    # Repaired by hand: the machine that held the lease takes it back and serves, with
    # every write it acknowledged.
    pair.bucket.put(LOCK, original)
    eventually("acme is served again", lambda: holder.visit().status_code == 200, holder)
    count = count_of(holder.visit())
    out = pair.root / f"restored-{uuid.uuid4().hex}.sqlite3"
    assert restored_count(pair.env, out) == count
    eventually(
        "both machines are green again",
        lambda: all(m.health().status_code == 200 for m in (holder, standby)),
        holder,
        standby,
    )


@pytest.mark.long
def test_a_damaged_lock_json_turns_both_machines_red_until_it_is_repaired(
    s3_endpoint: str, tmp_path: Path
) -> None:
    """The holder cannot renew past it: it steps down (no exit: a restart would meet the same
    lock.json, and a repair must find it ready), answers 503 saying why and is red, as is the
    standby, which cannot take over; repaired, the holder takes its lease back. Each damage
    in turn, on the same machines."""
    with fresh_pair(s3_endpoint, tmp_path) as pair:
        for crafted, place in DAMAGED_LOCKS.items():
            with scenario(crafted):
                assert_refused_until_repaired(pair, place)


@pytest.mark.long
def test_a_segment_bomb_at_the_holders_next_key_turns_it_red_naming_the_key(
    s3_endpoint: str, tmp_path: Path
) -> None:
    """The holder cannot upload its next pack past a foreign object (page_count=0,
    db_pages=2**32-1) at its key. Its commits stay durable, carried inline by lock.json, so
    writes are still answered and restores exact; but every shipping round fails, and past the
    durability timeout the health check says so (it once stayed green for good)."""
    with fresh_pair(s3_endpoint, tmp_path, TENANTDB_DURABILITY_TIMEOUT="2") as pair:
        holder, standby = pair.holder, pair.standby
        count_of(holder.visit())
        keys = db_pages_bomb_at_the_next_keys(pair.bucket)
        count_of(holder.visit())
        eventually(  # writes go on meanwhile, every one answered 200
            "the holder's /healthz turns red",
            lambda: (
                count_of(holder.visit()) > 0
                and "log shipping has been stuck" in holder.health().text
            ),
            holder,
            standby,
        )
        count = count_of(holder.visit())
        assert restored_count(pair.env, tmp_path / "restored.sqlite3") == count
        assert any(f"uploading {key} failed, retrying" in holder.log() for key in keys)
        assert "Traceback" not in holder.log()
        assert holder.server.proc.poll() is None
        assert standby.health().status_code == 200
        assert assert_status_lists_globex(pair.env).returncode == 0


@pytest.mark.long
def test_an_oversized_segment_named_by_lock_json_is_refused_by_restores_unread(
    s3_endpoint: str, tmp_path: Path
) -> None:
    """A published pack replaced by an object over SEGMENT_MAX_BYTES: the holder, which never
    reads it back, keeps serving and shipping; a restore refuses it by name, never older."""
    with fresh_pair(s3_endpoint, tmp_path) as pair:
        holder, standby, bucket = pair.holder, pair.standby, pair.bucket
        eventually(  # a pack is made every 32 writes
            "lock.json names a pack",
            lambda: count_of(holder.visit()) > 0 and bool(bucket.lock()["log"].get("packs")),
            holder,
            standby,
        )
        first, last, generation = bucket.lock()["log"]["packs"][0]
        key = f"tenants/acme/log/{generation:08d}/{first:012d}-{last:012d}.pack"
        bucket.put(key, b"\0" * (SEGMENT_MAX_BYTES + 1))
        tail = bucket.lock()["log"]["tail"]
        settle(holder, standby)
        count_of(holder.visit())
        assert bucket.lock()["log"]["tail"] > tail
        assert holder.health().status_code == 200
        assert standby.health().status_code == 200  # it followed past that index earlier
        verify = tenantdb_cli(pair.env, "verify", "acme")
        assert verify.returncode == 1, verify.stdout
        assert verify.stderr.startswith("tenantdb: error: "), verify.stderr
        assert key in verify.stderr
        assert "Traceback" not in verify.stderr
        status = assert_status_lists_globex(pair.env)
        assert status.returncode == 0, status.stderr  # it lists keys, it reads no segment
