"""EncryptedBucket: tenants round-trip sealed on both real backends, and nothing else opens.

Every scenario runs TenantDB (or a restore) on a real bucket (the local one, moto's S3
server) through the wrapper, and inspects the raw bucket underneath it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tenantdb.config import Settings
from tenantdb.crypto import MAGIC, MAX_KEY_NUMBER, Keyring, parse_keyring, wrap_data_key
from tenantdb.errors import (
    DataKeyError,
    DecryptionError,
    PreconditionFailedError,
    ReplicationError,
    TransientStorageError,
)
from tenantdb.fleet.create import create_tenant
from tenantdb.fleet.purge import purge_tenant
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.carried import decode_block
from tenantdb.replication.packs import decode_pack
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.segment import decode_segment, parse_chunk_key
from tenantdb.storage import LocalBucket, data_keys, open_bucket
from tenantdb.storage.base import Bucket
from tenantdb.storage.data_keys import (
    KEY_OBJECT_MAX,
    MAX_DATA_KEYS,
    Replaced,
    key_object_body,
    parse_key_object,
)
from tenantdb.storage.encrypted import EncryptedBucket
from tests.support.s3_server import s3_client
from tests.support.servers import MachineProcesses

KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()
KEYRING = parse_keyring(f"k1:{KEY}", variable="TENANTDB_ENCRYPTION_KEY")
PREFIX = "tenants/"
MARKER = "MARKER-7f3c1e5b-the-apps-secret"
MIGRATIONS = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"]


@dataclass
class Backend:
    raw: Bucket
    tmp: Path

    def encrypted(self, keyring: Keyring = KEYRING) -> EncryptedBucket:
        """A fresh wrapper (no cached key), as a new machine has."""
        return EncryptedBucket(self.raw, keyring, prefix=PREFIX)

    def tenantdb(
        self, machine: str, *, tenant: str = "acme", bucket: Bucket | None = None
    ) -> TenantDB:
        settings = Settings(
            tenant=tenant,
            machine_id=machine,
            data_dir=self.tmp / machine,
            local_bucket_dir=self.tmp / "unused",
            lease_ttl=3,
            checkpoint_interval=0,
        )
        return TenantDB(settings, migrations=MIGRATIONS, bucket=bucket or self.encrypted())


@pytest.fixture
def backend(bucket: Bucket, tmp_path: Path) -> Backend:
    return Backend(bucket, tmp_path)


@pytest.fixture
def local(local_bucket: Bucket, tmp_path: Path) -> Backend:
    return Backend(local_bucket, tmp_path)


async def write_notes(tdb: TenantDB, n: int, text: str = MARKER) -> None:
    async with tdb.connection() as db:
        await db.executemany(
            "INSERT INTO notes (body) VALUES (?)", [(f"{text} {i}",) for i in range(n)]
        )
        await db.commit()


async def count_notes(tdb: TenantDB) -> int:
    async with tdb.connection() as db, db.execute("SELECT count(*) FROM notes") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


def count_in_file(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM notes").fetchone()[0])


def readable(key: str, body: bytes) -> bool:
    """Whether ``body`` shows the marker: in its bytes, or in a segment's inflated pages."""
    if MARKER.encode() in body:
        return True
    if key.endswith(".seg"):
        try:
            segment = decode_segment(body, key=key)
        except ReplicationError:
            return False
        return any(MARKER.encode() in page for _, page in segment.pages)
    if (chunk := parse_chunk_key(key)) is not None and chunk.pack is not None:
        try:
            bodies = decode_pack(body, key=key, tenant="acme", first=chunk.first, last=chunk.last)
        except ReplicationError:
            return False
        return any(readable(f"{key}.seg", one) for one in bodies)
    if key.endswith("lock.json"):
        pointer = json.loads(body).get("log") or {}
        inline = [base64.b64decode(item) for item in pointer.get("inline", [])]
        if "carried" in pointer:  # a sealed block does not inflate
            inline = list(decode_block(base64.b64decode(pointer["carried"]), max_count=256) or [])
        return any(readable(f"{key}.seg", item) for item in inline)
    return False


async def readable_objects(raw: Bucket, tmp: Path) -> list[str]:
    """Every object of the raw bucket whose bytes show the marker (all of them are read)."""
    found = []
    objects = await raw.list("")
    assert objects
    for info in objects:
        dest = tmp / "scan"
        await raw.download_file(info.key, dest)
        if readable(info.key, dest.read_bytes()):
            found.append(info.key)
    return found


