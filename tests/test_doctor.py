"""`tenantdb doctor` end to end: moto's S3, a store that ignores conditional writes, the
fake Machines API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tenantdb.cli.checks import check_consistency
from tenantdb.cli.main import main
from tenantdb.config import Settings
from tenantdb.dev.dns_server import DevDNSServer
from tests.conftest import create_s3_bucket
from tests.support.careless_s3 import careless_s3
from tests.support.fake_machines import FakeMachinesAPI, serve_fake_machines
from tests.support.s3_server import s3_env

TOKEN = "fo1_DOCTOR-SECRET-token-5d2a"
APP = "doctor-app"
pytestmark = pytest.mark.usefixtures("clean_environment")


def doctor(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> tuple[int, dict[str, dict[str, str]], str]:
    """Run `tenantdb doctor --json` in ``env``; return the exit code, checks by name, text."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["doctor", "--json"])
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    report = json.loads(out)
    assert report["ok"] is (code == 0)
    checks = {c["check"]: c for c in report["checks"]}
    assert main(["doctor"]) == code  # the same checks as text, one line each
    text = capsys.readouterr().out
    assert len(text.splitlines()) == len(checks)
    return code, checks, text


@pytest.fixture
def moto_env(s3_endpoint: str) -> dict[str, str]:
    return s3_env(create_s3_bucket(s3_endpoint), s3_endpoint)


@pytest.fixture
def fly() -> Iterator[FakeMachinesAPI]:
    with serve_fake_machines(APP, TOKEN) as fake:
        yield fake


def fly_env(fake: FakeMachinesAPI) -> dict[str, str]:
    return {
        "FLY_API_TOKEN": TOKEN,
        "FLY_APP_NAME": APP,
        "TENANTDB_MACHINES_API_URL": fake.base_url,
    }


def good_machine(fake: FakeMachinesAPI, tenant: str, **config: Any) -> str:
    """A machine configured the way `tenantdb machines create` makes one."""
    machine_id = fake.add(tenant, stop_timeout=30_000_000_000)
    fake.machines[machine_id]["config"].update(
        {
            "image": "registry.fly.io/app:v2",
            "metrics": {"port": 9091, "path": "/metrics"},
            "restart": {"policy": "on-failure", "max_retries": 10},
            "services": [{"internal_port": 8080, "autostop": "stop", "autostart": True}],
            **config,
        }
    )
    return machine_id


def test_a_healthy_bucket_passes_and_fly_checks_say_why_they_were_skipped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, moto_env: dict[str, str]
) -> None:
    code, checks, text = doctor(capsys, monkeypatch, moto_env)
    assert code == 0
    assert checks["bucket"]["status"] == "pass"
    assert "addressing='path'" in checks["bucket"]["detail"]
    assert checks["conditional writes"]["status"] == "pass"
    assert checks["consistency"]["status"] == "pass"
    for name in ("stop timeout", "metrics", "images", "flycast"):
        assert checks[name]["status"] == "skip"
        assert checks[name]["detail"]
    assert "FLY_API_TOKEN" in checks["stop timeout"]["detail"]
    assert text.startswith("ok    bucket: ")


def test_a_store_that_ignores_if_none_match_fails_with_what_to_do(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with careless_s3(ignores={"if-none-match"}) as endpoint:
        code, checks, text = doctor(capsys, monkeypatch, s3_env("careless", endpoint))
    assert code == 1
    assert checks["bucket"]["status"] == "pass"
    failed = checks["conditional writes"]
    assert failed["status"] == "fail"
    assert "If-None-Match" in failed["detail"]
    assert "enforces If-Match and If-None-Match" in failed["fix"]
    assert "FAIL  conditional writes: " in text


def test_a_missing_bucket_fails_and_the_checks_that_need_it_are_skipped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, s3_endpoint: str
) -> None:
    code, checks, _ = doctor(capsys, monkeypatch, s3_env("no-such-bucket", s3_endpoint))
    assert code == 1
    assert checks["bucket"]["status"] == "fail"
    assert "NoSuchBucket" in checks["bucket"]["detail"]
    assert "the bucket must exist" in checks["bucket"]["fix"]
    assert checks["conditional writes"]["status"] == "skip"
    assert checks["consistency"]["status"] == "skip"


