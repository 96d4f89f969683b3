"""`tenantdb status / restore / verify` on tenants written by a real TenantDB, both buckets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import pty
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tenantdb.cli import status as cli_status
from tenantdb.cli.common import err, parse_time, print_table, time_arg
from tenantdb.cli.main import main
from tenantdb.config import Settings
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lease import Lease
from tenantdb.replication import carrier
from tenantdb.replication.segment import chunk_key
from tenantdb.storage import Bucket, LocalBucket, describe_bucket
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


def tenant(
    tmp_path: Path, bucket: Bucket, name: str = "acme", machine: str = "m1", lease_ttl: float = 3
) -> TenantDB:
    """A TenantDB of ``name`` on ``bucket``, not started."""
    settings = Settings(
        tenant=name,
        machine_id=machine,
        fly_region="ams",
        data_dir=tmp_path / f"{name}-{machine}",
        lease_ttl=lease_ttl,
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
        code, out, err = await run("status", "acme")
        assert err == f"tenantdb: (read from the {describe_bucket(Settings.from_env())})\n"
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
    assert released["released"] is None  # a handoff, not an idle stop


async def test_status_says_when_a_tenant_stopped_itself_for_idleness(
    bucket: Bucket, cli_env: dict[str, str]
) -> None:
    lease = Lease(bucket, "acme", machine_id="m1", region="ams", ttl=3)
    await lease.acquire()
    await lease.release(reason="idle")
    code, out, _ = await run("status", "acme", "--json")
    [status] = json.loads(out)
    assert (code, status["lease"], status["released"]) == (0, "released", "idle")
    code, out, _ = await run("status", "acme")
    assert "released (idle)" in out.splitlines()[1]


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


async def test_status_names_a_damaged_lock_and_shows_the_others(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 1)
    await bucket.put("tenants/globex/lock.json", b'{"format": 1, "tenant": "globex"')
    await bucket.put("tenants/Not_A_Tenant/lock.json", b"{}")  # not tenantdb's: not listed
    code, out, err = await run("status", "--json")
    assert code == 1
    assert [s["tenant"] for s in json.loads(out)] == ["acme"]
    assert "tenant globex: tenants/globex/lock.json is damaged (not valid JSON)" in err
    assert "Not_A_Tenant" not in err


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
    # No renewal (every TTL/3) between the two looks at the bucket, however slow the restore.
    tdb = tenant(tmp_path, bucket, lease_ttl=60)
    async with tdb:
        await write(tdb, 3)
        assert tdb._shipper is not None  # segment objects go up behind the answers: let them
        await tdb._shipper.uploads.settled()
        before = await snapshot_of_bucket(bucket)
        code, out, err = await run("restore", "acme", "-o", str(dest))
        assert (code, out) == (0, "")
        assert "restored tenant acme as of " in err
        record = tdb.lease.record
        assert record is not None
        assert record.log is not None
        assert f"(log index {record.log.tail}) to {dest}" in err
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


# /proc refuses new files even to root, as a full or read-only disk would.
@pytest.mark.parametrize("where", ["directory", "/proc/tenantdb-restore-test.sqlite3"])
async def test_restore_to_a_place_it_cannot_write_fails_cleanly(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path, where: str
) -> None:
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 1)
    dest = tmp_path if where == "directory" else Path(where)
    code, out, err = await run("restore", "acme", "-o", str(dest), "--force")
    assert code == 1
    assert out == ""
    assert err.startswith(
        f"tenantdb: error: {dest} is a directory"
        if where == "directory"
        else f"tenantdb: error: cannot write {dest}: "
    )


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
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 1)  # each segment stored soon, in a pack
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


async def test_verify_runs_the_full_integrity_check(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 1)
        async with tdb.connection() as db:
            # An index declared in the other order than it was built: quick_check (which
            # every restore runs) passes, integrity_check finds every row missing from it.
            await db.execute("CREATE INDEX hits_note ON hits (note)")
            await db.execute("PRAGMA writable_schema = ON")
            await db.execute(
                "UPDATE sqlite_master SET sql = 'CREATE INDEX hits_note ON hits (note DESC)' "
                "WHERE name = 'hits_note'"
            )
            await db.commit()
        await tdb.sync()
    code, out, err = await run("verify", "acme")
    assert code == 1
    assert out == ""
    assert err.startswith("tenantdb: error: tenant acme: integrity_check found ")
    assert "row 1 missing from index hits_note" in err


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


# --- point in time: restore --at, history, rollback ---


async def two_batches(bucket: Bucket, tmp_path: Path) -> datetime:
    """50 rows, then (after the returned moment) 50 more, by a stopped machine m1."""
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 1)
        await asyncio.sleep(0.05)
        between = datetime.now(UTC)
        await asyncio.sleep(0.05)
        await write(tdb, 1)
    return between


async def test_restore_at_a_past_moment(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    between = await two_batches(bucket, tmp_path)
    then, now = tmp_path / "then.sqlite3", tmp_path / "now.sqlite3"
    code, _, err = await run("restore", "acme", "-o", str(then), "--at", between.isoformat())
    assert code == 0, err
    assert rows_in(then) == 50
    code, _, _ = await run("restore", "acme", "-o", str(now))
    assert rows_in(now) == 100
    code, _, err = await run("restore", "acme", "-o", str(tmp_path / "x.sqlite3"), "--at", "1d")
    assert code == 1
    assert "cannot be restored as of" in err
    assert "its history starts at" in err
    assert not (tmp_path / "x.sqlite3").exists()


@pytest.mark.parametrize(
    "verb",
    [
        ["restore", "acme", "-o", "x.sqlite3", "--at"],
        ["verify", "acme", "--at"],
        ["rollback", "acme", "-y", "--to"],
    ],
)
async def test_a_bad_time_is_a_usage_error(
    bucket: Bucket, cli_env: dict[str, str], verb: list[str]
) -> None:
    before = await snapshot_of_bucket(bucket)
    code, out, err = await run(*verb, "last tuesday")
    assert code == 2
    assert out == ""
    assert "'last tuesday' is not a time" in err
    assert await snapshot_of_bucket(bucket) == before


async def test_history_lists_snapshots_segments_and_takeovers(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(carrier, "PACK_SEGMENTS", 1)  # each segment stored soon, in a pack
    async with tenant(tmp_path, bucket, machine="m1") as tdb:
        await write(tdb, 2)
        await tdb.checkpoint()
        await write(tdb, 1)
    async with tenant(tmp_path, bucket, machine="m2") as tdb:
        await write(tdb, 2)
    code, out, _ = await run("history", "acme", "--json")
    assert code == 0
    history = json.loads(out)
    assert [(t["generation"], t["owner"]) for t in history["takeovers"]] == [(1, "m1"), (2, "m2")]
    assert {s["generation"] for s in history["segments"]} == {1, 2}
    assert all(s["published"] for s in history["segments"])
    assert any(s["published"] and s["base"] for s in history["snapshots"])
    assert all(s["key"].startswith("tenants/acme/") for s in history["segments"])
    assert datetime.fromisoformat(history["restorable_from"]) <= datetime.now(UTC)
    code, out, _ = await run("history", "acme")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("tenant acme: restorable from 20")
    for title in ("snapshots:", "log segments:", "takeovers:"):
        assert title in lines
    assert any(line.startswith("log/00000002/") for line in lines)
    code, out, _ = await run("status", "acme", "--json")
    [status] = json.loads(out)
    assert status["restorable_from"] == history["restorable_from"]


async def test_history_of_a_missing_tenant_fails(bucket: Bucket, cli_env: dict[str, str]) -> None:
    code, _, err = await run("history", "acme")
    assert code == 1
    assert "nothing under tenants/acme/" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "acme"],
        ["history", "acme"],
        ["restore", "acme", "-o", "out.sqlite3"],
        ["verify", "acme"],
    ],
)
async def test_a_read_only_verb_in_a_directory_without_a_bucket_names_it_and_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = await run(*argv)
    assert (code, out) == (1, "")
    assert f"no local bucket at '{tmp_path / '.tenantdb' / 'bucket'}'" in err
    assert "TENANTDB_LOCAL_BUCKET" in err
    assert list(tmp_path.iterdir()) == []


async def test_status_of_an_empty_bucket_says_which_bucket_it_read(
    local_bucket: LocalBucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANTDB_LOCAL_BUCKET", str(local_bucket.root))
    code, out, err = await run("status")
    assert (code, out) == (0, "")
    assert err.strip() == (
        f"tenantdb: no tenants under 'tenants/' in the local bucket {local_bucket.root}"
    )


async def rows_served(bucket: Bucket, tmp_path: Path, machine: str) -> int:
    """The rows a machine that starts now serves."""
    async with (
        tenant(tmp_path, bucket, machine=machine) as tdb,
        tdb.connection() as db,
        db.execute("SELECT count(*) FROM hits") as cursor,
    ):
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_rollback_publishes_the_past_as_the_newest_state(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    between = await two_batches(bucket, tmp_path)
    after = datetime.now(UTC)
    code, out, err = await run("rollback", "acme", "--to", between.isoformat(), "-y")
    assert code == 0, err
    assert out.startswith("rolled tenant acme back as of ")
    assert "generation 2" in out
    assert await rows_served(bucket, tmp_path, "m3") == 50
    # Nothing was deleted: the moment after the second batch is still restorable.
    later = tmp_path / "later.sqlite3"
    code, _, _ = await run("restore", "acme", "-o", str(later), "--at", after.isoformat())
    assert code == 0
    assert rows_in(later) == 100


async def test_rollback_refuses_while_a_machine_holds_the_lease(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    between = await two_batches(bucket, tmp_path)
    async with tenant(tmp_path, bucket, machine="m2") as tdb:
        before = await snapshot_of_bucket(bucket)
        code, out, err = await run("rollback", "acme", "--to", between.isoformat(), "--yes")
        assert code == 1
        assert out == ""
        assert "held by machine m2" in err
        assert "--wait" in err
        assert await snapshot_of_bucket(bucket) == before
        assert tdb.serving


async def test_rollback_with_wait_takes_over_once_the_holder_stops(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    between = await two_batches(bucket, tmp_path)
    tdb = tenant(tmp_path, bucket, machine="m2")
    await tdb.start(standby=False)
    err = io.StringIO()

    def roll_back() -> int:
        with contextlib.redirect_stderr(err):
            return main(["rollback", "acme", "--to", between.isoformat(), "-y", "--wait"])

    rolling = asyncio.ensure_future(asyncio.to_thread(roll_back))
    for _ in range(200):
        if "waiting for machine m2" in err.getvalue():
            break
        await asyncio.sleep(0.05)
    assert "waiting for machine m2 to release the lease" in err.getvalue()
    assert not rolling.done()
    await tdb.stop()  # a graceful stop releases the lease: the rollback takes it at once
    assert await asyncio.wait_for(rolling, 30) == 0, err.getvalue()
    assert await rows_served(bucket, tmp_path, "m3") == 50


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stdin", "answer"), [(io.StringIO, ""), (_Terminal, "n\n")])
async def test_rollback_asks_first(
    bucket: Bucket,
    cli_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stdin: type[io.StringIO],
    answer: str,
) -> None:
    between = await two_batches(bucket, tmp_path)
    monkeypatch.setattr(sys, "stdin", stdin(answer))
    before = await snapshot_of_bucket(bucket)
    code, out, err = await run("rollback", "acme", "--to", between.isoformat())
    assert code == 1
    assert out == ""
    if stdin is _Terminal:
        assert "Roll tenant acme back to " in err
        assert "aborted" in err
    else:
        assert "pass --yes" in err
    assert await snapshot_of_bucket(bucket) == before


# --- progress bars ---


def run_with_stderr_on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run ``argv`` with its stderr on a pseudo-terminal; its exit code and what it drew."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary
    )
    os.close(secondary)
    drawn = bytearray()
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not chunk:
            break
        drawn += chunk
    os.close(primary)
    return proc.wait(60), bytes(drawn)


async def test_a_restore_draws_a_progress_bar_on_a_terminal_only(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    async with tenant(tmp_path, bucket) as tdb:
        await write(tdb, 5, rows=400)
    env = {**subprocess_env, **cli_env}
    command = [sys.executable, "-m", "tenantdb.cli", "restore", "acme", "-o"]
    code, drawn = await asyncio.to_thread(
        run_with_stderr_on_a_terminal, [*command, str(tmp_path / "tty.sqlite3")], env
    )
    assert code == 0, drawn
    assert b"restoring acme" in drawn
    assert b"\x1b[" in drawn  # drawn, then erased: a terminal's control sequences
    piped = await asyncio.to_thread(
        subprocess.run,
        [*command, str(tmp_path / "pipe.sqlite3")],
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    assert piped.returncode == 0
    assert piped.stdout == b""
    [line] = piped.stderr.decode().splitlines()
    assert line.startswith("tenantdb: restored tenant acme as of ")
    assert "\x1b" not in piped.stderr.decode()


# --- hostile objects in the bucket: a clear error for that tenant, never a traceback ---


async def tamper_lock(bucket: Bucket, change: dict[str, object], log: dict[str, object]) -> None:
    """Rewrite acme's lock.json with fields changed, as anyone with bucket credentials can."""
    key = "tenants/acme/lock.json"
    data = json.loads((await bucket.get(key)).body)
    data.update(change)
    data["log"].update(log)
    await bucket.put(key, json.dumps(data).encode())


