"""`tenantdb keys rotate`, and every verb's one-line answer to a wrong or missing key."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tenantdb.cli.main import main
from tenantdb.config import Secret, Settings
from tenantdb.crypto import MAGIC, parse_keyring
from tenantdb.machine.database import TenantDB
from tenantdb.storage import Bucket, LocalBucket
from tenantdb.storage.encrypted import EncryptedBucket
from tenantdb.storage.s3 import S3Bucket
from tests.conftest import create_s3_bucket
from tests.support.s3_server import (
    DUMMY_ACCESS_KEY_ID,
    DUMMY_REGION,
    DUMMY_SECRET_ACCESS_KEY,
    s3_env,
)

pytestmark = pytest.mark.usefixtures("clean_environment")

OLD = base64.b64encode(bytes(range(32))).decode()
NEW = base64.b64encode(bytes(range(50, 82))).decode()
MIGRATIONS = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"]


def encrypted_tenant(tmp_path: Path, raw: Bucket, tenant: str = "acme") -> None:
    """Write 7 rows in ``tenant``, sealed under key id "old" (in a loop of its own)."""
    asyncio.run(_encrypted_tenant(tmp_path, raw, tenant))


async def _encrypted_tenant(tmp_path: Path, raw: Bucket, tenant: str) -> None:
    keyring = parse_keyring(f"old:{OLD}", variable="TENANTDB_ENCRYPTION_KEY")
    settings = Settings(
        tenant=tenant, machine_id="m1", data_dir=tmp_path / tenant, lease_ttl=3,
        checkpoint_interval=0,
    )  # fmt: skip
    bucket = EncryptedBucket(raw, keyring, prefix="tenants/")
    async with bucket, TenantDB(settings, migrations=MIGRATIONS, bucket=bucket) as tdb:
        async with tdb.connection() as db:
            await db.executemany("INSERT INTO notes (body) VALUES ('x')", [()] * 7)
            await db.commit()
        await tdb.sync()


def local(tmp_path: Path) -> Bucket:
    return LocalBucket(tmp_path / "local-bucket")


def s3(endpoint: str, name: str) -> Bucket:
    return S3Bucket(
        name,
        endpoint_url=endpoint,
        region=DUMMY_REGION,
        access_key_id=DUMMY_ACCESS_KEY_ID,
        secret_access_key=Secret(DUMMY_SECRET_ACCESS_KEY),
    )


def rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM notes").fetchone()[0])


def no_secrets(text: str) -> None:
    for secret in (OLD, NEW):
        assert secret not in text
    assert "Traceback" not in text


def test_a_restore_with_a_wrong_key_is_one_line_naming_tenant_and_key_id(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    encrypted_tenant(tmp_path, local(tmp_path))
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{NEW}")
    dest = tmp_path / "out.sqlite3"
    assert main(["restore", "acme", "-o", str(dest)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert error.startswith("tenantdb: error: tenant acme: its data key tenants/acme/key.json")
    assert "key id 'old'" in error
    no_secrets(error)
    assert not dest.exists()
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    assert main(["restore", "acme", "-o", str(dest)]) == 0
    assert rows(dest) == 7


def test_keys_rotate_rewraps_every_data_key_resumably_and_the_old_key_can_go(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    encrypted_tenant(tmp_path, local(tmp_path), "acme")
    encrypted_tenant(tmp_path, local(tmp_path), "bravo")
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"new:{NEW}")
    dest = tmp_path / "out.sqlite3"
    assert main(["restore", "acme", "-o", str(dest)]) == 1  # not rotated yet
    assert "key id 'old', which is not configured" in capsys.readouterr().err
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"new:{NEW},old:{OLD}")
    assert main(["keys", "rotate", "acme"]) == 0
    assert "1 re-wrapped, 0 already" in capsys.readouterr().out
    assert main(["keys", "rotate"]) == 0  # resumed: acme is done already
    captured = capsys.readouterr()
    assert "1 re-wrapped, 1 already under key id 'new'" in captured.out
    no_secrets(captured.out + captured.err)
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"new:{NEW}")
    for tenant in ("acme", "bravo"):
        assert main(["restore", tenant, "-o", str(dest), "--force"]) == 0
        assert rows(dest) == 7


def test_keys_rotate_without_encryption_says_how_to_turn_it_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    assert main(["keys", "rotate"]) == 1
    assert "encryption is off: set TENANTDB_ENCRYPTION_KEY" in capsys.readouterr().err


def test_the_doctor_names_the_tenant_and_key_id_a_wrong_key_cannot_open(
    tmp_path: Path,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket_name = create_s3_bucket(s3_endpoint)
    encrypted_tenant(tmp_path, s3(s3_endpoint, bucket_name))
    for name, value in s3_env(bucket_name, s3_endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{NEW}")
    assert main(["doctor"]) == 1
    output = capsys.readouterr().out
    (line,) = [line for line in output.splitlines() if "encryption:" in line]
    assert line.startswith("FAIL  encryption: tenant acme: its data key tenants/acme/key.json")
    assert "key id 'old'" in line
    no_secrets(output)
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"new:{NEW},old:{OLD}")
    main(["doctor"])
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "encryption:" in ln]
    assert line.startswith("warn  encryption: key id 'new' wraps")
    assert "tenantdb keys rotate" in line


# --- turning encryption on for existing tenants: status counts plaintext, keys seal ---


async def _plaintext_tenant(tmp_path: Path, raw: Bucket) -> None:
    """acme written before encryption: a snapshot of 5 rows, then segments with 2 more."""
    settings = Settings(
        tenant="acme", machine_id="m0", data_dir=tmp_path / "plain", lease_ttl=3,
        checkpoint_interval=0,
    )  # fmt: skip
    async with raw, TenantDB(settings, migrations=MIGRATIONS, bucket=raw) as tdb:
        async with tdb.connection() as db:
            await db.executemany("INSERT INTO notes (body) VALUES ('x')", [()] * 5)
            await db.commit()
        assert await tdb.checkpoint()
        for _ in range(2):
            async with tdb.connection() as db:
                await db.execute("INSERT INTO notes (body) VALUES ('y')")
                await db.commit()
            await tdb.sync()


def bucket_env(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Bucket:
    """A raw bucket of ``kind``, and the environment that names it for the CLI."""
    if kind == "local":
        monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
        return local(tmp_path)
    endpoint = request.getfixturevalue("s3_endpoint")
    name = create_s3_bucket(endpoint)
    for variable, value in s3_env(name, endpoint).items():
        monkeypatch.setenv(variable, value)
    return s3(endpoint, name)


def status_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["status", "--json", "acme"]) == 0
    (status,) = json.loads(capsys.readouterr().out)
    assert isinstance(status, dict)
    return status


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_status_shows_plaintext_history_until_keys_seal_publishes_a_sealed_snapshot(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw = bucket_env(kind, tmp_path, request, monkeypatch)
    asyncio.run(_plaintext_tenant(tmp_path, raw))
    assert status_json(capsys)["encryption"] is None  # encryption off: nothing to say
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    before = status_json(capsys)
    old_snapshot = before["snapshot"]["key"]
    plaintext = before["encryption"]["plaintext"]
    assert before["encryption"]["data_key"] is False
    assert old_snapshot in plaintext
    # Both segments after it, carried in lock.json (no pack is due for two).
    assert len([k for k in plaintext if "(inline segment" in k]) == 2
    assert main(["status"]) == 0
    table = capsys.readouterr().out
    assert "PLAINTEXT" in table.splitlines()[0]
    assert f"{len(plaintext)} objects (no data key)" in table

    assert main(["keys", "seal", "acme"]) == 0
    captured = capsys.readouterr()
    assert "tenant acme: sealed snapshot tenants/acme/snapshots/" in captured.out
    assert "until retention removes them" in captured.err
    no_secrets(captured.out + captured.err)
    after = status_json(capsys)
    assert after["encryption"] == {"data_key": True, "plaintext": []}
    new_snapshot = after["snapshot"]["key"]
    assert new_snapshot != old_snapshot
    assert after["lease"] == "released"
    sealed = asyncio.run(_stored(raw, new_snapshot))
    assert sealed.startswith(MAGIC)
    assert asyncio.run(_stored(raw, old_snapshot)).startswith(b"SQLite format 3\0")
    # The same state, sealed: the schema lock.json recorded stays known.
    schema = json.loads(asyncio.run(_stored(raw, "tenants/acme/lock.json")))["schema"]
    assert schema is not None
    assert schema["version"] >= 1
    assert main(["status"]) == 0
    assert "none" in capsys.readouterr().out.splitlines()[1].split()
    dest = tmp_path / "out.sqlite3"
    assert main(["restore", "acme", "-o", str(dest)]) == 0
    assert rows(dest) == 7


async def _stored(raw: Bucket, key: str) -> bytes:
    async with raw:
        return (await raw.get(key)).body


def test_status_counts_only_the_plaintext_left_once_an_encrypted_machine_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = local(tmp_path)
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    asyncio.run(_plaintext_tenant(tmp_path, raw))
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    plain = status_json(capsys)["encryption"]["plaintext"]
    time.sleep(1.1)  # the next objects in a later second than the plaintext ones
    encrypted_tenant(tmp_path, raw)  # the same tenant, 7 more rows, sealed
    status = status_json(capsys)
    assert status["encryption"]["data_key"] is True
    left = status["encryption"]["plaintext"]
    assert left
    # The old base and its segments stay; lock.json's inline copies were sealed anew.
    assert left == [k for k in plain if "inline" not in k]
    snapshot = status["snapshot"]["key"]
    assert not asyncio.run(_stored(raw, snapshot)).startswith(MAGIC)
    # The newest segments ride in lock.json, sealed there.
    lock = json.loads(asyncio.run(_stored(raw, "tenants/acme/lock.json")))
    assert base64.b64decode(lock["log"]["carried"]).startswith(MAGIC)
    assert not [k for k in left if "inline" in k]


async def _held_then_seal(tmp_path: Path, raw: Bucket) -> tuple[int, str, str]:
    keyring = parse_keyring(f"old:{OLD}", variable="TENANTDB_ENCRYPTION_KEY")
    settings = Settings(
        tenant="acme", machine_id="m-holder", data_dir=tmp_path / "holder", lease_ttl=5,
        checkpoint_interval=0,
    )  # fmt: skip
    bucket = EncryptedBucket(raw, keyring, prefix="tenants/")
    async with bucket, TenantDB(settings, migrations=MIGRATIONS, bucket=bucket) as tdb:
        before = await _stored(LocalBucket(tmp_path / "local-bucket"), "tenants/acme/lock.json")
        code = await asyncio.to_thread(main, ["keys", "seal", "acme"])
        after = await _stored(LocalBucket(tmp_path / "local-bucket"), "tenants/acme/lock.json")
        assert tdb.serving
    return code, json.loads(before)["snapshot"]["key"], json.loads(after)["snapshot"]["key"]


def test_keys_seal_is_refused_while_a_machine_holds_the_lease_and_says_how_to_force_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = local(tmp_path)
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    asyncio.run(_plaintext_tenant(tmp_path, raw))
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    code, before, after = asyncio.run(_held_then_seal(tmp_path, raw))
    assert code == 1
    error = capsys.readouterr().err
    assert "tenant acme: not sealed: machine m-holder holds the lease" in error
    assert "TENANTDB_CHECKPOINT_INTERVAL" in error
    assert "restart" in error
    assert after == before  # nothing published


def test_keys_seal_without_encryption_or_of_an_unknown_tenant_fails_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = local(tmp_path)
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    asyncio.run(_plaintext_tenant(tmp_path, raw))
    assert main(["keys", "seal", "acme"]) == 1
    assert "encryption is off: set TENANTDB_ENCRYPTION_KEY" in capsys.readouterr().err
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    assert main(["keys", "seal", "nobody"]) == 1
    assert "tenant nobody: not sealed: no such tenant" in capsys.readouterr().err
    assert not asyncio.run(_listed(raw, "tenants/nobody/"))


async def _listed(raw: Bucket, prefix: str) -> list[str]:
    async with raw:
        return [info.key for info in await raw.list(prefix)]


# --- replacing a tenant's data key: keys rotate --data [--reseal] ---


def key_numbers(raw: Bucket) -> tuple[list[int], list[str]]:
    """The data key numbers acme's key object holds, and the KEK ids wrapping them."""
    stored = json.loads(asyncio.run(_stored(raw, "tenants/acme/key.json")))
    keys = stored.get("keys") or [{"number": 1, "kek": stored["kek"]}]
    return [k["number"] for k in keys], [k["kek"] for k in keys]