@pytest.fixture
def no_key_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for secret in (KEY, OTHER_KEY, bytes(range(32)).hex()):
        assert secret not in caplog.text


@pytest.mark.usefixtures("no_key_in_logs")
async def test_a_tenant_round_trips_sealed_and_no_object_shows_its_data(backend: Backend) -> None:
    async with backend.tenantdb("m1") as tdb:
        await write_notes(tdb, 50)
        await tdb.sync()
        record = tdb.lease.record
        assert record is not None
        assert record.log is not None
        assert record.log.inline
        # While lock.json carries the new segment inline: sealed there too.
        assert await readable_objects(backend.raw, backend.tmp) == []
        assert await tdb.checkpoint()  # a snapshot
        await write_notes(tdb, 5)
    keys = [info.key for info in await backend.raw.list(PREFIX)]
    assert "tenants/acme/key.json" in keys
    assert any(k.endswith(".sqlite3") for k in keys)
    assert any(k.endswith(".pack") for k in keys)  # the carried segments, packed
    assert await readable_objects(backend.raw, backend.tmp) == []
    for key in keys:
        if key.endswith((".seg", ".pack", ".sqlite3")):
            assert (await backend.raw.get(key)).body.startswith(MAGIC)
    async with backend.tenantdb("m2") as tdb:
        assert await count_notes(tdb) == 55


async def test_the_scan_finds_the_marker_when_nothing_is_encrypted(backend: Backend) -> None:
    """The control: the same scan on an unencrypted tenant finds the marker everywhere."""
    async with backend.tenantdb("m1", bucket=backend.raw) as tdb:
        await write_notes(tdb, 50)
        await tdb.sync()
        found = await readable_objects(backend.raw, backend.tmp)
        assert "tenants/acme/lock.json" in found
        assert await tdb.checkpoint()
    found = await readable_objects(backend.raw, backend.tmp)
    assert any(k.endswith(".sqlite3") for k in found)


async def test_a_point_in_time_restore_opens_sealed_history(local: Backend) -> None:
    async with local.tenantdb("m1") as tdb:
        await write_notes(tdb, 10)
        await tdb.sync()
        assert await tdb.checkpoint()
        await write_notes(tdb, 7)
        await tdb.sync()
        await asyncio.sleep(0.05)
        moment = datetime.now(UTC)
        await asyncio.sleep(0.05)
        await write_notes(tdb, 100)
        await tdb.sync()
    out = local.tmp / "restored.sqlite3"
    point = await restore_at(local.encrypted(), "acme", out, prefix=PREFIX, at=moment)
    assert count_in_file(out) == 17
    assert point.index >= 2
    now = await restore_at(local.encrypted(), "acme", out, prefix=PREFIX)
    assert count_in_file(out) == 117
    assert now.index >= point.index


async def sealed_tenants(backend: Backend) -> None:
    for tenant in ("acme", "other"):
        async with backend.tenantdb(f"m-{tenant}", tenant=tenant) as tdb:
            await write_notes(tdb, 3)
            await tdb.sync()
            await write_notes(tdb, 3)
            await tdb.sync()
            assert await tdb.checkpoint()


def segment(tenant: str, index: int) -> str:
    return f"{PREFIX}{tenant}/log/00000001/{index:012d}.seg"


async def pack(raw: Bucket, tenant: str) -> str:
    """The one pack of ``sealed_tenants``: the segments it carried, stored by its snapshot."""
    (key,) = [i.key for i in await raw.list(f"{PREFIX}{tenant}/log/") if i.key.endswith(".pack")]
    return key


@pytest.mark.parametrize("place", ["from-another-tenant", "to-another-key"])
async def test_an_object_moved_into_another_place_is_refused_naming_its_key(
    backend: Backend, place: str
) -> None:
    await sealed_tenants(backend)
    source = await pack(backend.raw, "acme")
    if place == "from-another-tenant":
        target = await pack(backend.raw, "other")
    else:  # a pack of another range of the same tenant
        target = source.replace("000000000001-", "000000000002-")
    moved = (await backend.raw.get(source)).body
    await backend.raw.put(target, moved)
    with pytest.raises(DecryptionError, match=f"{target} is refused") as raised:
        await backend.encrypted().get(target)
    assert raised.value.key == target


