"""Migrate a stopped tenant in the bucket: take the lease, apply, verify, publish, release.

A tenant whose lease a machine holds is left alone (``held``): its machine migrates it at
its next start, as every machine does. Any other tenant behind the migrations is taken as
``tenantdb rollback`` takes one: the lease under a new generation with its takeover record,
a restore of the current state, the pending migrations (the machine's own
``apply_migrations``), and a snapshot published as the log's new base (``quick_check``
and sha256 first), then the lease released for the tenant's machine. The published record
carries the schema (``schema_of``) as a machine's does. A tenant whose lock.json says it is
current costs one GET and writes nothing (one whose lock.json predates schemas, a restore);
so a run interrupted anywhere is resumed by running it again. A dry run applies the
migrations to a restored copy and publishes nothing.

``read_schemas`` reads each tenant's recorded schema from lock.json alone, and
``list_changed_in_place`` says when a recorded hash is not the app's list at that version.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tenantdb.config import Settings
from tenantdb.errors import LeaseHeldError, TenantDBError
from tenantdb.fleet.errors import UnknownTenantError
from tenantdb.machine.migrations import Migration, apply_migrations, schema_of
from tenantdb.protocol.lease import read_lock
from tenantdb.protocol.lockfile import SchemaVersion
from tenantdb.replication.checksum import format_state
from tenantdb.replication.pitr import RestoredPoint, restore_at
from tenantdb.replication.restore import hash_file
from tenantdb.replication.rollback import (
    acquire,
    give_back,
    operator_lease,
    publish_as_newest,
    routing_hint,
)
from tenantdb.replication.takeovers import record_takeover
from tenantdb.storage.base import Bucket
from tenantdb.tenants import validate_tenant

__all__ = [
    "MigrateOutcome",
    "MigrateResult",
    "TenantSchema",
    "list_changed_in_place",
    "migrate_tenant",
    "read_schemas",
]

MigrateOutcome = Literal["migrated", "current", "held", "failed", "checked"]


@dataclass(frozen=True)
class MigrateResult:
    """What happened to one tenant: its versions before and after, and why."""

    tenant: str
    outcome: MigrateOutcome
    before: int | None = None
    after: int | None = None
    seconds: float = 0.0
    # The generation that published the migrated state ("migrated").
    generation: int | None = None
    # Why it was held or failed; for a current one, a migration list changed in place.
    detail: str | None = None


@dataclass(frozen=True)
class TenantSchema:
    """One tenant's schema as its lock.json records it (None: not recorded), or the error."""

    tenant: str
    schema: SchemaVersion | None = None
    error: str | None = None


def list_changed_in_place(recorded: SchemaVersion, migrations: Sequence[Migration]) -> str | None:
    """Why ``recorded`` is not the app's first ``recorded.version`` migrations, or None.

    A tenant ahead of the app cannot be compared: the app lacks the migrations it ran.
    """
    if recorded.version > len(migrations):
        return None
    apps = schema_of(migrations[: recorded.version])
    if apps.hash == recorded.hash:
        return None
    return (
        f"migration list changed in place: the tenant ran {recorded.version} migration(s) "
        f"hashing to {recorded.hash}, the app's first {recorded.version} hash to {apps.hash}"
    )


async def read_schemas(
    bucket: Bucket, tenants: Sequence[str], *, prefix: str, parallel: int = 4
) -> AsyncIterator[TenantSchema]:
    """Each tenant's recorded schema, one GET of lock.json each, as they arrive."""
    gate = asyncio.Semaphore(parallel)

    async def one(tenant: str) -> TenantSchema:
        async with gate:
            try:
                return TenantSchema(tenant, await _recorded_schema(bucket, tenant, prefix))
            except TenantDBError as exc:
                return TenantSchema(tenant, error=str(exc) or type(exc).__name__)

    tasks = [asyncio.ensure_future(one(tenant)) for tenant in tenants]
    try:
        for done in asyncio.as_completed(tasks):
            yield await done
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _recorded_schema(bucket: Bucket, tenant: str, prefix: str) -> SchemaVersion | None:
    validate_tenant(tenant)
    key = f"{prefix}{tenant}/lock.json"
    observed = await read_lock(bucket, tenant, key)
    if observed is None:
        raise UnknownTenantError(f"no tenant {tenant}: no {key} in the bucket", tenant=tenant)
    return observed.record.schema


