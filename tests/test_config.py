"""Settings from the environment: names, aliases, validation, secrets."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tenantdb.config import Secret, Settings
from tenantdb.errors import ConfigurationError


def test_defaults_without_any_environment() -> None:
    settings = Settings.from_env({})
    assert settings.tenant is None
    assert settings.bucket_name is None  # the embedded local bucket
    assert settings.data_dir == Path(".tenantdb/data")
    assert settings.local_bucket_dir == Path(".tenantdb/bucket")
    assert (settings.lease_ttl, settings.checkpoint_interval) == (15.0, 86400.0)
    assert settings.sync_interval == 1.0
    assert settings.metadata_key == "customer_id"
    assert settings.machine_id.startswith("local-")


def test_fly_and_bucket_variables_are_read() -> None:
    settings = Settings.from_env(
        {
            "CUSTOMER_ID": "acme",
            "BUCKET_NAME": "tenants-bucket",
            "AWS_ENDPOINT_URL_S3": "https://fly.storage.tigris.dev",
            "AWS_REGION": "auto",
            "FLY_MACHINE_ID": "148e21ea7e5589",
            "FLY_REGION": "ams",
            "FLY_APP_NAME": "demo",
            "TENANTDB_DNS_SERVER": "[::1]:5353",
            "TENANTDB_PREFIX": "prod",
        }
    )
    assert settings.tenant == "acme"  # CUSTOMER_ID is an alias of TENANT_ID
    assert (settings.region, settings.machine_id, settings.fly_region) == (
        "auto",
        "148e21ea7e5589",
        "ams",
    )
    assert settings.dns_server == ("::1", 5353)
    assert settings.prefix == "prod/"
    assert settings.is_tigris


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TENANTDB_LEASE_TTL": "soon"},
            "TENANTDB_LEASE_TTL='soon' is not a number; allowed: a number of seconds, at least 3",
        ),
        (
            {"TENANTDB_LEASE_TTL": "1"},
            "TENANTDB_LEASE_TTL='1' is out of range; allowed: a number of seconds, at least 3",
        ),
        ({"TENANTDB_LEASE_TTL": "inf"}, "TENANTDB_LEASE_TTL='inf' is out of range"),
        ({"TENANTDB_CHECKPOINT_INTERVAL": "-5"}, "TENANTDB_CHECKPOINT_INTERVAL='-5' is out of"),
        (
            {"TENANTDB_DNS_SERVER": "localhost"},
            "TENANTDB_DNS_SERVER='localhost' is not host:port; allowed: host:port, such as",
        ),
        ({"TENANTDB_RETENTION": "a week"}, "TENANTDB_RETENTION='a week' is not a duration"),
        ({"PORT": "http"}, "PORT='http' is not a number; allowed: a TCP port"),
        ({"TENANTDB_POOL_SIZE": "0"}, "TENANTDB_POOL_SIZE='0' is out of range; allowed: a whole"),
        (
            {"TENANT_ID": "Acme"},
            "TENANT_ID='Acme' is not a tenant id (tenant ids are lowercase); "
            "allowed: a lowercase DNS label",
        ),
        ({"CUSTOMER_ID": "a.b"}, "CUSTOMER_ID='a.b' is not a tenant id"),
        (
            {"TENANTDB_REPLICA_READS": "maybe"},
            "TENANTDB_REPLICA_READS='maybe' is not on or off; allowed: 1 or 0",
        ),
        ({"TENANTDB_MAX_REPLICA_LAG": "0"}, "TENANTDB_MAX_REPLICA_LAG='0' is out of range"),
        ({"TENANTDB_READ_WAIT": "-1"}, "TENANTDB_READ_WAIT='-1' is out of range"),
        ({"TENANTDB_TAIL_HINTS": "maybe"}, "TENANTDB_TAIL_HINTS='maybe' is not on or off"),
    ],
)
def test_bad_values_name_the_variable_the_value_and_what_is_allowed(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env(env)
    assert str(raised.value).startswith(message)
    assert raised.value.variable == next(iter(env))
    assert "\n" not in str(raised.value)


def test_replica_reads_are_off_unless_asked_for_with_their_bounds() -> None:
    off = Settings.from_env({})
    assert (off.replica_reads, off.max_replica_lag, off.read_wait) == (False, 5.0, 1.0)
    on = Settings.from_env(
        {
            "TENANTDB_REPLICA_READS": "1",
            "TENANTDB_MAX_REPLICA_LAG": "2.5",
            "TENANTDB_READ_WAIT": "0",
        }
    )
    assert (on.replica_reads, on.max_replica_lag, on.read_wait) == (True, 2.5, 0.0)
    assert Settings.from_env({"TENANTDB_REPLICA_READS": "off"}).replica_reads is False


def test_tail_hints_are_on_unless_turned_off_and_ask_the_private_address() -> None:
    on = Settings.from_env({})
    assert on.tail_hints is True
    assert on.hint_url == "http://{machine_id}.vm.{app}.internal:{port}"
    off = Settings.from_env(
        {"TENANTDB_TAIL_HINTS": "0", "TENANTDB_HINT_URL": "http://127.0.0.1:{machine_id}"}
    )
    assert (off.tail_hints, off.hint_url) == (False, "http://127.0.0.1:{machine_id}")


def test_secrets_never_show_and_cannot_be_pickled() -> None:
    settings = Settings.from_env(
        {"AWS_SECRET_ACCESS_KEY": "s3cr3t-key-value", "FLY_API_TOKEN": "fly-token-value"}
    )
    for text in (repr(settings), str(settings), repr(settings.secret_access_key)):
        assert "s3cr3t-key-value" not in text
        assert "fly-token-value" not in text
    assert settings.secret_access_key == Secret("s3cr3t-key-value")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(settings.fly_api_token)


def test_metrics_listen_on_the_apps_interface_unless_told() -> None:
    assert Settings.from_env({}).metrics_host == "127.0.0.1"  # `uvicorn notes:app` is loopback
    assert Settings.from_env({"HOST": "::"}).metrics_host == "::"  # the app's family and host
    # On Fly, Fly's scraper reaches 0.0.0.0 (its docs say to listen there).
    assert Settings.from_env({"FLY_APP_NAME": "notes"}).metrics_host == "0.0.0.0"
    told = {"HOST": "0.0.0.0", "TENANTDB_METRICS_HOST": "127.0.0.1"}
    assert Settings.from_env(told).metrics_host == "127.0.0.1"


@pytest.mark.parametrize("retention", ["0", "59s"])
def test_retention_below_floor_is_refused_or_raised(retention: str) -> None:
    # 4 lease TTLs of 15 s: a resumed old holder's GC could delete a new holder's uploads.
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"TENANTDB_RETENTION": retention, "TENANTDB_LEASE_TTL": "15"})
    assert "floor of 60s" in str(raised.value)
    assert raised.value.variable == "TENANTDB_RETENTION"
    assert Settings.from_env({"TENANTDB_RETENTION": "60s"}).retention == 60


def test_a_lease_ttl_of_hours_is_refused_as_a_slip() -> None:
    with pytest.raises(ConfigurationError, match=r"lease TTL 86400s is too long \(maximum 3600s\)"):
        Settings.from_env({"TENANTDB_LEASE_TTL": "86400"})
    assert Settings.from_env({"TENANTDB_LEASE_TTL": "3600"}).lease_ttl == 3600.0
