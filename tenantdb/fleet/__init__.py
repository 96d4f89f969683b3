"""The fleet verbs: create, fork, export, purge, query and migrate tenants in the bucket.

Each job is one module (``create``, ``export``, ``purge``, ``query``, ``migrate``); none
touches a live machine's files, and every write is conditional.
"""

from __future__ import annotations

from tenantdb.fleet.create import CreatedTenant, create_tenant
from tenantdb.fleet.errors import FleetError, TenantExistsError, UnknownTenantError
from tenantdb.fleet.export import ExportFormat, ExportResult, export_tenant
from tenantdb.fleet.migrate import MigrateResult, migrate_tenant
from tenantdb.fleet.purge import PurgeReceipt, purge_tenant
from tenantdb.fleet.query import QueryResult, query_tenants

__all__ = [
    "CreatedTenant",
    "ExportFormat",
    "ExportResult",
    "FleetError",
    "MigrateResult",
    "PurgeReceipt",
    "QueryResult",
    "TenantExistsError",
    "UnknownTenantError",
    "create_tenant",
    "export_tenant",
    "migrate_tenant",
    "purge_tenant",
    "query_tenants",
]