async def current_snapshot(bucket: Bucket, tenant: str) -> str:
    lock = json.loads((await bucket.get(f"{PREFIX}{tenant}/lock.json")).body)
    return str(lock["snapshot"]["key"])


async def test_a_snapshot_copied_over_another_tenants_stops_its_restore(backend: Backend) -> None:
    await sealed_tenants(backend)
    theirs, ours = (
        await current_snapshot(backend.raw, "acme"),
        await current_snapshot(backend.raw, "other"),
    )
    dest = backend.tmp / "copy"
    await backend.raw.download_file(theirs, dest)
    await backend.raw.delete(ours)
    await backend.raw.upload_file(ours, dest)
    with pytest.raises(DecryptionError, match=f"tenant other: {ours} is refused"):
        await restore_at(backend.encrypted(), "other", backend.tmp / "r.sqlite3", prefix=PREFIX)


async def test_a_key_object_copied_from_another_tenant_is_refused(backend: Backend) -> None:
    await sealed_tenants(backend)
    wrapped = json.loads((await backend.raw.get("tenants/acme/key.json")).body)
    wrapped["tenant"] = "other"  # else it says at once that it is acme's
    await backend.raw.put("tenants/other/key.json", json.dumps(wrapped).encode())
    with pytest.raises(DataKeyError, match=r"tenant other: its data key tenants/other/key\.json"):
        await backend.encrypted().get(await pack(backend.raw, "other"))


@pytest.mark.parametrize("position", [0, 40, -1])
async def test_a_flipped_byte_in_a_snapshot_stops_the_restore_naming_its_key(
    local: Backend, position: int
) -> None:
    async with local.tenantdb("m1") as tdb:
        await write_notes(tdb, 20)
        assert await tdb.checkpoint()
    snapshot = next(i.key for i in await local.raw.list(PREFIX) if i.key.endswith(".sqlite3"))
    body = bytearray((await local.raw.get(snapshot)).body)
    body[position] ^= 0x40
    await local.raw.put(snapshot, bytes(body))
    tdb = local.tenantdb("m2")
    with pytest.raises(DecryptionError, match=snapshot):
        await tdb.start(standby=False)


async def test_a_truncated_pack_is_refused_naming_its_key(local: Backend) -> None:
    await sealed_tenants(local)
    key = await pack(local.raw, "acme")
    await local.raw.put(key, (await local.raw.get(key)).body[:-5])
    with pytest.raises(DecryptionError, match=f"{key} is refused: .*truncated"):
        await local.encrypted().get(key)


