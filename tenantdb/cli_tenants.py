"""The operator's verbs on tenants' data in the bucket: status, restore, verify.

Each opens the bucket the environment names (``BUCKET_NAME`` for S3, else the embedded
local bucket directory) and only reads it: none takes a lease or writes an object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from tenantdb.cli_common import (
    EXIT_FAILURE,
    EXIT_OK,
    Command,
    err,
    format_age,
    format_size,
    out,
    print_table,
    tenant_arg,
)
from tenantdb.config import Settings
from tenantdb.errors import InvalidTenantError, TenantDBError
from tenantdb.lease import Lease, ObservedLock
from tenantdb.replication.restore import restore_database
from tenantdb.storage import Bucket, open_bucket
from tenantdb.tenants import validate_tenant

__all__ = ["TENANT_COMMANDS", "TenantStatus", "VerifyFailedError", "read_status"]

# lock.json reads of several tenants at once: enough to hide round trips, few enough to
# stay far below any bucket's request rate limits.
_PARALLEL_READS = 8
LeaseState = Literal["held", "expired", "released"]


class VerifyFailedError(TenantDBError):
    """A restored tenant failed SQLite's ``PRAGMA integrity_check``."""

    def __init__(self, *, tenant: str, problems: Sequence[str]) -> None:
        self.tenant = tenant
        self.problems = tuple(problems)
        super().__init__(
            f"tenant {tenant}: integrity_check found {len(problems)} problem(s): "
            + "; ".join(problems[:5])
        )


@dataclass(frozen=True)
class TenantStatus:
    """One tenant as its lock.json shows it, with times on the bucket's clock."""

    tenant: str
    observed: ObservedLock
    expires_in: float
    now: datetime

    @property
    def lease(self) -> LeaseState:
        """Whether a machine holds the lease now."""
        if self.observed.record.owner is None:
            return "released"
        return "held" if self.expires_in > 0 else "expired"

    @property
    def log_age(self) -> float | None:
        """Seconds since the log's tail last moved, if the tenant has a log."""
        log = self.observed.record.log
        if log is None or not log.updated_at:
            return None
        return (self.now - datetime.fromisoformat(log.updated_at)).total_seconds()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this status."""
        record = self.observed.record
        log, snapshot = record.log, record.snapshot
        return {
            "tenant": self.tenant,
            "owner": record.owner,
            "region": record.region,
            "last_owner": record.last_owner,
            "generation": record.generation,
            "lease": self.lease,
            "expires_in": round(self.expires_in, 1) if self.lease != "released" else None,
            "log": None
            if log is None
            else {
                "base": log.base,
                "tail": log.tail,
                "updated_at": log.updated_at,
                "age_seconds": round(self.log_age, 1) if self.log_age is not None else None,
            },
            "snapshot": None
            if snapshot is None
            else {
                "key": snapshot.key,
                "size": snapshot.size,
                "published_at": snapshot.published_at,
            },
            "checked_at": self.now.isoformat(timespec="seconds"),
        }

    def row(self) -> tuple[str, ...]:
        """This status as a row of the ``tenantdb status`` table."""
        record = self.observed.record
        if self.lease == "released":
            lease = "released"
        elif self.lease == "held":
            lease = f"{self.expires_in:.0f}s left"
        else:
            lease = f"expired {-self.expires_in:.0f}s ago"
        log, snapshot = record.log, record.snapshot
        age = self.log_age
        if snapshot is None:
            snap = "-"
        else:
            published = datetime.fromisoformat(snapshot.published_at)
            when = format_age((self.now - published).total_seconds())
            snap = f"{snapshot.key.rsplit('/', 1)[-1]} ({format_size(snapshot.size)}, {when} ago)"
        return (
            self.tenant,
            record.owner or "-",
            record.region or "-",
            str(record.generation),
            lease,
            str(log.tail) if log else "-",
            format_age(age) if age is not None else "-",
            snap,
        )


_STATUS_HEADER = ("TENANT", "HOLDER", "REGION", "GEN", "LEASE", "TAIL", "LOG AGE", "SNAPSHOT")


async def list_tenants(bucket: Bucket, prefix: str) -> list[str]:
    """Every tenant with a lock.json under ``prefix``, sorted (one LIST of the prefix)."""
    pattern = re.compile(re.escape(prefix) + r"([^/]+)/lock\.json")
    tenants = []
    for info in await bucket.list(prefix):
        match = pattern.fullmatch(info.key)
        # A directory that is not a tenant id was not written by tenantdb: not a tenant.
        if match is not None and _is_tenant(match.group(1)):
            tenants.append(match.group(1))
    return sorted(tenants)


def _is_tenant(name: str) -> bool:
    try:
        validate_tenant(name)
    except InvalidTenantError:
        return False
    return True


async def read_status(bucket: Bucket, tenant: str, *, prefix: str) -> TenantStatus | None:
    """The tenant's status from its lock.json; None when it has none (no such tenant)."""
    # A Lease object only to read and judge lock.json as holders do: it never writes here.
    reader = Lease(bucket, tenant, machine_id="tenantdb-cli", region="", ttl=1, prefix=prefix)
    observed = await reader.read()
    if observed is None:
        return None
    now = observed.info.server_date or datetime.now(UTC)
    return TenantStatus(tenant, observed, reader.expires_in(observed), now)


