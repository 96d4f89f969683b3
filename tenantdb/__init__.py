"""tenantdb: one SQLite database per tenant, one Fly Machine per tenant."""

from tenantdb.config import Secret, Settings
from tenantdb.errors import (
    ConfigurationError,
    InvalidTenantError,
    LeaseError,
    SnapshotError,
    StorageError,
    TenantDBError,
)
from tenantdb.tenants import TenantPattern, validate_tenant

__all__ = [
    "ConfigurationError",
    "InvalidTenantError",
    "LeaseError",
    "Secret",
    "Settings",
    "SnapshotError",
    "StorageError",
    "TenantDBError",
    "TenantPattern",
    "validate_tenant",
]
