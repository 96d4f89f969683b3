"""The fleet verbs' errors, under ``TenantDBError`` like every other."""

from __future__ import annotations

from tenantdb.errors import TenantDBError

__all__ = ["FleetError", "TenantExistsError", "UnknownTenantError"]


class FleetError(TenantDBError):
    """A fleet verb cannot do what it was asked (tenant: the one it was about)."""

    def __init__(self, message: str, *, tenant: str) -> None:
        self.tenant = tenant
        super().__init__(message)


class TenantExistsError(FleetError):
    """The tenant to create already has objects in the bucket."""


class UnknownTenantError(FleetError):
    """The bucket holds nothing of the tenant named."""