@pytest.mark.usefixtures("no_key_in_logs")
async def test_a_wrong_key_fails_the_start_in_one_line_naming_tenant_and_key_id(
    local: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    async with local.tenantdb("m1") as tdb:
        await write_notes(tdb, 5)
    wrong = parse_keyring(f"k1:{OTHER_KEY}", variable="TENANTDB_ENCRYPTION_KEY")
    tdb = local.tenantdb("m2", bucket=local.encrypted(wrong))
    with pytest.raises(DataKeyError) as raised:
        await tdb.start(standby=False)
    message = str(raised.value)
    assert "tenant acme" in message
    assert "key id 'k1'" in message
    assert "\n" not in message
    assert raised.value.key_id == "k1"
    # A machine (standby allowed) keeps the lease, says why, and never serves an empty tenant.
    # (lock.json carrying sealed segments stops it before the lease is even taken).
    machine = local.tenantdb("m3", bucket=local.encrypted(wrong))
    try:
        await machine.start()
    except DataKeyError as exc:
        failure = str(exc)
    else:
        try:
            assert not machine.serving
            assert machine.problem is not None
            failure = machine.problem
        finally:
            await machine.stop()
    assert "key id 'k1'" in failure
    unknown = parse_keyring(f"k2:{KEY}", variable="TENANTDB_ENCRYPTION_KEY")
    with pytest.raises(DataKeyError, match="key id 'k1', which is not configured"):
        await local.tenantdb("m4", bucket=local.encrypted(unknown)).start(standby=False)


async def test_deleting_the_data_key_makes_the_whole_history_unreadable(backend: Backend) -> None:
    async with backend.tenantdb("m1") as tdb:
        await write_notes(tdb, 10)
        await tdb.sync()
        assert await tdb.checkpoint()
        await write_notes(tdb, 10)
    await backend.raw.delete("tenants/acme/key.json")
    with pytest.raises(DataKeyError, match=r"tenants/acme/key\.json does not exist") as raised:
        await restore_at(backend.encrypted(), "acme", backend.tmp / "r.sqlite3", prefix=PREFIX)
    assert raised.value.tenant == "acme"
    with pytest.raises(DataKeyError, match="history is unreadable"):
        await backend.tenantdb("m2").start(standby=False)
    # The failed start made no new key (nor an empty tenant), and nothing shows the data.
    keys = [info.key for info in await backend.raw.list(PREFIX)]
    assert "tenants/acme/key.json" not in keys
    assert await readable_objects(backend.raw, backend.tmp) == []


async def test_racing_creators_of_a_data_key_end_with_the_same_one(backend: Backend) -> None:
    first, second = backend.encrypted(), backend.encrypted()
    found = await asyncio.gather(
        *(b.keys.get("acme", create=True) for b in (first, second, first, second))
    )
    assert all(f is not None for f in found)
    key = segment("acme", 1)
    await first.put(key, b"a segment's bytes", if_none_match="*")
    assert (await second.get(key)).body == b"a segment's bytes"
    assert (await backend.encrypted().get(key)).body == b"a segment's bytes"


async def test_plaintext_from_before_encryption_stays_readable_and_later_plaintext_is_not(
    local: Backend,
) -> None:
    async with local.tenantdb("m1", bucket=local.raw) as tdb:
        await write_notes(tdb, 4)
    async with local.tenantdb("m2") as tdb:  # encryption turned on
        assert await count_notes(tdb) == 4
        await write_notes(tdb, 4)
        await tdb.sync()
    async with local.tenantdb("m3") as tdb:
        assert await count_notes(tdb) == 8
    forged = segment("acme", 99)
    await local.raw.put(forged, b"TDBSEG\r\n plaintext written after the key")
    with pytest.raises(DecryptionError, match=f"{forged} is not encrypted"):
        await local.encrypted().get(forged)


async def test_sizes_are_the_plaintexts_for_snapshots(local: Backend) -> None:
    async with local.tenantdb("m1") as tdb:
        await write_notes(tdb, 20)
        assert await tdb.checkpoint()
    encrypted = local.encrypted()
    (snapshot,) = [i for i in await encrypted.list(PREFIX) if i.key.endswith(".sqlite3")]
    raw = await local.raw.head(snapshot.key)
    assert raw.size > snapshot.size
    assert snapshot.size % 512 == 0
    assert (await encrypted.head(snapshot.key)).size == snapshot.size
    dest = local.tmp / "snap"
    info = await encrypted.download_file(snapshot.key, dest, max_size=snapshot.size)
    assert info.size == dest.stat().st_size == snapshot.size


def test_a_machine_with_the_wrong_key_says_which_and_never_serves_the_tenant(
    tmp_path: Path, s3_settings_env: dict[str, str]
) -> None:
    """Through the environment (TENANTDB_ENCRYPTION_KEY), real uvicorn machines, moto S3."""
    app = "tests.support.apps:starlette_app"
    env = {**s3_settings_env, "TENANTDB_LEASE_TTL": "3", "TENANTDB_ENCRYPTION_KEY": f"k1:{KEY}"}
    with MachineProcesses(tmp_path) as machines:
        good = machines.start(app, "m1", "acme", env)
        assert httpx.get(f"{good.url}/customers/acme", timeout=10).status_code == 200
        assert good.stop() in (0, -15)  # uvicorn re-raises the signal after its shutdown
        client = s3_client(env["AWS_ENDPOINT_URL_S3"])
        listed = client.list_objects_v2(Bucket=env["BUCKET_NAME"])["Contents"]
        assert "tenants/acme/key.json" in {item["Key"] for item in listed}
        wrong = {**env, "TENANTDB_ENCRYPTION_KEY": f"k1:{OTHER_KEY}"}
        bad = machines.start(app, "m2", "acme", wrong, ready=False)
        deadline = time.monotonic() + 30
        while "key id 'k1'" not in bad.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = bad.log()
        assert "tenant acme: its data key tenants/acme/key.json cannot be unwrapped" in log
        assert "Traceback" not in log
        for secret in (KEY, OTHER_KEY):
            assert secret not in log
        # With sealed segments inline in lock.json it fails its startup (exits non-zero);
        # else it holds the lease and answers 503 with the reason. Never 200.
        try:
            assert bad.proc.wait(timeout=10) != 0
        except subprocess.TimeoutExpired:
            assert httpx.get(f"{bad.url}/customers/acme", timeout=10).status_code == 503


async def test_settings_with_keys_open_every_bucket_sealed(tmp_path: Path) -> None:
    """The one seam: ``open_bucket`` wraps the bucket the settings name."""
    settings = Settings(
        tenant="acme",
        machine_id="m1",
        data_dir=tmp_path / "m1",
        local_bucket_dir=tmp_path / "bucket",
        lease_ttl=3,
        checkpoint_interval=0,
        encryption_keys=KEYRING,
    )
    assert isinstance(open_bucket(settings), EncryptedBucket)
    async with TenantDB(settings, migrations=MIGRATIONS) as tdb:
        await write_notes(tdb, 5)
        await tdb.sync()
        assert await tdb.checkpoint()
    async with LocalBucket(tmp_path / "bucket") as raw:
        keys = [i.key for i in await raw.list(PREFIX) if i.key.endswith((".pack", ".sqlite3"))]
        assert keys
        for key in keys:
            assert (await raw.get(key)).body.startswith(MAGIC)
    plain = dataclasses.replace(settings, encryption_keys=None)
    assert not isinstance(open_bucket(plain), EncryptedBucket)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "is damaged"),
        (b'{"format": 1, "tenant": "acme", "kek": "k1", "wrapped": "!!"}', "not base64"),
        (b"x" * 5000, "5000 bytes, not a key object"),
    ],
)
async def test_a_damaged_key_object_is_refused_naming_it(
    local: Backend, body: bytes, reason: str
) -> None:
    await sealed_tenants(local)
    await local.raw.put("tenants/acme/key.json", body)
    with pytest.raises(DataKeyError, match=reason) as raised:
        await local.encrypted().get(await pack(local.raw, "acme"))
    assert raised.value.key == "tenants/acme/key.json"


