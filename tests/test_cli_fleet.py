"""`tenantdb tenants create/export/delete/schema` and `tenantdb query`, on both buckets."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tenantdb.cli import query as query_cli
from tenantdb.cli.main import main
from tenantdb.config import Settings
from tenantdb.fleet import purge_tenant
from tenantdb.machine.database import TenantDB
from tenantdb.storage import Bucket
from tests.support.fake_machines import serve_fake_machines
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


def machine(tmp_path: Path, bucket: Bucket, name: str, node: str = "m1") -> TenantDB:
    settings = Settings(
        tenant=name,
        machine_id=node,
        fly_region="ams",
        data_dir=tmp_path / f"{name}-{node}",
        lease_ttl=3,
        checkpoint_interval=0,
    )
    return TenantDB(settings, migrations=MIGRATIONS, bucket=bucket)


async def write(tdb: TenantDB, count: int) -> None:
    for i in range(count):
        async with tdb.connection() as db:
            await db.execute("INSERT INTO hits (note) VALUES (?)", [f"note {i}"])
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


def rows_in(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM hits").fetchone()
    return int(count)


@pytest.fixture
async def acme(bucket: Bucket, cli_env: dict[str, str], tmp_path: Path) -> None:
    """Tenant acme with 3 rows, a snapshot and a log, its machine stopped."""
    async with machine(tmp_path, bucket, "acme") as tdb:
        await write(tdb, 2)
        await tdb.checkpoint()
        await write(tdb, 1)


async def test_create_fork_export_query_and_purge(
    bucket: Bucket, acme: None, tmp_path: Path
) -> None:
    code, out, err = await run("tenants", "create", "fresh")
    assert (code, out, err) == (0, "created tenant fresh (empty)\n", "")
    code, out, err = await run("tenants", "create", "fork", "--from", "acme")
    assert code == 0, err
    assert out.startswith("created tenant fork from acme as it is now: 1 object(s) copied")

    code, out, err = await run("tenants", "create", "fork")
    assert (code, out) == (1, "")
    assert err.startswith("tenantdb: error: tenant fork already exists")
    assert err.count("\n") == 1

    dump = tmp_path / "fork.sql"
    code, _, err = await run("tenants", "export", "fork", "-o", str(dump), "--format", "sql")
    assert code == 0, err
    assert "SQL dump" in err
    assert "INSERT INTO \"hits\" VALUES(3,'note 0');" in dump.read_text()
    exported = tmp_path / "fork.sqlite3"
    code, _, err = await run("tenants", "export", "fork", "-o", str(exported))
    assert code == 0, err
    assert rows_in(exported) == 3
    code, _, err = await run("tenants", "export", "fork", "-o", str(exported))
    assert (code, err) == (1, f"tenantdb: error: {exported} exists; pass --force to overwrite it\n")

    cache = str(tmp_path / "cache")
    sql = "SELECT count(*) AS n FROM hits"
    code, out, err = await run("query", sql, "--all", "--format", "csv", "--cache-dir", cache)
    assert code == 1  # tenant fresh has no table hits
    assert "error: tenant fresh: no such table: hits" in err
    lines = list(csv.reader(io.StringIO(out)))
    assert lines[0] == ["tenant", "n"]
    assert sorted(lines[1:]) == [["acme", "3"], ["fork", "3"]]
    code, out, err = await run(
        "query", sql, "acme", "fork", "--format", "json", "--cache-dir", cache
    )
    assert code == 0, err
    assert sorted(out.splitlines()) == [
        json.dumps({"tenant": "acme", "n": 3}),
        json.dumps({"tenant": "fork", "n": 3}),
    ]
    code, out, err = await run("query", sql, "fork", "acme", "--cache-dir", cache)
    assert (code, out.split()) == (0, ["tenant", "n", "acme", "3", "fork", "3"])

    code, out, err = await run("tenants", "schema", "--all", "--json", "--cache-dir", cache)
    assert code == 0, err
    assert json.loads(out) == {
        "tenants": {"acme": 1, "fork": 1, "fresh": 0},
        "versions": {"0": 1, "1": 2},
    }

    code, out, err = await run("tenants", "delete", "fork", "--purge", "--yes", "--json")
    assert code == 0, err
    receipt = json.loads(out)
    assert receipt["tenant"] == "fork"
    assert receipt["keys"] >= 4  # snapshot, segment, takeover record, lock.json
    assert await bucket.list("tenants/fork/") == []
    code, _, err = await run("tenants", "delete", "fork", "--purge", "--yes")
    assert code == 1
    assert "no tenant fork: nothing under tenants/fork/" in err
    code, out, _ = await run("tenants", "create", "fork", "--from", "acme", "--at", "1h")
    assert code == 1  # acme's history does not go back an hour


async def test_delete_is_refused_while_a_machine_holds_the_lease(
    bucket: Bucket, acme: None, tmp_path: Path
) -> None:
    async with machine(tmp_path, bucket, "acme", "m2") as tdb:
        before = [(i.key, i.etag) for i in await bucket.list("")]
        code, out, err = await run("tenants", "delete", "acme", "--purge", "-y")
        assert (code, out) == (1, "")
        assert "tenant acme is held by machine m2 (ams), lease expires in" in err
        assert "nothing was deleted" in err
        assert [(i.key, i.etag) for i in await bucket.list("")] == before
        assert tdb.serving


class Interrupted(Exception):
    pass


class DiesAtFirstDelete:
    """``bucket`` whose process 'dies' at its first delete: the purge stops after its mark."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket

    def __getattr__(self, name: str) -> object:
        return getattr(self._bucket, name)

    async def delete_many(self, keys: list[str]) -> None:
        raise Interrupted(keys[0])


