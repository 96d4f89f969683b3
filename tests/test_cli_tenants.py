"""`tenantdb status / restore / verify` on tenants written by a real TenantDB, both buckets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tenantdb.cli import main
from tenantdb.cli_common import parse_time, time_arg
from tenantdb.config import Settings
from tenantdb.database import TenantDB
from tenantdb.lease import Lease
from tenantdb.replication.segment import chunk_key
from tenantdb.storage import Bucket
from tests.support.s3_server import s3_env

pytestmark = pytest.mark.usefixtures("clean_environment")

MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)"]


@pytest.fixture
def cli_env(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> dict[str, str]:
    """Variables that point the command at ``bucket``, set in this process's environment."""
    if bucket.kind == "local":
        env = {"TENANTDB_LOCAL_BUCKET": str(tmp_path / "local-bucket")}
    else:
        env = s3_env(bucket.name, request.getfixturevalue("s3_endpoint"))  # type: ignore[attr-defined]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def tenant(tmp_path: Path, bucket: Bucket, name: str = "acme", machine: str = "m1") -> TenantDB:
    """A TenantDB of ``name`` on ``bucket``, not started."""
    settings = Settings(
        tenant=name,
        machine_id=machine,
        fly_region="ams",
        data_dir=tmp_path / f"{name}-{machine}",
        lease_ttl=3,
        checkpoint_interval=0,
    )
    return TenantDB(settings, migrations=MIGRATIONS, bucket=bucket)


async def write(tdb: TenantDB, batches: int, rows: int = 50) -> None:
    """``batches`` commits of ``rows`` rows, each shipped to the bucket as its own segment."""
    for batch in range(batches):
        async with tdb.connection() as db:
            await db.executemany(
                "INSERT INTO hits (note) VALUES (?)", [(f"{batch}-{i}" * 20,) for i in range(rows)]
            )
            await db.commit()
        await tdb.sync()


async def run(*argv: str) -> tuple[int, str, str]:
    """``tenantdb argv`` in a thread (it runs its own event loop); exit code, stdout, stderr."""
    return await asyncio.to_thread(_run, list(argv))


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue(), err.getvalue()


async def snapshot_of_bucket(bucket: Bucket) -> list[tuple[str, str]]:
    """Every object's key and ETag: equal before and after means nothing was written."""
    return [(info.key, info.etag) for info in await bucket.list("")]


# --- status ---