def sealed_with(raw: Bucket, key: str) -> int:
    body = asyncio.run(_stored(raw, key))
    assert body.startswith(MAGIC)
    return int.from_bytes(body[10:14], "big")


def carried_with(raw: Bucket) -> set[int]:
    """The data key number of the block of segments acme's lock.json carries."""
    lock = json.loads(asyncio.run(_stored(raw, "tenants/acme/lock.json")))
    return {int.from_bytes(base64.b64decode(lock["log"]["carried"])[10:14], "big")}


def test_keys_rotate_data_adds_a_key_and_reseal_publishes_the_tenant_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = local(tmp_path)
    encrypted_tenant(tmp_path, raw)
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    assert status_json(capsys)["snapshot"] is None  # its history: segments only
    assert carried_with(raw) == {1}
    assert main(["keys", "rotate", "--data", "acme"]) == 0
    captured = capsys.readouterr()
    assert "tenant acme: data key 2 added (replacing data key 1)" in captured.out
    assert "until retention removes it" in captured.err
    no_secrets(captured.out + captured.err)
    assert key_numbers(raw) == ([1, 2], ["old", "old"])
    assert status_json(capsys)["snapshot"] is None  # nothing republished
    assert carried_with(raw) == {1}

    assert main(["keys", "rotate", "--data", "--reseal", "acme"]) == 0
    captured = capsys.readouterr()
    assert "tenant acme: data key 3 added (replacing data key 2)" in captured.out
    assert "tenant acme: resealed snapshot tenants/acme/snapshots/" in captured.out
    after = status_json(capsys)
    assert after["lease"] == "released"
    assert sealed_with(raw, after["snapshot"]["key"]) == 3
    dest = tmp_path / "out.sqlite3"
    assert main(["restore", "acme", "-o", str(dest)]) == 0
    assert rows(dest) == 7


