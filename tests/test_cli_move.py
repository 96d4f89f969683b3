"""`tenantdb machines move`: a fake Machines API whose machines are real uvicorn processes."""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tenantdb.cli.main import main
from tenantdb.cli.status import read_status
from tenantdb.config import Settings
from tenantdb.machine.database import TenantDB
from tenantdb.storage import open_bucket
from tests.support.fake_machines import FakeMachinesAPI, serve_fake_machines
from tests.support.servers import MachineProcesses, UvicornProcess

pytestmark = pytest.mark.usefixtures("clean_environment")

TOKEN = "fo1_MOVE-SECRET-token-5d1c"
APP = "move-test-app"
APP_MODULE = "example_app:app"


@pytest.fixture(scope="module")
def served_fly() -> Iterator[FakeMachinesAPI]:
    """One fake Machines API for the module."""
    with serve_fake_machines(APP, TOKEN) as fake:
        yield fake


@pytest.fixture
def fly(served_fly: FakeMachinesAPI) -> FakeMachinesAPI:
    """The fake API, emptied."""
    served_fly.reset()
    return served_fly


@pytest.fixture(params=["local", "s3"])
def bucket_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Variables naming a fresh bucket of either backend (absolute paths: any cwd works)."""
    if request.param == "local":
        return {"TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket")}
    env: dict[str, str] = request.getfixturevalue("s3_settings_env")
    return env


def fly_env(fly: FakeMachinesAPI) -> dict[str, str]:
    """What an operator sets to reach the (fake) Machines API."""
    return {
        "FLY_API_TOKEN": TOKEN,
        "FLY_APP_NAME": APP,
        "TENANTDB_MACHINES_API_URL": fly.base_url,
    }


def visit(server: UvicornProcess) -> dict[str, Any]:
    """One counter visit of tenant acme on ``server``; its JSON answer."""
    response = httpx.get(
        f"{server.url}/customers/acme", headers={"Accept": "application/json"}, timeout=10
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def lock_owner(env: dict[str, str]) -> tuple[str | None, int]:
    """Tenant acme's lease holder and generation, read from the bucket."""
    async with open_bucket(Settings.from_env(env)) as bucket:
        status = await read_status(bucket, "acme", prefix="tenants/")
    assert status is not None
    return status.observed.record.owner, status.observed.record.generation


def test_move_hands_the_tenant_to_a_machine_in_the_new_region(
    fly: FakeMachinesAPI,
    bucket_env: dict[str, str],
    subprocess_env: dict[str, str],
    tmp_path: Path,
) -> None:
    machine_env = {**bucket_env, "TENANTDB_LEASE_TTL": "3"}
    with MachineProcesses(tmp_path) as machines:
        old = machines.start(APP_MODULE, "oldmachine", "acme", machine_env)
        assert [visit(old)["count"] for _ in range(3)] == [1, 2, 3]
        fly.add("acme", machine_id="oldmachine", stop_timeout="30s")
        processes = {"oldmachine": old}
        exits: dict[str, int] = {}

        def on_create(fake: FakeMachinesAPI, machine: dict[str, Any]) -> None:
            # Fly launches a created machine: here, a process that finds the lease held
            # and stands by.
            started = machines.start(APP_MODULE, machine["id"], "acme", machine_env, ready=False)
            processes[machine["id"]] = started
            machine["state"] = "started"

        def on_stop(fake: FakeMachinesAPI, machine_id: str) -> None:
            # Fly sends the machine's stop signal, SIGINT, and reports it stopped on exit.
            server = processes[machine_id]
            server.proc.send_signal(signal.SIGINT)
            fake.machines[machine_id]["state"] = "stopping"

            def reap() -> None:
                exits[machine_id] = server.proc.wait(60)
                fake.machines[machine_id]["state"] = "stopped"

            threading.Thread(target=reap, daemon=True).start()

        fly.on_create, fly.on_stop = on_create, on_stop
        moved = subprocess.run(
            [sys.executable, "-m", "tenantdb.cli", "machines", "move", "acme", "--region", "fra"],
            env={**subprocess_env, **bucket_env, **fly_env(fly)},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        assert moved.returncode == 0, moved.stderr
        [new_id] = fly.machines
        assert new_id != "oldmachine"
        assert f"moved tenant acme from machine oldmachine (ams) to {new_id} (fra)" in moved.stdout
        assert f"lock.json: owner {new_id}" in moved.stderr
        assert exits == {"oldmachine": 0}  # stopped gracefully, not killed
        owner, generation = asyncio.run(lock_owner(bucket_env))
        assert (owner, generation) == (new_id, 2)
        # The copy runs the old machine's config in the new region.
        [create] = fly.calls("POST")[:1]
        assert create.body["region"] == "fra"
        assert create.body["config"]["metadata"] == {"customer_id": "acme"}
        assert create.body["config"]["image"] == "img:1"
        assert create.body["config"]["stop_config"] == {"timeout": "30s"}
        # The order of the steps: nothing destroyed before the new machine held the lease.
        changes = [r for r in fly.requests if r.method != "GET"]
        assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in changes] == [
            ("POST", "machines"),
            ("POST", "stop"),
            ("DELETE", "oldmachine"),
        ]
        new = processes[new_id]
        new.wait_ready()
        answer = visit(new)
        assert (answer["count"], answer["machine_id"]) == (4, new_id)
        for text in (moved.stdout, moved.stderr):
            assert TOKEN not in text


