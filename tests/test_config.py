"""Settings from the environment: names, aliases, validation, secrets."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tenantdb.config import Secret, Settings
from tenantdb.errors import ConfigurationError, InvalidTenantError


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
        ({"TENANTDB_LEASE_TTL": "soon"}, "TENANTDB_LEASE_TTL='soon' is not a number"),
        ({"TENANTDB_LEASE_TTL": "1"}, "must be at least 3"),
        ({"TENANTDB_CHECKPOINT_INTERVAL": "-5"}, "must be at least 0"),
        ({"TENANTDB_DNS_SERVER": "localhost"}, "must be host:port"),
        ({"PORT": "http"}, "PORT='http' is not a number"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


def test_an_invalid_tenant_id_is_refused_at_startup() -> None:
    with pytest.raises(InvalidTenantError, match="lowercase"):
        Settings.from_env({"TENANT_ID": "Acme"})


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