def test_keys_rotate_rewraps_every_data_key_of_a_replaced_tenant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = local(tmp_path)
    encrypted_tenant(tmp_path, raw)
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    assert main(["keys", "rotate", "--data", "acme"]) == 0
    encrypted_tenant(tmp_path, raw)  # 7 more rows: a new snapshot and segments, key 2
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"new:{NEW},old:{OLD}")
    assert main(["keys", "rotate"]) == 0
    assert "1 re-wrapped" in capsys.readouterr().out
    assert key_numbers(raw) == ([1, 2], ["new", "new"])
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"new:{NEW}")
    dest = tmp_path / "out.sqlite3"
    assert main(["restore", "acme", "-o", str(dest)]) == 0
    assert rows(dest) == 14


async def _held_then_reseal(tmp_path: Path, raw: Bucket) -> int:
    keyring = parse_keyring(f"old:{OLD}", variable="TENANTDB_ENCRYPTION_KEY")
    settings = Settings(
        tenant="acme", machine_id="m-holder", data_dir=tmp_path / "holder", lease_ttl=5,
        checkpoint_interval=0,
    )  # fmt: skip
    bucket = EncryptedBucket(raw, keyring, prefix="tenants/")
    async with bucket, TenantDB(settings, migrations=MIGRATIONS, bucket=bucket) as tdb:
        code = await asyncio.to_thread(main, ["keys", "rotate", "--data", "--reseal", "acme"])
        async with tdb.connection() as db:
            await db.execute("INSERT INTO notes (body) VALUES ('after')")
            await db.commit()
        assert await tdb.checkpoint()  # the holder's next snapshot: the new key
        assert tdb.serving
    return code