async def test_status_of_a_held_then_released_tenant(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    tdb = tenant(tmp_path, bucket)
    async with tdb:
        await write(tdb, 2)
        code, out, err = await run("status", "acme", "--json")
        assert (code, err) == (0, "")
        [held] = json.loads(out)
        assert (held["tenant"], held["owner"], held["region"]) == ("acme", "m1", "ams")
        assert (held["lease"], held["generation"]) == ("held", 1)
        assert 0 < held["expires_in"] <= 3 + 1
        assert held["log"]["tail"] >= 2
        assert 0 <= held["log"]["age_seconds"] < 30
        code, out, _ = await run("status", "acme")
        header, row = out.splitlines()
        assert header.split()[:5] == ["TENANT", "HOLDER", "REGION", "GEN", "LEASE"]
        assert row.split()[:4] == ["acme", "m1", "ams", "1"]
        assert "s left" in row
    code, out, _ = await run("status", "acme", "--json")
    [released] = json.loads(out)
    assert (released["owner"], released["lease"], released["expires_in"]) == (
        None,
        "released",
        None,
    )
    assert released["last_owner"] == "m1"
    code, out, _ = await run("status", "acme")
    assert "released" in out.splitlines()[1]


async def test_status_without_tenants_lists_every_tenant(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    for name in ("globex", "acme"):
        tdb = tenant(tmp_path, bucket, name)
        async with tdb:
            await write(tdb, 1)
    code, out, _ = await run("status", "--json")
    assert code == 0
    assert [s["tenant"] for s in json.loads(out)] == ["acme", "globex"]
    code, out, _ = await run("status")
    assert [line.split()[0] for line in out.splitlines()] == ["TENANT", "acme", "globex"]


async def test_status_of_a_missing_tenant_fails_and_shows_the_others(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 1)
    code, out, err = await run("status", "nosuch", "acme", "--json")
    assert code == 1
    assert [s["tenant"] for s in json.loads(out)] == ["acme"]
    assert "tenants/nosuch/lock.json" in err


async def test_status_in_a_subprocess(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 1)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tenantdb.cli", "status", "--json"],
        env={**subprocess_env, **cli_env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    [status] = json.loads(done.stdout)
    assert (status["tenant"], status["lease"]) == ("acme", "released")
    assert done.stderr == ""


# --- restore and verify ---


def rows_in(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        (count,) = conn.execute("SELECT count(*) FROM hits").fetchone()
    finally:
        conn.close()
    return int(count)


async def test_restore_writes_the_tenant_while_it_is_served_and_changes_nothing(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    dest = tmp_path / "out.sqlite3"
    tdb = tenant(tmp_path, bucket)
    async with tdb:
        await write(tdb, 3)
        before = await snapshot_of_bucket(bucket)
        code, out, err = await run("restore", "acme", "-o", str(dest))
        assert (code, out) == (0, "")
        assert "restored tenant acme as of " in err
        assert f"(log index 3) to {dest}" in err
        assert rows_in(dest) == 150
        assert await snapshot_of_bucket(bucket) == before  # no lease taken, nothing written
        assert tdb.serving
        await write(tdb, 1)
    code, _, err = await run("restore", "acme", "-o", str(dest))
    assert code == 1
    assert "--force" in err
    assert rows_in(dest) == 150
    code, _, _ = await run("restore", "acme", "-o", str(dest), "--force")
    assert code == 0
    assert rows_in(dest) == 200


async def test_verify_passes_on_a_sound_tenant(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 3)
    before = await snapshot_of_bucket(bucket)
    code, out, err = await run("verify", "acme")
    assert (code, out) == (0, "")
    assert "integrity_check passed" in err
    assert await snapshot_of_bucket(bucket) == before


async def test_verify_names_a_damaged_segment(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 5)
    observed = await Lease(bucket, "acme", machine_id="t", region="", ttl=3).read()
    assert observed is not None
    pointer = observed.record.log
    assert pointer is not None
    # A segment a restore reads from the bucket, not from lock.json's inline copies.
    stored = [c for c in pointer.chunks() if c.last < pointer.inline_from]
    assert stored, f"every segment is inline: {pointer}"
    key = chunk_key("tenants/", "acme", stored[0])
    body = bytearray((await bucket.get(key)).body)
    body[len(body) // 2] ^= 0x01
    await bucket.put(key, bytes(body))
    code, out, err = await run("verify", "acme")
    assert code == 1
    assert out == ""
    assert key in err
    assert err.startswith("tenantdb: error: verify acme:")


async def test_verify_of_a_missing_tenant_fails(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    code, _, err = await run("verify", "acme")
    assert code == 1
    assert "tenants/acme/lock.json" in err


# --- TIME arguments ---

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-29T10:00:00Z", datetime(2026, 11, 29, 10, tzinfo=UTC)),
        ("2026-11-29T10:00:00", datetime(2026, 11, 29, 10, tzinfo=UTC)),  # naive is UTC
        ("2026-11-29T11:00:00+01:00", datetime(2026, 11, 29, 10, tzinfo=UTC)),
        ("2026-11-29", datetime(2026, 11, 29, tzinfo=UTC)),
        ("90s", NOW - timedelta(seconds=90)),
        ("10m", NOW - timedelta(minutes=10)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        ("1.5h", NOW - timedelta(minutes=90)),
    ],
)
def test_times_parse_to_utc(text: str, expected: datetime) -> None:
    parsed = parse_time(text, now=NOW)
    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["yesterday", "10", "10x", "-5m", "2026-13-01", "", "99999999d"])
def test_bad_times_are_usage_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        time_arg(text)
