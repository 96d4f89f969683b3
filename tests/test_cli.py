"""The `tenantdb` command end to end, against a fake Machines API on loopback."""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tenantdb.cli import COMMANDS, build_parser, main

TOKEN = "fo1_CLI-SECRET-token-93b1e0"
APP = "cli-test-app"


@dataclass
class FakeFly:
    """Just enough of the Machines API for the CLI, recording (method, path, query, body)."""

    machines: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    fail_next: tuple[int, Any] | None = None
    url: str = ""

    def add(self, tenant: str, state: str = "started", key: str = "customer_id") -> str:
        machine_id = secrets.token_hex(7)
        self.machines[machine_id] = {
            "id": machine_id,
            "name": tenant,
            "state": state,
            "region": "ams",
            "instance_id": "01INST",
            "config": {"metadata": {key: tenant}},
        }
        return machine_id

    def calls(self, method: str) -> list[tuple[str, str, dict[str, str], Any]]:
        return [r for r in self.requests if r[0] == method]

    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        body: Any = json.loads(raw) if raw else None
        self.requests.append((request.method, request.url.path, dict(request.query_params), body))
        if self.fail_next is not None:
            (status, payload), self.fail_next = self.fail_next, None
            return JSONResponse(payload, status_code=status)
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"error": "You must be authenticated"}, status_code=401)
        parts = request.url.path.split("/")  # ['', 'v1', 'apps', app, 'machines', id?, op?]
        if parts[3] != APP:
            return JSONResponse({"error": "app not found"}, status_code=404)
        machine_id = parts[5] if len(parts) > 5 else None
        op = parts[6] if len(parts) > 6 else None
        if machine_id is None and request.method == "GET":
            wanted = {k.removeprefix("metadata."): v for k, v in request.query_params.items()}
            return JSONResponse(
                [
                    m
                    for m in self.machines.values()
                    if all(m["config"]["metadata"].get(k) == v for k, v in wanted.items())
                ]
            )
        if machine_id is None:
            new_id = secrets.token_hex(7)
            self.machines[new_id] = {
                "id": new_id,
                "name": body["name"],
                "state": "created",
                "region": body.get("region", "ord"),
                "config": body["config"],
            }
            return JSONResponse(self.machines[new_id])
        if machine_id not in self.machines:
            return JSONResponse({"error": "machine not found"}, status_code=404)
        if op == "stop":
            self.machines[machine_id]["state"] = "stopped"
        elif op == "wait":
            if self.machines[machine_id]["state"] != request.query_params["state"]:
                return JSONResponse({"error": "deadline_exceeded"}, status_code=408)
        else:
            del self.machines[machine_id]
        return JSONResponse({"ok": True})