def test_keys_rotate_data_reseal_is_refused_while_a_machine_holds_the_tenant_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = local(tmp_path)
    encrypted_tenant(tmp_path, raw)
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    assert asyncio.run(_held_then_reseal(tmp_path, raw)) == 1
    captured = capsys.readouterr()
    assert "tenant acme: data key 2 added" in captured.out
    assert "tenant acme: not resealed: machine m-holder holds the lease" in captured.err
    status = status_json(capsys)
    assert status["lease"] == "released"
    assert sealed_with(raw, status["snapshot"]["key"]) == 2
    dest = tmp_path / "out.sqlite3"
    assert main(["restore", "acme", "-o", str(dest)]) == 0
    assert rows(dest) == 8


def test_keys_rotate_data_says_plainly_what_it_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = local(tmp_path)
    asyncio.run(_plaintext_tenant(tmp_path, raw))
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(tmp_path / "local-bucket"))
    monkeypatch.setenv("TENANTDB_ENCRYPTION_KEY", f"old:{OLD}")
    assert main(["keys", "rotate", "--data"]) == 1
    assert "name at least one" in capsys.readouterr().err
    assert main(["keys", "rotate", "--reseal", "acme"]) == 1
    assert "--reseal goes with --data" in capsys.readouterr().err
    assert main(["keys", "rotate", "--data", "acme"]) == 1
    error = capsys.readouterr().err
    assert "tenant acme: data key not replaced: tenant acme: it has no data key" in error
    assert "Traceback" not in error
    assert not asyncio.run(_listed(raw, "tenants/acme/key.json"))
