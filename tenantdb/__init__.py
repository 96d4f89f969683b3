"""tenantdb: one SQLite database per tenant, one Fly Machine per tenant."""

from tenantdb.asgi.middleware import TenantDBMiddleware, tenant_db, tenant_db_dependency
from tenantdb.asgi.replica_reads import bookmark_of, is_read_method
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
from tenantdb.machine.replica import BOOKMARK_HEADER, Bookmark
from tenantdb.machine.supervisor import Health
from tenantdb.tenants import TenantPattern, validate_tenant

__all__ = [
    "BOOKMARK_HEADER",
    "Bookmark",
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
    "bookmark_of",
    "is_read_method",
    "tenant_db",
    "tenant_db_dependency",
    "validate_tenant",
]
