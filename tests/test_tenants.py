"""Tenant ids and the path pattern that carries them."""

from __future__ import annotations

import pytest

from tenantdb.errors import ConfigurationError, InvalidTenantError
from tenantdb.tenants import TenantPattern, validate_tenant


@pytest.mark.parametrize("tenant", ["a", "100", "acme-corp", "a" * 63, "0-0"])
def test_dns_labels_are_valid_tenant_ids(tenant: str) -> None:
    assert validate_tenant(tenant) == tenant


@pytest.mark.parametrize(
    ("tenant", "reason"),
    [
        ("", "empty"),
        ("a" * 64, "longer than 63"),
        ("Acme", "lowercase"),
        ("-acme", "start and end"),
        ("acme-", "start and end"),
        ("ac.me", "only lowercase letters"),
        ("ac_me", "only lowercase letters"),
        ("äcme", "only lowercase letters"),
    ],
)
def test_invalid_ids_say_why(tenant: str, reason: str) -> None:
    with pytest.raises(InvalidTenantError, match=reason):
        validate_tenant(tenant)


@pytest.mark.parametrize(
    ("path", "segment"),
    [
        ("/customers/100", "100"),
        ("/customers/100/", "100"),
        ("/customers/100/orders/7", "100"),
        ("/customers/", None),
        ("/customers", None),
        ("/customersX/100", None),
        ("/other/100", None),
    ],
)
def test_the_default_pattern_matches_the_path_and_below(path: str, segment: str | None) -> None:
    assert TenantPattern().segment(path) == segment


def test_a_custom_pattern_with_a_suffix() -> None:
    pattern = TenantPattern("/t/{tenant}/api")
    assert pattern.segment("/t/acme/api/items") == "acme"
    assert pattern.segment("/t/acme/other") is None
    assert pattern.prefix("acme") == "/t/acme"


@pytest.mark.parametrize(
    "bad", ["customers/{tenant}", "/c/{tenant}/{tenant}", "/c/x{tenant}", "/c"]
)
def test_patterns_that_cannot_work_are_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        TenantPattern(bad)
