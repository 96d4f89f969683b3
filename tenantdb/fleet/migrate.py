"""Migrate a stopped tenant in the bucket: take the lease, apply, verify, publish, release.

A tenant whose lease a machine holds is left alone (``held``): its machine migrates it at
its next start, as every machine does. Any other tenant behind the migrations is taken as
``tenantdb rollback`` takes one: the lease under a new generation with its takeover record,
a restore of the current state, the pending migrations (the machine's own
``apply_migrations``), and a snapshot published as the log's new base (``quick_check``
and sha256 first), then the lease released for the tenant's machine. A tenant that is
current costs a restore and writes nothing; so a run interrupted anywhere is resumed by
running it again. A dry run applies the migrations to a restored copy and publishes
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tenantdb.config import Settings
from tenantdb.errors import LeaseHeldError, TenantDBError
from tenantdb.machine.migrations import Migration, apply_migrations
from tenantdb.protocol.snapshot import temp_snapshot_path
from tenantdb.replication.checksum import format_state
from tenantdb.replication.pitr import restore_at
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

__all__ = ["MigrateOutcome", "MigrateResult", "migrate_tenant"]

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
    # Why it was held or failed.
    detail: str | None = None


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
            await restore_at(bucket, tenant, copy, prefix=settings.prefix)
            before = await asyncio.to_thread(_version, copy)
            if before == len(migrations) and not dry_run:
                return MigrateResult(tenant, "current", before, before, time.monotonic() - started)
            if dry_run:
                await asyncio.to_thread(_migrate_file, copy, migrations)
                after = await asyncio.to_thread(_version, copy)
                return MigrateResult(tenant, "checked", before, after, time.monotonic() - started)
            return await _migrate_held(
                settings, bucket, tenant, migrations, Path(scratch), started, wait=wait
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
    work_dir: Path,
    started: float,
    *,
    wait: bool,
) -> MigrateResult:
    """Under the tenant's lease: restore again (it may have moved), migrate, publish."""
    lease = operator_lease(settings, bucket, tenant, "migrate")
    await acquire(lease, wait=wait)
    renewing = asyncio.get_running_loop().create_task(lease.keep_renewed())
    copy = temp_snapshot_path(work_dir)
    published = False
    try:
        await record_takeover(lease)
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