# --- tenantdb status ---


def _configure_status(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show each tenant's lease (holder, region, generation, seconds left on the bucket's "
        "clock), log tail and its age, and newest snapshot, from its lock.json. Without "
        "TENANT, every tenant under the prefix (one LIST of the bucket)."
    )
    parser.add_argument("tenants", nargs="*", type=tenant_arg, metavar="TENANT")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(handler=lambda args: asyncio.run(_status(args)))


async def _status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    prefix = settings.prefix
    async with open_bucket(settings) as bucket:
        tenants = args.tenants or await list_tenants(bucket, prefix)
        limit = asyncio.Semaphore(_PARALLEL_READS)

        async def one(tenant: str) -> TenantStatus | TenantDBError | None:
            async with limit:
                try:
                    return await read_status(bucket, tenant, prefix=prefix)
                except TenantDBError as exc:
                    return exc

        results = await asyncio.gather(*(one(t) for t in tenants))
    code = EXIT_OK
    found: list[TenantStatus] = []
    for tenant, result in zip(tenants, results, strict=True):
        if isinstance(result, TenantStatus):
            found.append(result)
            continue
        code = EXIT_FAILURE
        if result is None:
            err(f"error: tenant {tenant}: no {prefix}{tenant}/lock.json in the bucket")
        else:
            err(f"error: tenant {tenant}: {result}")
    if args.json:
        out(json.dumps([s.to_json() for s in found], indent=2))
    elif found:
        print_table([_STATUS_HEADER, *(s.row() for s in found)])
    elif not tenants:
        err(f"no tenants under {prefix!r} in the bucket")
    return code


# --- tenantdb restore / verify ---


def _configure_restore(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write TENANT's database, as the bucket has it now, to FILE: snapshot and log "
        "verified (hashes, state checksums, quick_check) before it is renamed into place. "
        "Reads the bucket only: it takes no lease and the serving machine is undisturbed."
    )
    parser.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="SQLite file to write"
    )
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.set_defaults(handler=lambda args: asyncio.run(_restore(args)))


async def _restore(args: argparse.Namespace) -> int:
    dest: Path = args.output
    if dest.exists() and not args.force:
        err(f"error: {dest} exists; pass --force to overwrite it")
        return EXIT_FAILURE
    if not dest.parent.is_dir():
        err(f"error: directory {dest.parent} does not exist")
        return EXIT_FAILURE
    settings = Settings.from_env()
    async with open_bucket(settings) as bucket:
        await _restore_latest(bucket, args.tenant, dest, prefix=settings.prefix)
    err(f"restored tenant {args.tenant} to {dest} ({format_size(dest.stat().st_size)})")
    return EXIT_OK


async def _restore_latest(bucket: Bucket, tenant: str, dest: Path, *, prefix: str) -> None:
    status = await read_status(bucket, tenant, prefix=prefix)
    if status is None:
        raise TenantDBError(f"tenant {tenant}: no {prefix}{tenant}/lock.json in the bucket")
    await restore_database(bucket, status.observed.record, dest, prefix=prefix)


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Restore TENANT into a temporary file (every object verified as a machine's restore "
        "does) and run PRAGMA integrity_check on it. Exit 1 on any problem, naming the "
        "damaged object's key. Reads the bucket only."
    )
    parser.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    parser.set_defaults(handler=lambda args: asyncio.run(_verify(args)))


async def _verify(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    with tempfile.TemporaryDirectory(prefix="tenantdb-verify-") as scratch:
        dest = Path(scratch) / f"{args.tenant}.sqlite3"
        async with open_bucket(settings) as bucket:
            try:
                await _restore_latest(bucket, args.tenant, dest, prefix=settings.prefix)
            except TenantDBError as exc:
                key = getattr(exc, "key", "")
                named = f" (object {key})" if key and key not in str(exc) else ""
                err(f"error: verify {args.tenant}: {exc}{named}")
                return EXIT_FAILURE
        problems = await asyncio.to_thread(_integrity_problems, dest)
    if problems:
        raise VerifyFailedError(tenant=args.tenant, problems=problems)
    err(f"tenant {args.tenant}: ok (integrity_check passed)")
    return EXIT_OK


def _integrity_problems(path: Path) -> list[str]:
    """What ``PRAGMA integrity_check`` finds wrong in ``path`` (empty: nothing)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()
    return [] if rows == ["ok"] else rows


TENANT_COMMANDS: dict[str, Command] = {
    "status": Command(
        help="show tenants' leases, logs and snapshots from the bucket",
        configure=_configure_status,
    ),
    "restore": Command(
        help="write a tenant's database from the bucket to a file (no lease taken)",
        configure=_configure_restore,
    ),
    "verify": Command(
        help="restore a tenant into a temporary file and check its integrity",
        configure=_configure_verify,
    ),
}
