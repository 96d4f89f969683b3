"""Tenant ids and the URL pattern that carries them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tenantdb.errors import ConfigurationError, InvalidTenantError

__all__ = ["TENANT_ID_RULE", "TenantPattern", "validate_tenant"]

MAX_TENANT_LENGTH = 63
_TENANT_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PLACEHOLDER = "{tenant}"
# What a valid id looks like, for error messages that say what to use instead.
TENANT_ID_RULE = "a lowercase DNS label: a-z, 0-9 and inner hyphens, 1 to 63 characters"


def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is a valid id, else raise ``InvalidTenantError``.

    A tenant id becomes a DNS label and a bucket key, so it must be lowercase letters,
    digits and inner hyphens, 1 to 63 characters.
    """
    if _TENANT_RE.fullmatch(tenant):
        return tenant
    if not tenant:
        reason = "it is empty"
    elif len(tenant) > MAX_TENANT_LENGTH:
        reason = f"it is longer than {MAX_TENANT_LENGTH} characters"
    elif tenant.lower() != tenant and _TENANT_RE.fullmatch(tenant.lower()):
        reason = "tenant ids are lowercase"
    elif tenant.startswith("-") or tenant.endswith("-"):
        reason = "it must start and end with a letter or digit"
    else:
        reason = "only lowercase letters, digits and inner hyphens are allowed"
    raise InvalidTenantError(tenant, reason)


@dataclass(frozen=True)
class TenantPattern:
    """A path pattern such as ``/customers/{tenant}``, matching that path and all below it."""

    pattern: str = "/customers/{tenant}"
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pattern.startswith("/") or self.pattern.count(_PLACEHOLDER) != 1:
            raise ConfigurationError(
                f"tenant path pattern {self.pattern!r} must start with '/' and contain "
                f"{_PLACEHOLDER} exactly once"
            )
        before, after = self.pattern.split(_PLACEHOLDER)
        if not before.endswith("/") or (after and not after.startswith("/")):
            raise ConfigurationError(
                f"tenant path pattern {self.pattern!r}: {_PLACEHOLDER} must be a whole segment"
            )
        regex = re.compile(
            f"{re.escape(before)}(?P<tenant>[^/]+){re.escape(after.rstrip('/'))}(?:/.*)?",
            re.DOTALL,
        )
        object.__setattr__(self, "_regex", regex)

    def segment(self, path: str) -> str | None:
        """Return the raw tenant segment of ``path``, or None if it is not a tenant path."""
        match = self._regex.fullmatch(path)
        return match["tenant"] if match else None

    def prefix(self, tenant: str) -> str:
        """Return the path prefix of ``tenant``'s URLs (for fly-replay-cache)."""
        before, _ = self.pattern.split(_PLACEHOLDER)
        return f"{before}{tenant}"