@pytest.fixture(scope="module")
def served_fly() -> Iterator[FakeFly]:
    """One FakeFly served by uvicorn in a thread on a free loopback port."""
    fake = FakeFly()
    methods = ["GET", "POST", "DELETE"]
    app = Starlette(
        routes=[
            Route("/v1/apps/{app}/machines", fake.handle, methods=methods),
            Route("/v1/apps/{app}/machines/{id}", fake.handle, methods=methods),
            Route("/v1/apps/{app}/machines/{id}/{op}", fake.handle, methods=methods),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake Machines API did not start"
        time.sleep(0.01)
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def fly(served_fly: FakeFly, monkeypatch: pytest.MonkeyPatch) -> FakeFly:
    """The fake API, emptied, with the environment of a user pointing at it."""
    served_fly.machines.clear()
    served_fly.requests.clear()
    served_fly.fail_next = None
    for name in list(os.environ):
        if name.startswith(("FLY_", "TENANTDB_", "TENANT_ID", "CUSTOMER_ID")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLY_API_TOKEN", TOKEN)
    monkeypatch.setenv("FLY_APP_NAME", APP)
    monkeypatch.setenv("TENANTDB_MACHINES_API_URL", served_fly.url)
    # Not a terminal: destroy must not wait for an answer nobody can give.
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return served_fly


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run main(argv); return (exit code, stdout, stderr) and check the token stayed secret."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert TOKEN not in out
    assert TOKEN not in err
    assert "Traceback" not in err
    return code, out, err


# --- parser and usage ---


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "usage: tenantdb" in out
    assert "machines" in out


@pytest.mark.parametrize("sub", ["create", "list", "destroy"])
def test_subcommand_help(capsys: pytest.CaptureFixture[str], sub: str) -> None:
    code, out, _ = run(capsys, "machines", sub, "--help")
    assert code == 0
    assert f"usage: tenantdb machines {sub}" in out
    assert "--app" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.startswith("tenantdb ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["machines"],
        ["machines", "create", "acme"],  # --image is required
        ["machines", "create", "Bad_Tenant", "--image", "img"],
        ["machines", "create", "acme", "--image", "img", "--env", "no-equals-sign"],
        ["machines", "create", "acme", "--image", "img", "--memory-mb", "300"],
        ["machines", "destroy", "-acme", "--yes"],
        ["machines", "list", "--bogus"],
    ],
)
def test_usage_errors_exit_2_without_requests(
    fly: FakeFly, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "usage: tenantdb" in err
    assert out == ""
    assert fly.requests == []


def test_parser_is_built_from_commands() -> None:
    parser = build_parser()
    assert set(COMMANDS) == {"dev", "machines"}
    args = parser.parse_args(["machines", "list", "--json"])
    assert callable(args.handler)
    assert args.json is True


# --- machines create ---


def test_create_end_to_end(fly: FakeFly, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "machines",
        "create",
        "acme",
        "--image",
        "registry.fly.io/app:v1",
        "--region",
        "ams",
        "--memory-mb",
        "512",
        "--env",
        "LOG_LEVEL=debug",
        "--env",
        "EMPTY=",
    )
    assert (code, err) == (0, "")
    [machine_id] = fly.machines
    assert f"created machine {machine_id} for tenant acme" in out
    [lookup] = fly.calls("GET")
    assert lookup[1] == f"/v1/apps/{APP}/machines"
    assert lookup[2] == {"metadata.customer_id": "acme"}
    [(_, path, _, body)] = fly.calls("POST")
    assert path == f"/v1/apps/{APP}/machines"
    assert body["region"] == "ams"
    config = body["config"]
    assert config["image"] == "registry.fly.io/app:v1"
    assert config["metadata"] == {"customer_id": "acme"}
    assert config["env"]["TENANT_ID"] == "acme"
    assert config["env"]["LOG_LEVEL"] == "debug"
    assert config["env"]["EMPTY"] == ""
    assert config["guest"]["memory_mb"] == 512
    [service] = config["services"]
    assert (service["autostop"], service["autostart"]) == ("stop", True)


def test_create_uses_metadata_key_and_kill_timeout_from_env(
    fly: FakeFly, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANTDB_METADATA_KEY", "tenant")
    monkeypatch.setenv("TENANTDB_KILL_TIMEOUT", "45")
    code, _, _ = run(capsys, "machines", "create", "acme", "--image", "img")
    assert code == 0
    assert fly.calls("GET")[0][2] == {"metadata.tenant": "acme"}
    config = fly.calls("POST")[0][3]["config"]
    assert config["metadata"] == {"tenant": "acme"}
    assert config["stop_config"] == {"timeout": 45_000_000_000}


def test_create_refuses_a_second_machine(fly: FakeFly, capsys: pytest.CaptureFixture[str]) -> None:
    existing = fly.add("acme")
    code, out, err = run(capsys, "machines", "create", "acme", "--image", "img")
    assert code == 1
    assert existing in err
    assert "already has" in err
    assert out == ""
    assert fly.calls("POST") == []


def test_create_env_contradicting_tenant_fails(
    fly: FakeFly, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "machines", "create", "acme", "--image", "img", "--env", "TENANT_ID=globex"
    )
    assert code == 1
    assert "TENANT_ID" in err
    assert fly.calls("POST") == []


# --- machines list ---


def test_list_table(fly: FakeFly, capsys: pytest.CaptureFixture[str]) -> None:
    acme = fly.add("acme")
    fly.add("globex", state="stopped")
    code, out, _ = run(capsys, "machines", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "TENANT", "STATE", "REGION", "NAME"]
    assert len(rows) == 2
    assert any(row.split()[:3] == [acme, "acme", "started"] for row in rows)
    assert fly.requests[0][2] == {}


def test_list_json(fly: FakeFly, capsys: pytest.CaptureFixture[str]) -> None:
    acme = fly.add("acme")
    fly.add("globex")
    code, out, _ = run(capsys, "machines", "list", "--json", "--tenant", "acme")
    assert code == 0
    rows = json.loads(out)
    assert [(r["id"], r["tenant"], r["state"], r["region"]) for r in rows] == [
        (acme, "acme", "started", "ams")
    ]
    assert fly.requests[0][2] == {"metadata.customer_id": "acme"}


def test_list_empty(fly: FakeFly, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "machines", "list")
    assert code == 0
    assert "no machines" in out
    code, out, _ = run(capsys, "machines", "list", "--json")
    assert (code, json.loads(out)) == (0, [])


def test_app_and_api_url_flags_override_env(
    fly: FakeFly, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_APP_NAME", "some-other-app")
    monkeypatch.setenv("TENANTDB_MACHINES_API_URL", "http://127.0.0.1:9")
    code, _, _ = run(capsys, "machines", "list", "--app", APP, "--api-url", fly.url)
    assert code == 0
    assert fly.requests[0][1] == f"/v1/apps/{APP}/machines"


# --- machines destroy ---


def test_destroy_stops_gracefully_then_destroys(
    fly: FakeFly, capsys: pytest.CaptureFixture[str]
) -> None:
    running = fly.add("acme")
    fly.add("globex")
    code, out, _ = run(capsys, "machines", "destroy", "acme", "--yes")
    assert code == 0
    assert f"destroyed machine {running}" in out
    assert [(m, p.rsplit("/", 1)[-1]) for m, p, _, _ in fly.requests] == [
        ("GET", "machines"),
        ("POST", "stop"),
        ("GET", "wait"),
        ("DELETE", running),
    ]
    assert fly.calls("DELETE")[0][2] == {"force": "true"}
    assert fly.calls("GET")[1][2]["state"] == "stopped"
    assert [m["name"] for m in fly.machines.values()] == ["globex"]


def test_destroy_stopped_machine_skips_the_stop(
    fly: FakeFly, capsys: pytest.CaptureFixture[str]
) -> None:
    stopped = fly.add("acme", state="stopped")
    code, _, _ = run(capsys, "machines", "destroy", "acme", "--yes")
    assert code == 0
    assert [m for m, *_ in fly.requests] == ["GET", "DELETE"]
    assert stopped not in fly.machines


def test_destroy_force_skips_the_stop(fly: FakeFly, capsys: pytest.CaptureFixture[str]) -> None:
    fly.add("acme")
    code, _, _ = run(capsys, "machines", "destroy", "acme", "--yes", "--force")
    assert code == 0
    assert [m for m, *_ in fly.requests] == ["GET", "DELETE"]
    assert fly.machines == {}


def test_destroy_without_yes_and_no_terminal_refuses(
    fly: FakeFly, capsys: pytest.CaptureFixture[str]
) -> None:
    machine_id = fly.add("acme")
    code, _, err = run(capsys, "machines", "destroy", "acme")
    assert code == 1
    assert "--yes" in err
    assert fly.calls("DELETE") == []
    assert machine_id in fly.machines


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "destroyed"), [("y\n", True), ("n\n", False), ("", False)])
def test_destroy_asks_on_a_terminal(
    fly: FakeFly,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    destroyed: bool,
) -> None:
    machine_id = fly.add("acme", state="stopped")
    monkeypatch.setattr(sys, "stdin", _Terminal(answer))
    code, _, err = run(capsys, "machines", "destroy", "acme")
    assert f"Destroy machine(s) {machine_id} of tenant acme" in err
    assert code == (0 if destroyed else 1)
    assert (machine_id not in fly.machines) is destroyed


def test_destroy_unknown_tenant_fails(fly: FakeFly, capsys: pytest.CaptureFixture[str]) -> None:
    fly.add("globex")
    code, _, err = run(capsys, "machines", "destroy", "acme", "--yes")
    assert code == 1
    assert "no machines for tenant acme" in err
    assert fly.calls("DELETE") == []


# --- failures ---


def test_missing_token_fails_without_request(
    fly: FakeFly, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_API_TOKEN")
    code, _, err = run(capsys, "machines", "list")
    assert code == 1
    assert "FLY_API_TOKEN" in err
    assert fly.requests == []


def test_missing_app_fails_without_request(
    fly: FakeFly, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_APP_NAME")
    code, _, err = run(capsys, "machines", "list")
    assert code == 1
    assert "FLY_APP_NAME" in err
    assert fly.requests == []


def test_wrong_token_is_a_clean_failure(
    fly: FakeFly, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", "not-the-token")
    code, out, err = run(capsys, "machines", "list")
    assert code == 1
    assert out == ""
    assert err.startswith("tenantdb: error:")
    assert "HTTP 401" in err
    assert "not-the-token" not in err


@pytest.mark.parametrize("status", [404, 500])
def test_api_errors_are_clean_failures(
    fly: FakeFly, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    fly.fail_next = (status, {"error": f"boom {TOKEN}"})  # even an echoed token is hidden
    code, _, err = run(capsys, "machines", "create", "acme", "--image", "img")
    assert code == 1
    assert f"HTTP {status}" in err
    assert fly.calls("POST") == []


def test_unreachable_api_is_a_clean_failure(
    fly: FakeFly, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("TENANTDB_MACHINES_API_URL", f"http://127.0.0.1:{closed}")
    code, _, err = run(capsys, "machines", "list")
    assert code == 1
    assert err.startswith("tenantdb: error:")


# --- as a real process ---


def _env(fly: FakeFly) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "TENANTDB_"))}
    env.update(FLY_API_TOKEN=TOKEN, FLY_APP_NAME=APP, TENANTDB_MACHINES_API_URL=fly.url)
    return env


def test_python_m_help_and_usage_error() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "tenantdb.cli", "--help"], capture_output=True, text=True
    )
    assert ok.returncode == 0
    assert "usage: tenantdb" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tenantdb.cli", "machines", "frobnicate"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr


def test_python_m_create_then_list(fly: FakeFly) -> None:
    cmd = [sys.executable, "-m", "tenantdb.cli", "machines"]
    created = subprocess.run(
        [*cmd, "create", "acme", "--image", "img", "--region", "fra"],
        capture_output=True,
        text=True,
        env=_env(fly),
        stdin=subprocess.DEVNULL,
    )
    assert created.returncode == 0, created.stderr
    listed = subprocess.run(
        [*cmd, "list", "--json"],
        capture_output=True,
        text=True,
        env=_env(fly),
        stdin=subprocess.DEVNULL,
    )
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["tenant"], row["region"]) == ("acme", "fra")
    for proc in (created, listed):
        assert TOKEN not in proc.stdout + proc.stderr