async def test_a_fork_of_a_sealed_tenant_is_sealed_under_its_own_key_and_equals_its_source(
    backend: Backend,
) -> None:
    async with backend.tenantdb("m1") as tdb:
        await write_notes(tdb, 20)
        assert await tdb.checkpoint()  # the fork copies this snapshot
        await write_notes(tdb, 3)
    await create_tenant(backend.encrypted(), "fork", prefix=PREFIX, lease_ttl=3, source="acme")
    keys = [info.key for info in await backend.raw.list(f"{PREFIX}fork/")]
    assert f"{PREFIX}fork/key.json" in keys
    assert any(k.endswith(".sqlite3") for k in keys)
    assert await readable_objects(backend.raw, backend.tmp) == []
    # Sealed for the fork: its data key, not the source's, opens the copied snapshot.
    async with backend.tenantdb("m2", tenant="fork") as tdb:
        assert await count_notes(tdb) == 23


async def test_a_purge_deletes_the_data_key_before_the_data_it_opens(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with backend.tenantdb("m1") as tdb:
        await write_notes(tdb, 10)
        assert await tdb.checkpoint()
    bucket = backend.encrypted()

    async def cut(keys: object) -> None:
        raise OSError("the purge is cut short before its first batch")

    # Interrupted at its first batch of data: the key is already gone, the data unreadable.
    monkeypatch.setattr(backend.raw, "delete_many", cut)
    with pytest.raises(OSError, match="cut short"):
        await purge_tenant(bucket, "acme", prefix=PREFIX)
    keys = [info.key for info in await backend.raw.list(f"{PREFIX}acme/")]
    assert "tenants/acme/key.json" not in keys
    assert any(k.endswith(".sqlite3") for k in keys)
    with pytest.raises(DataKeyError, match=r"tenants/acme/key\.json does not exist"):
        await restore_at(backend.encrypted(), "acme", backend.tmp / "r.sqlite3", prefix=PREFIX)
    monkeypatch.undo()
    receipt = await purge_tenant(backend.encrypted(), "acme", prefix=PREFIX)
    assert (receipt.resumed, receipt.key_erased) == (True, False)
    assert await backend.raw.list(f"{PREFIX}acme/") == []


async def test_a_purge_receipt_says_the_data_key_went_first(backend: Backend) -> None:
    async with backend.tenantdb("m1") as tdb:
        await write_notes(tdb, 3)
    receipt = await purge_tenant(backend.encrypted(), "acme", prefix=PREFIX)
    assert receipt.key_erased
    assert await backend.raw.list(f"{PREFIX}acme/") == []


# --- replacing a tenant's data key: the newest seals, every one opens ---


def key_number(body: bytes) -> int:
    """The data key number a sealed object's header names."""
    assert body.startswith(MAGIC)
    return int.from_bytes(body[10:14], "big")


async def numbers(raw: Bucket, tenant: str = "acme") -> dict[str, int]:
    """The data key number of each sealed log object and snapshot of ``tenant``."""
    found = {}
    for info in await raw.list(f"{PREFIX}{tenant}/"):
        if "/log/" in info.key or info.key.endswith(".sqlite3"):
            found[info.key] = key_number((await raw.get(info.key)).body)
    return found


async def newest_carried(raw: Bucket) -> int:
    """The data key number of the block of segments acme's lock.json carries."""
    lock = json.loads((await raw.get(f"{PREFIX}acme/lock.json")).body)
    return key_number(base64.b64decode(lock["log"]["carried"]))


async def test_a_replaced_data_key_seals_what_follows_and_the_older_one_still_opens(
    backend: Backend,
) -> None:
    async with backend.tenantdb("m1") as tdb:
        await write_notes(tdb, 3)
        assert await tdb.checkpoint()
        await write_notes(tdb, 2)
        await tdb.sync()
    before = await numbers(backend.raw)
    assert set(before.values()) == {1}
    assert await backend.encrypted().keys.replace("acme") == Replaced(1, 2, added=True)
    stored = json.loads((await backend.raw.get("tenants/acme/key.json")).body)
    assert (stored["format"], [k["number"] for k in stored["keys"]]) == (2, [1, 2])
    async with backend.tenantdb("m2") as tdb:  # restores history sealed with data key 1
        assert await count_notes(tdb) == 5
        await write_notes(tdb, 4)
        await tdb.sync()
        assert await tdb.checkpoint()
    after = await numbers(backend.raw)
    assert {k: n for k, n in after.items() if k in before} == before
    assert {n for k, n in after.items() if k not in before} == {2}
    restored = backend.tmp / "restored.sqlite3"
    await restore_at(backend.encrypted(), "acme", restored, prefix=PREFIX)
    assert count_in_file(restored) == 9


async def test_a_holder_that_cached_the_old_key_switches_at_its_next_snapshot(
    local: Backend, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with local.tenantdb("m1") as tdb:
        await write_notes(tdb, 2)
        await tdb.sync()
        await local.encrypted().keys.replace("acme")  # an operator, elsewhere
        await write_notes(tdb, 2)
        await tdb.sync()  # never fails: the key it has stays valid
        assert await newest_carried(local.raw) == 1

        async def unreachable(*args: object, **kwargs: object) -> None:
            raise TransientStorageError("the bucket did not answer", key="tenants/acme/key.json")

        # Its check for a new key fails: the snapshot is sealed with the key it has.
        monkeypatch.setattr(local.raw, "get_if_changed", unreachable)
        with caplog.at_level(logging.WARNING, logger="tenantdb"):
            assert await tdb.checkpoint()
        assert "sealing with data key 1 still" in caplog.text
        monkeypatch.undo()
        assert set((await numbers(local.raw)).values()) == {1}
        await write_notes(tdb, 1)
        assert await tdb.checkpoint()  # the next snapshot picks data key 2 up
        snapshot = await current_snapshot(local.raw, "acme")
        assert key_number((await local.raw.get(snapshot)).body) == 2
        await write_notes(tdb, 2)
        await tdb.sync()
        assert await newest_carried(local.raw) == 2
    restored = local.tmp / "restored.sqlite3"
    await restore_at(local.encrypted(), "acme", restored, prefix=PREFIX)
    assert count_in_file(restored) == 7


async def test_a_writing_holder_picks_up_a_replaced_key_once_its_recheck_interval_passed(
    local: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_keys, "_RECHECK_SECONDS", 0.5)
    holder = local.encrypted()
    async with local.tenantdb("m1", bucket=holder) as tdb:
        await write_notes(tdb, 1)
        await tdb.sync()
        await local.encrypted().keys.replace("acme")
        await asyncio.sleep(0.6)
        await write_notes(tdb, 1)
        await tdb.sync()
        # lock.json's inline segments never wait for a check (a commit, a renewal).
        assert await newest_carried(local.raw) == 1
        # The holder's next log object, the interval passed: checked, sealed with key 2.
        log_object = f"{PREFIX}acme/log/00000009/000000000001.seg"
        await holder.put(log_object, b"x", if_none_match="*")
        assert key_number((await local.raw.get(log_object)).body) == 2
        await local.raw.delete(log_object)
        await write_notes(tdb, 1)
        await tdb.sync()  # no snapshot: the interval alone
        assert await newest_carried(local.raw) == 2
        assert not [k for k in await numbers(local.raw) if "/snapshots/" in k]
    restored = local.tmp / "restored.sqlite3"
    await restore_at(local.encrypted(), "acme", restored, prefix=PREFIX)
    assert count_in_file(restored) == 3


async def test_a_reader_that_cached_the_old_key_opens_what_the_new_one_sealed(
    backend: Backend,
) -> None:
    writer, reader = backend.encrypted(), backend.encrypted()
    first, second = (f"{PREFIX}acme/log/00000009/{i:012d}.seg" for i in (1, 2))
    await writer.put(first, b"sealed with data key 1")
    assert (await reader.get(first)).body == b"sealed with data key 1"  # key 1 cached
    await writer.keys.replace("acme")
    await writer.put(second, b"sealed with data key 2")
    assert key_number((await backend.raw.get(second)).body) == 2
    assert (await reader.get(second)).body == b"sealed with data key 2"
    assert (await reader.get(first)).body == b"sealed with data key 1"


class _Gated:
    """``raw`` whose writes of key objects wait until ``parties`` writers reached them: each
    has read the same key object before any writes it."""

    def __init__(self, raw: Bucket, parties: int) -> None:
        self.raw = raw
        self.barrier = asyncio.Barrier(parties)

    def __getattr__(self, name: str) -> object:
        return getattr(self.raw, name)

    async def put(self, key: str, body: bytes, **conditions: object) -> object:
        if key.endswith("/key.json"):
            await self.barrier.wait()
        return await self.raw.put(key, body, **conditions)  # type: ignore[arg-type]


async def test_two_operators_replacing_at_once_add_one_key_between_them(backend: Backend) -> None:
    await backend.encrypted().put(segment("acme", 1), b"x")  # the tenant's data key 1
    gated = _Gated(backend.raw, 2)
    first, second = (EncryptedBucket(gated, KEYRING, prefix=PREFIX) for _ in range(2))  # type: ignore[arg-type]
    outcomes = await asyncio.gather(first.keys.replace("acme"), second.keys.replace("acme"))
    assert sorted(outcomes, key=lambda r: r.added) == [
        Replaced(1, 2, added=False),
        Replaced(1, 2, added=True),
    ]
    stored = json.loads((await backend.raw.get("tenants/acme/key.json")).body)
    assert [k["number"] for k in stored["keys"]] == [1, 2]


class _Unheard:
    """``raw`` whose first write of a key object lands, then answers 412: what the bucket's
    own retry of that write sees when the first answer was lost."""

    def __init__(self, raw: Bucket) -> None:
        self.raw = raw
        self.lost = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.raw, name)

    async def put(self, key: str, body: bytes, **conditions: object) -> object:
        landed = await self.raw.put(key, body, **conditions)  # type: ignore[arg-type]
        if key.endswith("/key.json") and not self.lost:
            self.lost += 1
            raise PreconditionFailedError("retried after a lost answer", key=key)
        return landed


async def test_a_replacement_whose_write_landed_unheard_adds_no_second_key(
    backend: Backend,
) -> None:
    await backend.encrypted().put(segment("acme", 1), b"x")
    unheard = _Unheard(backend.raw)
    bucket = EncryptedBucket(unheard, KEYRING, prefix=PREFIX)  # type: ignore[arg-type]
    assert await bucket.keys.replace("acme") == Replaced(1, 2, added=False)
    assert unheard.lost == 1
    stored = json.loads((await backend.raw.get("tenants/acme/key.json")).body)
    assert [k["number"] for k in stored["keys"]] == [1, 2]
    await bucket.put(segment("acme", 2), b"y")
    assert key_number((await backend.raw.get(segment("acme", 2))).body) == 2


async def test_a_key_object_replayed_or_renumbered_by_a_bucket_writer_is_refused(
    local: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = local.encrypted()
    await bucket.put(segment("acme", 1), b"one")
    older = (await local.raw.get("tenants/acme/key.json")).body
    await bucket.keys.replace("acme")
    await bucket.put(segment("acme", 2), b"two")
    newer = (await local.raw.get("tenants/acme/key.json")).body
    # Replayed: the key object from before the replacement.
    await local.raw.put("tenants/acme/key.json", older)
    with pytest.raises(DecryptionError, match="sealed with data key 2, which") as raised:
        await local.encrypted().get(segment("acme", 2))
    assert "does not hold (it holds 1)" in str(raised.value)
    assert (await local.encrypted().get(segment("acme", 1))).body == b"one"
    # A machine that knew data key 2 keeps sealing with it (keys are only ever added).
    with caplog.at_level(logging.WARNING, logger="tenantdb"):
        assert (await bucket.keys.sealing("acme", check="now")).number == 2
    assert "holds no data key 2 any more" in caplog.text
    # Renumbered: data key 2 claims to be 3 (its number is bound into its wrapping).
    renumbered = json.loads(newer)
    renumbered["keys"][1]["number"] = 3
    await local.raw.put("tenants/acme/key.json", json.dumps(renumbered).encode())
    with pytest.raises(DataKeyError, match=r"key\.json \(data key 3\) cannot be unwrapped"):
        await local.encrypted().get(segment("acme", 1))


async def test_a_purge_after_a_replacement_erases_every_data_key_first(
    local: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = local.encrypted()
    await bucket.put(segment("acme", 1), b"one")
    await bucket.keys.replace("acme")
    await bucket.put(segment("acme", 2), b"two")

    async def cut(keys: object) -> None:
        raise OSError("the purge is cut short before its first batch")

    monkeypatch.setattr(local.raw, "delete_many", cut)
    with pytest.raises(OSError, match="cut short"):
        await purge_tenant(local.encrypted(), "acme", prefix=PREFIX)
    for index in (1, 2):
        with pytest.raises(DataKeyError, match=r"tenants/acme/key\.json does not exist"):
            await local.encrypted().get(segment("acme", index))


async def test_replacing_needs_a_data_key_and_stops_at_the_most_a_key_object_holds(
    local: Backend,
) -> None:
    bucket = local.encrypted()
    with pytest.raises(DataKeyError, match=r"no data key tenants/acme/key\.json yet"):
        await bucket.keys.replace("acme")
    await bucket.put(segment("acme", 1), b"one")
    for number in range(2, MAX_DATA_KEYS + 1):
        assert (await bucket.keys.replace("acme")).new == number
    assert len((await local.raw.get("tenants/acme/key.json")).body) <= KEY_OBJECT_MAX
    with pytest.raises(DataKeyError, match=f"already holds {MAX_DATA_KEYS} data keys"):
        await bucket.keys.replace("acme")
    assert (await local.encrypted().get(segment("acme", 1))).body == b"one"


def test_the_largest_key_object_fits_its_size_limit() -> None:
    keyring = parse_keyring(f"{'k' * 32}:{KEY}", variable="TENANTDB_ENCRYPTION_KEY")
    since = datetime.now(UTC).isoformat()
    tenant = "t" * 63  # the longest tenant id
    key = f"tenants/{tenant}/key.json"
    keys = [
        wrap_data_key(keyring, tenant, key, number=n, since=since)[1]
        for n in range(MAX_KEY_NUMBER - MAX_DATA_KEYS + 1, MAX_KEY_NUMBER + 1)
    ]
    body = key_object_body(tenant, keys)
    assert len(body) <= KEY_OBJECT_MAX
    assert parse_key_object(body, tenant=tenant, key=key) == tuple(keys)
    too_many = json.loads(body)
    too_many["keys"].append(too_many["keys"][-1])
    with pytest.raises(DataKeyError, match=f"not a list of 1 to {MAX_DATA_KEYS} data keys"):
        parse_key_object(json.dumps(too_many).encode(), tenant=tenant, key=key)
