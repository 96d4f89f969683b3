"""The `tenantdb` command end to end, against a fake Machines API on loopback."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tenantdb.cli.dev import dev_cluster_config
from tenantdb.cli.main import COMMANDS, build_parser, main
from tenantdb.errors import ConfigurationError
from tests.support.fake_machines import FakeMachinesAPI, serve_fake_machines
from tests.support.servers import free_port

TOKEN = "fo1_CLI-SECRET-token-93b1e0"
APP = "cli-test-app"


@pytest.fixture(scope="module")
def served_fly() -> Iterator[FakeMachinesAPI]:
    """One fake Machines API for the module, served on a free loopback port."""
    with serve_fake_machines(APP, TOKEN) as fake:
        yield fake


@pytest.fixture
def fly(
    served_fly: FakeMachinesAPI, clean_environment: None, monkeypatch: pytest.MonkeyPatch
) -> FakeMachinesAPI:
    """The fake API, emptied, with the environment of a user pointing at it."""
    served_fly.reset()
    monkeypatch.setenv("FLY_API_TOKEN", TOKEN)
    monkeypatch.setenv("FLY_APP_NAME", APP)
    monkeypatch.setenv("TENANTDB_MACHINES_API_URL", served_fly.base_url)
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
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "usage: tenantdb" in err
    assert out == ""
    assert fly.requests == []


def test_parser_is_built_from_commands() -> None:
    parser = build_parser()
    assert set(COMMANDS) == {
        "dev",
        "doctor",
        "history",
        "keys",
        "init",
        "machines",
        "migrate",
        "query",
        "restore",
        "rollback",
        "serve",
        "status",
        "tenants",
        "verify",
    }
    args = parser.parse_args(["machines", "list", "--json"])
    assert callable(args.handler)
    assert args.json is True


# --- machines create ---


def test_create_end_to_end(fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert lookup.path == f"/v1/apps/{APP}/machines"
    assert lookup.query == {"metadata.customer_id": "acme"}
    [create] = fly.calls("POST")
    assert create.path == f"/v1/apps/{APP}/machines"
    assert create.body["region"] == "ams"
    config = create.body["config"]
    assert config["image"] == "registry.fly.io/app:v1"
    assert config["metadata"] == {"customer_id": "acme"}
    assert config["env"]["TENANT_ID"] == "acme"
    assert config["env"]["LOG_LEVEL"] == "debug"
    assert config["env"]["EMPTY"] == ""
    assert config["guest"]["memory_mb"] == 512
    [service] = config["services"]
    assert (service["autostop"], service["autostart"]) == ("stop", True)


def test_create_uses_metadata_key_and_kill_timeout_from_env(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANTDB_METADATA_KEY", "tenant")
    monkeypatch.setenv("TENANTDB_KILL_TIMEOUT", "45")
    code, _, _ = run(capsys, "machines", "create", "acme", "--image", "img")
    assert code == 0
    assert fly.calls("GET")[0].query == {"metadata.tenant": "acme"}
    config = fly.calls("POST")[0].body["config"]
    assert config["metadata"] == {"tenant": "acme"}
    assert config["stop_config"] == {"timeout": 45_000_000_000}


def test_create_gives_the_machine_a_metrics_config_for_fly_to_scrape(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANTDB_METRICS_PORT", "9300")
    code, _, _ = run(capsys, "machines", "create", "acme", "--image", "img")
    assert code == 0
    assert fly.calls("POST")[0].body["config"]["metrics"] == {"port": 9300, "path": "/metrics"}


def test_create_refuses_a_second_machine(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = fly.add("acme")
    code, out, err = run(capsys, "machines", "create", "acme", "--image", "img")
    assert code == 1
    assert existing in err
    assert "already has" in err
    assert out == ""
    assert fly.calls("POST") == []


def test_create_replica_adds_a_read_replica_to_a_tenant_with_a_machine(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "machines", "create", "acme", "--image", "img", "--replica")
    assert code == 1
    assert "create its first one without --replica" in err
    assert fly.calls("POST") == []
    fly.add("acme")
    code, out, err = run(
        capsys, "machines", "create", "acme", "--image", "img", "--replica", "--region", "fra"
    )
    assert (code, err) == (0, "")
    assert "created replica machine" in out
    assert "every machine of the tenant needs TENANTDB_REPLICA_READS=1" in out
    [create] = fly.calls("POST")
    assert create.body["region"] == "fra"
    assert create.body["config"]["env"]["TENANTDB_REPLICA_READS"] == "1"
    assert create.body["config"]["metadata"] == {"customer_id": "acme"}


def test_create_env_contradicting_tenant_fails(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "machines", "create", "acme", "--image", "img", "--env", "TENANT_ID=globex"
    )
    assert code == 1
    assert "TENANT_ID" in err
    assert fly.calls("POST") == []


# --- machines list ---


def test_list_table(fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]) -> None:
    acme = fly.add("acme")
    fly.add("globex", state="stopped")
    code, out, _ = run(capsys, "machines", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "TENANT", "STATE", "REGION", "NAME"]
    assert len(rows) == 2
    assert any(row.split()[:3] == [acme, "acme", "started"] for row in rows)
    assert fly.requests[0].query == {}


def test_list_json(fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]) -> None:
    acme = fly.add("acme")
    fly.add("globex")
    code, out, _ = run(capsys, "machines", "list", "--json", "--tenant", "acme")
    assert code == 0
    rows = json.loads(out)
    assert [(r["id"], r["tenant"], r["state"], r["region"]) for r in rows] == [
        (acme, "acme", "started", "ams")
    ]
    assert fly.requests[0].query == {"metadata.customer_id": "acme"}


def test_list_empty(fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "machines", "list")
    assert code == 0
    assert "no machines" in out
    code, out, _ = run(capsys, "machines", "list", "--json")
    assert (code, json.loads(out)) == (0, [])


def test_app_and_api_url_flags_override_env(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_APP_NAME", "some-other-app")
    monkeypatch.setenv("TENANTDB_MACHINES_API_URL", "http://127.0.0.1:9")
    code, _, _ = run(capsys, "machines", "list", "--app", APP, "--api-url", fly.base_url)
    assert code == 0
    assert fly.requests[0].path == f"/v1/apps/{APP}/machines"


# --- machines destroy ---


def test_destroy_stops_gracefully_then_destroys(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    running = fly.add("acme")
    fly.add("globex")
    code, out, _ = run(capsys, "machines", "destroy", "acme", "--yes")
    assert code == 0
    assert f"destroyed machine {running}" in out
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in fly.requests] == [
        ("GET", "machines"),
        ("POST", "stop"),
        ("GET", "wait"),
        ("DELETE", running),
    ]
    assert fly.calls("DELETE")[0].query == {"force": "true"}
    assert fly.calls("GET")[1].query["state"] == "stopped"
    assert [m["name"] for m in fly.machines.values()] == ["globex"]


def test_destroy_stopped_machine_skips_the_stop(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    stopped = fly.add("acme", state="stopped")
    code, _, _ = run(capsys, "machines", "destroy", "acme", "--yes")
    assert code == 0
    assert [r.method for r in fly.requests] == ["GET", "DELETE"]
    assert stopped not in fly.machines


def test_destroy_force_skips_the_stop(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    fly.add("acme")
    code, _, _ = run(capsys, "machines", "destroy", "acme", "--yes", "--force")
    assert code == 0
    assert [r.method for r in fly.requests] == ["GET", "DELETE"]
    assert fly.machines == {}


def test_destroy_without_yes_and_no_terminal_refuses(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]
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
    fly: FakeMachinesAPI,
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


def test_destroy_unknown_tenant_fails(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    fly.add("globex")
    code, _, err = run(capsys, "machines", "destroy", "acme", "--yes")
    assert code == 1
    assert "no machines for tenant acme" in err
    assert fly.calls("DELETE") == []


# --- failures ---


def test_missing_token_fails_without_request(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_API_TOKEN")
    code, _, err = run(capsys, "machines", "list")
    assert code == 1
    assert "FLY_API_TOKEN" in err
    assert fly.requests == []


def test_missing_app_fails_without_request(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_APP_NAME")
    code, _, err = run(capsys, "machines", "list")
    assert code == 1
    assert "FLY_APP_NAME" in err
    assert fly.requests == []


def test_every_missing_setting_is_reported_at_once(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_APP_NAME")
    monkeypatch.delenv("FLY_API_TOKEN")
    code, _, err = run(capsys, "machines", "list")
    assert code == 1
    assert "FLY_APP_NAME" in err
    assert "FLY_API_TOKEN" in err
    assert err.count("\n") == 1  # one line
    assert fly.requests == []


@pytest.mark.parametrize("subcommand", ["create", "list", "destroy"])
def test_machines_help_names_the_variables_it_needs(
    capsys: pytest.CaptureFixture[str], subcommand: str
) -> None:
    code, out, _ = run(capsys, "machines", subcommand, "--help")
    assert code == 0
    assert "FLY_API_TOKEN" in out
    assert "FLY_APP_NAME" in out


def test_wrong_token_is_a_clean_failure(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
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
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    fly.fail_next = (status, {"error": f"boom {TOKEN}"})  # even an echoed token is hidden
    code, _, err = run(capsys, "machines", "create", "acme", "--image", "img")
    assert code == 1
    assert f"HTTP {status}" in err
    assert fly.calls("POST") == []


def test_unreachable_api_is_a_clean_failure(
    fly: FakeMachinesAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANTDB_MACHINES_API_URL", f"http://127.0.0.1:{free_port()}")
    code, _, err = run(capsys, "machines", "list")
    assert code == 1
    assert err.startswith("tenantdb: error:")


# --- as a real process ---


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


def test_python_m_create_then_list(fly: FakeMachinesAPI, subprocess_env: dict[str, str]) -> None:
    env = {
        **subprocess_env,
        "FLY_API_TOKEN": TOKEN,
        "FLY_APP_NAME": APP,
        "TENANTDB_MACHINES_API_URL": fly.base_url,
    }
    cmd = [sys.executable, "-m", "tenantdb.cli", "machines"]
    created = subprocess.run(
        [*cmd, "create", "acme", "--image", "img", "--region", "fra"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert created.returncode == 0, created.stderr
    listed = subprocess.run(
        [*cmd, "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["tenant"], row["region"]) == ("acme", "fra")
    for proc in (created, listed):
        assert TOKEN not in proc.stdout + proc.stderr


def test_dev_replicas_per_tenant_runs_replicas_beside_each_holder() -> None:
    parser = build_parser()
    config = dev_cluster_config(parser.parse_args(["dev", "--replicas-per-tenant", "2"]))
    assert config.machines_per_tenant == 3
    assert config.env["TENANTDB_REPLICA_READS"] == "1"
    plain = dev_cluster_config(parser.parse_args(["dev", "--machines-per-tenant", "2"]))
    assert "TENANTDB_REPLICA_READS" not in plain.env
    both = parser.parse_args(["dev", "--replicas-per-tenant", "1", "--machines-per-tenant", "3"])
    with pytest.raises(ConfigurationError, match="leave out --machines-per-tenant"):
        dev_cluster_config(both)


def test_dev_regions_and_the_latency_between_them() -> None:
    parser = build_parser()
    args = ["dev", "--regions", "ams,fra", "--region-latency-ms", "200"]
    config = dev_cluster_config(parser.parse_args(args))
    assert (config.regions, config.latency.one_way) == (("ams", "fra"), 0.2)
    default = dev_cluster_config(parser.parse_args(["dev", "--region", "ams"]))
    assert (default.regions, default.latency.one_way) == (("ams",), 0.03)
    for bad in (["--regions", "ams,ams"], ["--regions", "AMS"], ["--region-latency-ms", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["dev", *bad])
