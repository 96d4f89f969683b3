"""tenantdb: one SQLite database per tenant, one Fly Machine per tenant."""

from tenantdb.asgi.middleware import TenantDBMiddleware, tenant_db, tenant_db_dependency
from tenantdb.config import Secret, Settings
from tenantdb.errors import (
    ConfigurationError,
    InvalidTenantError,
    LeaseError,
    SnapshotError,
    StorageError,
    TenantDBError,
)
from tenantdb.machine.database import Migration, TenantDB, apply_migrations
from tenantdb.machine.supervisor import Health
from tenantdb.tenants import TenantPattern, validate_tenant

__all__ = [
    "ConfigurationError",
    "Health",
    "InvalidTenantError",
    "LeaseError",
    "Migration",
    "Secret",
    "Settings",
    "SnapshotError",
    "StorageError",
    "TenantDB",
    "TenantDBError",
    "TenantDBMiddleware",
    "TenantPattern",
    "apply_migrations",
    "tenant_db",
    "tenant_db_dependency",
    "validate_tenant",
]