@pytest.fixture
def operator(
    fly: FakeMachinesAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """This process's environment as an operator's, with the local bucket in tmp_path."""
    env = {**fly_env(fly), "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return env


def holder_settings(tmp_path: Path, machine: str) -> Settings:
    """Settings of machine ``machine`` of tenant acme on the operator's local bucket."""
    return Settings(
        tenant="acme",
        machine_id=machine,
        data_dir=tmp_path / machine,
        local_bucket_dir=tmp_path / "bucket",
        lease_ttl=30,
    )


def released_by(tmp_path: Path, machine: str) -> None:
    """Give tenant acme a lock.json, released by ``machine`` (which the fake then stops)."""

    async def start_and_stop() -> None:
        async with TenantDB(holder_settings(tmp_path, machine)):
            pass

    asyncio.run(start_and_stop())


def test_a_machine_that_does_not_start_leaves_both_machines(
    fly: FakeMachinesAPI,
    operator: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    released_by(tmp_path, "oldmachine")
    old = fly.add("acme", machine_id="oldmachine")  # no on_create: the copy stays "created"
    code = main(["machines", "move", "acme", "--region", "fra", "--start-timeout", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    [new] = [m for m in fly.machines if m != old]
    assert f"new machine {new} did not start" in err
    assert "Both machines are kept" in err
    assert f"fly machine destroy {new} --force" in err
    assert fly.calls("DELETE") == []
    assert fly.machines[old]["state"] == "started"
    assert [r for r in fly.requests if r.path.endswith("/stop")] == []


async def test_a_lease_that_does_not_move_leaves_both_machines(
    fly: FakeMachinesAPI,
    operator: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def on_create(fake: FakeMachinesAPI, machine: dict[str, Any]) -> None:
        machine["state"] = "started"

    fly.on_create = on_create
    fly.on_stop = lambda fake, machine_id: None  # the stop never reaches the holder
    fly.add("acme", machine_id="oldmachine")
    async with TenantDB(holder_settings(tmp_path, "oldmachine")):
        argv = ["machines", "move", "acme", "--region", "fra", "--handoff-timeout", "2"]
        code = await asyncio.to_thread(main, argv)
    _, err = capsys.readouterr()
    assert code == 1
    [new] = [m for m in fly.machines if m != "oldmachine"]
    assert f"machine {new} did not take the lease" in err
    assert "lock.json says owner oldmachine, generation 1" in err
    assert "Both machines are kept" in err
    assert fly.calls("DELETE") == []
    assert set(fly.machines) == {"oldmachine", new}


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["machines", "move", "acme"], "--region"),
        (["machines", "move", "acme", "--region", "Frankfurt!"], "not a Fly region"),
        (["machines", "move", "acme", "--region", "fra", "--handoff-timeout", "0"], "at least 1"),
    ],
)
def test_move_usage_errors_exit_2(
    fly: FakeMachinesAPI,
    operator: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    problem: str,
) -> None:
    assert main(argv) == 2
    assert problem in capsys.readouterr().err
    assert fly.requests == []


def test_move_refuses_a_tenant_without_exactly_one_machine(
    fly: FakeMachinesAPI, operator: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["machines", "move", "acme", "--region", "fra"]) == 1
    assert "exactly one machine" in capsys.readouterr().err
    first, second = fly.add("acme"), fly.add("acme")
    assert main(["machines", "move", "acme", "--region", "fra"]) == 1
    err = capsys.readouterr().err
    assert first in err
    assert second in err
    assert fly.calls("POST") == []


def test_move_refuses_the_region_it_is_in(
    fly: FakeMachinesAPI, operator: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    machine = fly.add("acme")  # in ams
    assert main(["machines", "move", "acme", "--region", "ams"]) == 1
    assert f"machine {machine} of tenant acme is in ams already" in capsys.readouterr().err
    assert fly.calls("POST") == []


def test_move_to_another_region_is_refused_on_a_bucket_consistent_only_per_region(
    fly: FakeMachinesAPI,
    operator: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fly.add("acme")  # in ams
    monkeypatch.setenv("TENANTDB_BUCKET_CONSISTENCY", "regional")
    assert main(["machines", "move", "acme", "--region", "fra"]) == 1
    err = capsys.readouterr().err
    assert "would refuse the lease last held in ams" in err
    assert "TENANTDB_BUCKET_CONSISTENCY=strong" in err
    assert fly.calls("POST") == []


def test_a_failed_copy_stops_the_move_before_anything_else(
    fly: FakeMachinesAPI,
    operator: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    released_by(tmp_path, "oldmachine")
    old = fly.add("acme", machine_id="oldmachine")

    def on_create(fake: FakeMachinesAPI, machine: dict[str, Any]) -> None:
        raise RuntimeError("the create landed, its answer is a 500")

    fly.on_create = on_create
    assert main(["machines", "move", "acme", "--region", "fra"]) == 1
    err = capsys.readouterr().err
    assert "creating the copy failed" in err
    assert "HTTP 500" in err
    assert f"Machine {old} still serves the tenant" in err
    assert "tenantdb machines list --tenant acme" in err
    assert [r for r in fly.requests if r.path.endswith("/stop")] == []
    assert fly.calls("DELETE") == []


def test_move_refuses_a_bucket_without_the_tenant_before_changing_anything(
    fly: FakeMachinesAPI, operator: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fly.add("acme")
    assert main(["machines", "move", "acme", "--region", "fra"]) == 1
    err = capsys.readouterr().err
    assert "the local bucket has no tenants/acme/lock.json: set BUCKET_NAME" in err
    assert "nothing was changed" in err
    assert [r.method for r in fly.requests] == ["GET"]


async def test_move_refuses_a_bucket_whose_holder_is_another_machine(
    fly: FakeMachinesAPI,
    operator: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fly.add("acme", machine_id="oldmachine")
    async with TenantDB(holder_settings(tmp_path, "elsewhere")):
        code = await asyncio.to_thread(main, ["machines", "move", "acme", "--region", "fra"])
    assert code == 1
    err = capsys.readouterr().err
    assert "names machine elsewhere as holder, not oldmachine" in err
    assert [r.method for r in fly.requests] == ["GET"]


async def test_ctrl_c_during_the_handoff_says_which_machines_are_kept(
    fly: FakeMachinesAPI, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    def on_create(fake: FakeMachinesAPI, machine: dict[str, Any]) -> None:
        machine["state"] = "started"

    fly.on_create = on_create
    fly.on_stop = lambda fake, machine_id: None  # the holder never lets go
    fly.add("acme", machine_id="oldmachine")
    env = {**subprocess_env, **fly_env(fly), "TENANTDB_LOCAL_BUCKET": str(tmp_path / "bucket")}
    async with TenantDB(holder_settings(tmp_path, "oldmachine")):
        mover = subprocess.Popen(
            [sys.executable, "-m", "tenantdb.cli", "machines", "move", "acme", "--region", "fra"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines: list[str] = []
            assert mover.stderr is not None
            while not any("lock.json: owner oldmachine" in line for line in lines):
                line = await asyncio.to_thread(mover.stderr.readline)
                assert line, f"the move ended early: {lines}"
                lines.append(line)
            mover.send_signal(signal.SIGINT)
            rest = await asyncio.to_thread(mover.stderr.read)
            code = await asyncio.to_thread(mover.wait, 30)
        finally:
            if mover.poll() is None:
                mover.kill()
    [new] = [m for m in fly.machines if m != "oldmachine"]
    assert code == 130
    assert f"interrupted: both machines are kept (old oldmachine, new {new})" in rest
    assert "tenantdb status acme" in rest
    assert fly.calls("DELETE") == []