def test_without_bucket_name_the_bucket_check_fails_and_nothing_is_created(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    code, checks, _ = doctor(capsys, monkeypatch, {})
    assert code == 1
    assert checks["bucket"]["status"] == "fail"
    assert "BUCKET_NAME is not set" in checks["bucket"]["detail"]
    assert "fly storage create" in checks["bucket"]["fix"]
    assert checks["conditional writes"]["status"] == "skip"
    assert list(tmp_path.iterdir()) == []


def test_well_configured_machines_pass_every_machine_check(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    moto_env: dict[str, str],
    fly: FakeMachinesAPI,
) -> None:
    good_machine(fly, "acme")
    good_machine(fly, "globex")
    code, checks, _ = doctor(capsys, monkeypatch, {**moto_env, **fly_env(fly)})
    assert code == 0, checks
    for name in ("stop timeout", "autostop", "metrics", "restart policy", "metadata key"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["images"]["detail"] == "all 2 machine(s) run registry.fly.io/app:v2"


def test_each_machine_misconfiguration_is_its_own_failing_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    moto_env: dict[str, str],
    fly: FakeMachinesAPI,
) -> None:
    good_machine(fly, "acme")
    good_machine(fly, "beta")
    odd = good_machine(
        fly,
        "globex",
        image="registry.fly.io/app:v1",
        stop_config={"timeout": "5s"},
        services=[{"internal_port": 8080, "autostop": "suspend"}],
        restart={"policy": "always"},
    )
    del fly.machines[odd]["config"]["metrics"]
    unnamed = good_machine(fly, None)
    code, checks, _ = doctor(capsys, monkeypatch, {**moto_env, **fly_env(fly)})
    assert code == 1
    expected = {
        "stop timeout": (odd, "stop_config timeout"),
        "autostop": (odd, "--autostop=stop"),
        "metrics": (odd, "config.metrics"),
        "restart policy": (odd, "--restart on-fail"),
        "metadata key": (unnamed, "--metadata customer_id=<tenant>"),
        "images": (odd, "registry.fly.io/app:v2"),
    }
    for name, (machine_id, fix) in expected.items():
        assert checks[name]["status"] == "fail", checks[name]
        assert machine_id in checks[name]["detail"], checks[name]
        assert fix in checks[name]["fix"], checks[name]


def test_a_failing_machines_api_is_reported_and_its_checks_skipped(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    moto_env: dict[str, str],
    fly: FakeMachinesAPI,
) -> None:
    env = {**moto_env, **fly_env(fly), "FLY_API_TOKEN": "fo1_wrong-token"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["doctor", "--json"]) == 1
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["machines api"]["status"] == "fail"
    assert "401" in checks["machines api"]["detail"]
    assert checks["images"]["status"] == "skip"


TIGRIS = {"AWS_ENDPOINT_URL_S3": "https://fly.storage.tigris.dev"}


@pytest.mark.parametrize(
    ("env", "regions", "status"),
    [
        # Tenants each in one region, different ones: each lease stays where it is written.
        (TIGRIS, {"acme": {"ams"}, "globex": {"iad"}}, "pass"),
        (TIGRIS, {"acme": {"ams", "iad"}}, "fail"),
        ({**TIGRIS, "TENANTDB_BUCKET_CONSISTENCY": "strong"}, {"acme": {"ams", "iad"}}, "warn"),
        (TIGRIS, None, "warn"),
        (
            {"AWS_ENDPOINT_URL_S3": "https://s3.eu-west-3.amazonaws.com"},
            {"acme": {"ams", "iad"}},
            "pass",
        ),
    ],
)
def test_consistency_is_judged_by_the_regions_of_each_tenant(
    env: dict[str, str], regions: dict[str, set[str]] | None, status: str
) -> None:
    result = check_consistency(Settings.from_env(env), regions)
    assert result.status == status, result
    if status in ("fail", "warn"):
        assert "Single-region or Multi-region" in result.fix


@pytest.mark.parametrize("allocated", [True, False])
def test_flycast_is_checked_where_fly_dns_answers(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    moto_env: dict[str, str],
    allocated: bool,
) -> None:
    with DevDNSServer(APP).run_in_thread() as dns:
        if allocated:
            dns.add_record(f"{APP}.flycast.", "AAAA", "fdaa:0:1::ff")
        env = {**moto_env, "FLY_APP_NAME": APP, "TENANTDB_DNS_SERVER": "{}:{}".format(*dns.address)}
        code, checks, _ = doctor(capsys, monkeypatch, env)
    assert checks["flycast"]["status"] == ("pass" if allocated else "fail")
    assert code == (0 if allocated else 1)
    if not allocated:
        assert "fly ips allocate-v6 --private" in checks["flycast"]["fix"]