async def migrate_tenant(
    settings: Settings,
    bucket: Bucket,
    tenant: str,
    migrations: Sequence[Migration],
    *,
    dry_run: bool = False,
    wait: bool = False,
) -> MigrateResult:
    """Bring ``tenant`` to ``len(migrations)`` in the bucket, or say why not (never raises
    for the tenant's own problems: they are its result). ``wait``: a tenant a machine
    holds is waited for (until its lease is released or expires) instead of listed."""
    validate_tenant(tenant)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tenantdb-migrate-") as scratch:
        copy = Path(scratch) / f"{tenant}.sqlite3"
        try:
            recorded = await _recorded_schema(bucket, tenant, settings.prefix)
            if recorded is not None and recorded.version == len(migrations) and not dry_run:
                # lock.json is never ahead of the data: current, without a download.
                detail = list_changed_in_place(recorded, migrations)
                seconds = time.monotonic() - started
                return MigrateResult(
                    tenant, "current", recorded.version, recorded.version, seconds, detail=detail
                )
            point = await restore_at(bucket, tenant, copy, prefix=settings.prefix)
            before = await asyncio.to_thread(_version, copy)
            if before == len(migrations) and not dry_run:
                return MigrateResult(tenant, "current", before, before, time.monotonic() - started)
            if dry_run:
                await asyncio.to_thread(_migrate_file, copy, migrations)
                after = await asyncio.to_thread(_version, copy)
                return MigrateResult(tenant, "checked", before, after, time.monotonic() - started)
            return await _migrate_held(
                settings, bucket, tenant, migrations, (copy, point), started, wait=wait
            )
        except LeaseHeldError as held:
            return MigrateResult(
                tenant,
                "held",
                seconds=time.monotonic() - started,
                detail=f"held by machine {held.owner} (lease expires in {held.expires_in:.0f}s "
                "unless renewed): it migrates at its next start",
            )
        except (TenantDBError, sqlite3.Error, OSError) as exc:
            seconds, detail = time.monotonic() - started, str(exc) or type(exc).__name__
            return MigrateResult(tenant, "failed", seconds=seconds, detail=detail)


async def _migrate_held(
    settings: Settings,
    bucket: Bucket,
    tenant: str,
    migrations: Sequence[Migration],
    restored: tuple[Path, RestoredPoint],
    started: float,
    *,
    wait: bool,
) -> MigrateResult:
    """Under the tenant's lease: the copy ``restored`` before it if the lease's lock.json
    names that very state, else a restore again (it may have moved); migrate, publish."""
    lease = operator_lease(settings, bucket, tenant, "migrate")
    await acquire(lease, wait=wait)
    renewing = asyncio.get_running_loop().create_task(lease.keep_renewed())
    copy, point = restored
    published = False
    try:
        await record_takeover(lease)
        log = lease.record.log if lease.record else None
        # A log's state is a digest of the database it describes: the same state is the
        # same database, so the copy made before the lease is the one to migrate.
        if log is None or (log.tail, log.state, log.db_pages) != (
            point.index,
            point.state,
            point.db_pages,
        ):
            await restore_at(bucket, tenant, copy, prefix=settings.prefix)
        before = await asyncio.to_thread(_version, copy)
        if before == len(migrations):  # its machine migrated it meanwhile
            return MigrateResult(tenant, "current", before, before, time.monotonic() - started)
        await asyncio.to_thread(_migrate_file, copy, migrations)
        after = await asyncio.to_thread(_version, copy)
        hashes = await asyncio.to_thread(hash_file, copy)
        record = await publish_as_newest(
            lease,
            copy,
            prefix=settings.prefix,
            state=format_state(hashes.state),
            db_pages=hashes.db_pages,
            schema=schema_of(migrations),
        )
        published = True
        await lease.release(last_owner=routing_hint(lease))
    finally:
        if not published:
            await give_back(lease)
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        copy.unlink(missing_ok=True)
    return MigrateResult(
        tenant, "migrated", before, after, time.monotonic() - started, record.generation
    )


def _version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)) as conn:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    return int(version)


def _migrate_file(path: Path, migrations: Sequence[Migration]) -> None:
    """Apply the pending migrations, then fold the WAL into the file: it is uploaded alone."""
    apply_migrations(path, migrations)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