async def test_status_shows_an_interrupted_purge_and_delete_resumes_it(
    bucket: Bucket, acme: None
) -> None:
    with pytest.raises(Interrupted):
        await purge_tenant(DiesAtFirstDelete(bucket), "acme", prefix="tenants/")  # type: ignore[arg-type]
    code, out, err = await run("status", "acme", "--json")
    assert code == 0, err
    [status] = json.loads(out)
    assert (status["lease"], status["expires_in"]) == ("purging", None)
    assert status["owner"].startswith("purge@")
    code, out, _ = await run("status", "acme")
    assert out.splitlines()[1].split()[4] == "purging"
    code, out, err = await run("tenants", "delete", "acme", "--purge", "-y")
    assert code == 0, err
    assert out.startswith("purged tenant acme (resumed an interrupted purge): ")
    assert await bucket.list("tenants/acme/") == []


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["tenants", "delete", "acme"], 2, "the following arguments are required: --purge"),
        (["tenants", "delete", "acme", "--purge"], 1, "without confirmation: pass --yes"),
        (["tenants", "create", "x", "--at", "1h"], 1, "--at needs --from"),
        (["tenants", "create", "x", "--from", "x"], 1, "cannot be forked from itself"),
        (["tenants", "create", "Bad_Id"], 2, "usage: tenantdb"),
        (["tenants", "create", "x", "--from", "ghost"], 1, "no tenant ghost to fork from"),
        (["tenants", "export", "ghost", "-o", "ghost.sqlite3"], 1, "tenant ghost has no"),
        (["tenants", "delete", "ghost", "--purge", "-y"], 1, "no tenant ghost: nothing under"),
        (["tenants", "create", "acme"], 1, "tenant acme already exists"),
        (["query", "SELECT 1"], 1, "name the tenants to query, or pass --all"),
        (["query", "SELECT 1", "acme", "--all"], 1, "name the tenants to query, or pass --all"),
    ],
)
async def test_bad_requests_change_nothing(
    bucket: Bucket,
    acme: None,
    argv: list[str],
    code: int,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    before = [(i.key, i.etag) for i in await bucket.list("")]
    got, out, err = await run(*argv)
    assert (got, out) == (code, "")
    assert message in err
    if code == 1:
        assert err.count("\n") == 1  # one line
    assert [(i.key, i.etag) for i in await bucket.list("")] == before
    assert not (tmp_path / "ghost.sqlite3").exists()


async def test_the_verbs_through_the_installed_command(
    bucket: Bucket,
    acme: None,
    cli_env: dict[str, str],
    tmp_path: Path,
    subprocess_env: dict[str, str],
) -> None:
    command = Path(sys.executable).with_name("tenantdb")
    env = {**subprocess_env, **cli_env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}

    def tenantdb(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(command), *argv], env=env, capture_output=True, text=True, timeout=120
        )

    done = await asyncio.to_thread(tenantdb, "tenants", "create", "copy", "--from", "acme")
    assert done.returncode == 0, done.stderr
    done = await asyncio.to_thread(tenantdb, "query", "SELECT max(id) FROM hits", "copy")
    assert (done.returncode, done.stdout.split()) == (0, ["tenant", "max(id)", "copy", "3"])
    assert list((tmp_path / "xdg" / "tenantdb" / "query").glob("*/copy.sqlite3"))
    done = await asyncio.to_thread(tenantdb, "tenants", "delete", "copy", "--purge", "-y")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("purged tenant copy: ")
    assert "nothing is left under tenants/copy/" in done.stdout
    # On a deployment's bucket, without a Fly token, the machines left alone are named.
    assert ("note: FLY_API_TOKEN or FLY_APP_NAME is unset" in done.stderr) is (bucket.kind == "s3")
    assert await bucket.list("tenants/copy/") == []