async def two_tenants(bucket: Bucket, tmp_path: Path) -> None:
    for name in ("acme", "globex"):
        async with tenant(tmp_path, bucket, name) as tdb:
            await write(tdb, 1)


async def test_status_with_free_form_times_prints_error_not_traceback(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    await two_tenants(bucket, tmp_path)
    await tamper_lock(bucket, {}, {"updated_at": "yesterday"})
    code, out, err = await run("status", "--json")  # run() fails on any traceback
    assert code == 1
    assert [s["tenant"] for s in json.loads(out)] == ["globex"]
    assert "tenant acme: tenants/acme/lock.json is damaged" in err
    code, out, err = await run("status")
    assert code == 1
    assert [line.split()[0] for line in out.splitlines()] == ["TENANT", "globex"]


async def test_restore_and_verify_with_free_form_times_fail_before_writing(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    await two_tenants(bucket, tmp_path)
    await tamper_lock(bucket, {}, {"updated_at": "2026-12-01 10:00 CET"})
    dest = tmp_path / "out.sqlite3"
    code, _, err = await run("restore", "acme", "-o", str(dest))
    assert code == 1
    assert err.startswith("tenantdb: error: ")
    assert "tenants/acme/lock.json" in err
    assert not dest.exists()
    code, _, err = await run("verify", "acme")
    assert code == 1
    assert "tenants/acme/lock.json" in err


async def test_status_escapes_control_characters(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    await two_tenants(bucket, tmp_path)
    await tamper_lock(bucket, {"owner": "\x1b]0;pwned\x07m1", "region": "\x1b[2Jams"}, {})
    for argv in (["status"], ["status", "--json"], ["status", "acme"], ["history", "acme"]):
        code, out, err = await run(*argv)
        assert "\x1b" not in out + err
        assert "\x07" not in out + err
    code, _, err = await run("status", "acme")
    assert code == 1
    assert "tenants/acme/lock.json is damaged" in err


def test_printed_text_is_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([("KEY",), ("snap\x1b[31m\r",)])
    err("bad key tenants/acme/\x1b]0;x\x07")
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["KEY", "snap\\x1b[31m\\r"]
    assert captured.err == "tenantdb: bad key tenants/acme/\\x1b]0;x\\x07\n"


async def test_status_and_history_survive_a_snapshot_key_with_15_digit_time(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    await two_tenants(bucket, tmp_path)
    odd = "tenants/acme/snapshots/00000001-00000001-000000000001-999999999999999-ab.sqlite3"
    await bucket.put(odd, b"")
    code, out, _ = await run("status", "--json")
    assert code == 0
    assert [s["tenant"] for s in json.loads(out)] == ["acme", "globex"]
    code, out, _ = await run("history", "acme")
    assert code == 0
    assert "999999999999999" not in out  # not a key tenantdb made: not listed as a snapshot


async def test_status_survives_a_deeply_nested_takeover_record(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    await two_tenants(bucket, tmp_path)
    key = "tenants/acme/history/00000002.json"
    await bucket.put(key, b"[" * 60_000)
    code, out, err = await run("status", "--json")
    assert code == 1
    assert [s["tenant"] for s in json.loads(out)] == ["globex"]
    assert f"takeover record {key} is unusable" in err
    code, _, err = await run("history", "acme")
    assert (code, err.startswith("tenantdb: error: ")) == (1, True)


def test_an_unexpected_error_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(_: argparse.Namespace) -> int:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(cli_status, "_status", broken)
    assert main(["status"]) == 1
    assert capsys.readouterr().err == (
        "tenantdb: error: unexpected RecursionError: maximum recursion depth exceeded "
        "(a bug in tenantdb)\n"
    )


async def test_restore_at_future_time_is_refused_naming_newest_moment(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    await two_batches(bucket, tmp_path)
    later = datetime.now(UTC) + timedelta(hours=1)
    dest = tmp_path / "future.sqlite3"
    code, _, err = await run("restore", "acme", "-o", str(dest), "--at", later.isoformat())
    assert code == 1
    assert "that is in the future" in err
    assert "the newest moment it can be restored as of is now, " in err
    assert not dest.exists()
