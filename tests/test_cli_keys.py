"""`tenantdb keys rotate`, and every verb's one-line answer to a wrong or missing key."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from pathlib import Path

import pytest

from tenantdb.cli.main import main
from tenantdb.config import Secret, Settings
from tenantdb.crypto import parse_keyring
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