async def test_delete_with_a_fly_token_destroys_the_tenants_machines_first(
    bucket: Bucket, acme: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_fake_machines("fleet-app", "fo1_token") as fly:
        running, other = fly.add("acme"), fly.add("globex")
        monkeypatch.setenv("FLY_API_TOKEN", "fo1_token")
        monkeypatch.setenv("FLY_APP_NAME", "fleet-app")
        monkeypatch.setenv("TENANTDB_MACHINES_API_URL", fly.base_url)
        code, out, err = await run("tenants", "delete", "acme", "--purge", "-y")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[:2] == [
            f"stopping machine {running} (started) ...",
            f"destroyed machine {running} of tenant acme",
        ]
        assert lines[2].startswith("purged tenant acme: ")
        assert list(fly.machines) == [other]
    assert await bucket.list("tenants/acme/") == []


APP_MODULE = """
from starlette.applications import Starlette
from starlette.middleware import Middleware

from tenantdb import TenantDBMiddleware

MIGRATIONS = [
    "CREATE TABLE hits (id INTEGER PRIMARY KEY, note TEXT)",
    "ALTER TABLE hits ADD COLUMN at TEXT",
]
app = Starlette(middleware=[Middleware(TenantDBMiddleware, migrations=MIGRATIONS)])
"""


async def test_migrate_status_compares_each_tenant_with_the_apps_migrations(
    bucket: Bucket, acme: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fleet_app_one.py").write_text(APP_MODULE)
    monkeypatch.chdir(tmp_path)
    code, _, err = await run("tenants", "create", "fresh")
    assert code == 0, err
    cache = str(tmp_path / "cache")
    argv = ["migrate", "status", "--all", "--cache-dir", cache]
    code, out, err = await run(*argv, "--app", "fleet_app_one:app", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "migrations": 2,
        "tenants": {"acme": 1, "fresh": 0},
        "versions": {"0": 1, "1": 1},
        "behind": ["acme", "fresh"],
        "ahead": [],
        "changed_in_place": [],
    }
    code, out, err = await run(*argv, "--app", "fleet_app_one:MIGRATIONS[:1]")
    assert code == 1
    assert "cannot load it" in err
    (tmp_path / "fleet_app_two.py").write_text("MIGRATIONS = []\n")
    code, out, err = await run(*argv, "--app", "fleet_app_two:MIGRATIONS")
    assert code == 0, err
    assert [line.split() for line in out.splitlines()] == [
        ["TENANT", "VERSION", "STATE"],
        ["acme", "1", "ahead", "by", "1"],
        ["fresh", "0", "current"],
    ]
    summary = "the app has 0 migration(s): 1 tenant(s) current, 0 behind, 1 ahead of the code"
    assert err == f"tenantdb: {summary}\n"
    code, _, err = await run(*argv, "--app", "fleet_app_two")
    assert (code, err) == (
        1,
        "tenantdb: error: --app 'fleet_app_two': expected MODULE:ATTR, e.g. notes:app\n",
    )


async def test_migrate_run_migrates_stopped_tenants_and_lists_held_ones(
    bucket: Bucket, acme: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fleet_app_three.py").write_text(APP_MODULE)
    monkeypatch.chdir(tmp_path)
    code, _, err = await run("tenants", "create", "fresh")
    assert code == 0, err
    app = ["--app", "fleet_app_three:app"]
    before = [(i.key, i.etag) for i in await bucket.list("")]
    code, out, err = await run("migrate", "run", *app, "--all", "--dry-run")
    assert code == 0, err
    assert sorted(line.split(" in ")[0] for line in out.splitlines()) == [
        "acme: dry run 1 -> 2",
        "fresh: dry run 0 -> 2",
    ]
    assert [(i.key, i.etag) for i in await bucket.list("")] == before
    async with machine(tmp_path, bucket, "acme", "m2"):
        code, out, err = await run("migrate", "run", *app, "--all")
        assert code == 0, err
        lines = sorted(out.splitlines())
        assert lines[0].startswith("acme: held by machine m2 (lease expires in ")
        assert lines[0].endswith("it migrates at its next start")
        assert lines[1].startswith("fresh: migrated 0 -> 2 in ")
        assert err == "tenantdb: 2 tenant(s) against 2 migration(s): 1 held, 1 migrated\n"
    code, out, err = await run("migrate", "run", *app, "acme", "fresh", "--json")
    assert code == 0, err
    results = sorted((json.loads(line) for line in out.splitlines()), key=lambda r: r["tenant"])
    assert [(r["tenant"], r["outcome"], r["before"], r["after"]) for r in results] == [
        ("acme", "migrated", 1, 2),
        ("fresh", "current", 2, 2),
    ]


class ReadsOf:
    """``bucket`` that records the key of every read (GETs and downloads)."""

    def __init__(self, bucket: Bucket, reads: list[str]) -> None:
        self._bucket = bucket
        self._reads = reads

    def __getattr__(self, name: str) -> object:
        return getattr(self._bucket, name)

    async def get(self, key: str, **kwargs: object) -> object:
        self._reads.append(key)
        return await self._bucket.get(key, **kwargs)  # type: ignore[arg-type]

    async def download_file(self, key: str, *args: object, **kwargs: object) -> object:
        self._reads.append(key)
        return await self._bucket.download_file(key, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys the command reads from its bucket, in order."""
    keys: list[str] = []
    real = query_cli.open_bucket

    @contextlib.asynccontextmanager
    async def counted(settings: Settings, **kwargs: bool) -> AsyncIterator[ReadsOf]:
        async with real(settings, **kwargs) as bucket:
            yield ReadsOf(bucket, keys)

    monkeypatch.setattr(query_cli, "open_bucket", counted)
    return keys


async def test_migrate_status_reads_lock_json_alone_where_it_records_the_schema(
    bucket: Bucket, acme: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[str]
) -> None:
    (tmp_path / "fleet_app_four.py").write_text(APP_MODULE)
    monkeypatch.chdir(tmp_path)
    code, _, err = await run("tenants", "create", "fresh")
    assert code == 0, err
    reads.clear()
    argv = ["migrate", "status", "--all", "--cache-dir", str(tmp_path / "cache")]
    code, out, err = await run(*argv, "--app", "fleet_app_four:app", "--json")
    assert code == 0, err
    assert json.loads(out)["tenants"] == {"acme": 1, "fresh": 0}
    # One GET of lock.json per tenant: no snapshot, no log, no restored copy.
    assert sorted(reads) == ["tenants/acme/lock.json", "tenants/fresh/lock.json"]
    # A lock.json written before schemas were recorded: that tenant alone is restored.
    lock = await bucket.get("tenants/acme/lock.json")
    older = {k: v for k, v in json.loads(lock.body).items() if k != "schema"}
    await bucket.put("tenants/acme/lock.json", json.dumps(older).encode(), if_match=lock.info.etag)
    reads.clear()
    code, out, err = await run(*argv, "--app", "fleet_app_four:app", "--json")
    assert code == 0, err
    assert json.loads(out)["tenants"] == {"acme": 1, "fresh": 0}
    assert [key for key in reads if "/snapshots/" in key or "/log/" in key]
    assert all(key.startswith("tenants/acme/") for key in reads if "lock.json" not in key)
    code, out, err = await run("tenants", "schema", "acme", "fresh", "--json")
    assert code == 0, err
    assert json.loads(out)["tenants"] == {"acme": 1, "fresh": 0}


async def test_migrate_status_reports_a_migration_list_changed_in_place(
    bucket: Bucket, acme: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edited = APP_MODULE.replace("note TEXT)", "note TEXT, extra TEXT)")
    (tmp_path / "fleet_app_five.py").write_text(edited)
    monkeypatch.chdir(tmp_path)
    argv = ["migrate", "status", "acme", "--cache-dir", str(tmp_path / "cache")]
    code, out, err = await run(*argv, "--app", "fleet_app_five:app", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["changed_in_place"], report["behind"]) == (["acme"], [])
    assert "warning: tenant acme: migration list changed in place" in err
    code, out, err = await run(*argv, "--app", "fleet_app_five:app")
    assert code == 0, err
    assert out.splitlines()[1].split(None, 2) == ["acme", "1", "migration list changed in place"]
    assert "0 tenant(s) current, 0 behind, 0 ahead of the code, 1 migration list changed" in err
