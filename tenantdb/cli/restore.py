"""The operator's verbs that restore a tenant: ``restore``, ``verify`` and ``rollback``.

``restore`` and ``verify`` only read the bucket: they take no lease and write no object.
``rollback`` takes the lease as a machine would and publishes a new state.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from tenantdb.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    TIME_HELP,
    Command,
    confirm,
    err,
    format_size,
    iso,
    out,
    tenant_arg,
    time_arg,
)
from tenantdb.cli.progress import transfer_progress
from tenantdb.cli.status import read_status
from tenantdb.config import Settings
from tenantdb.errors import IntegrityCheckError, LeaseHeldError, TenantDBError
from tenantdb.fleet.export import integrity_problems
from tenantdb.replication.pitr import RestoredPoint, restore_at
from tenantdb.replication.rollback import rollback
from tenantdb.storage import open_bucket

__all__ = ["RESTORE_COMMANDS", "add_at", "as_of"]


# --- tenantdb restore / verify ---


def add_at(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--at",
        type=time_arg,
        metavar="TIME",
        help=f"the moment to restore (default: now, as lock.json names it): {TIME_HELP}",
    )


def _configure_restore(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write TENANT's database as the bucket has it now, or as it was at TIME, to FILE: "
        "every object verified (hashes, state checksums, quick_check) before the result is "
        "renamed into place. Reads the bucket only: it takes no lease, and the machine "
        "serving the tenant is undisturbed."
    )
    parser.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="SQLite file to write"
    )
    add_at(parser)
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.set_defaults(handler=lambda args: asyncio.run(_restore(args)))


async def _restore(args: argparse.Namespace) -> int:
    dest: Path = args.output
    if dest.is_dir():
        err(f"error: {dest} is a directory; name the file to write")
        return EXIT_FAILURE
    if dest.exists() and not args.force:
        err(f"error: {dest} exists; pass --force to overwrite it")
        return EXIT_FAILURE
    if not dest.parent.is_dir():
        err(f"error: directory {dest.parent} does not exist")
        return EXIT_FAILURE
    try:
        point = await _restore_to(args.tenant, dest, at=args.at)
    except OSError as exc:  # the local side: a full disk, a read-only directory
        err(f"error: cannot write {dest}: {exc.strerror or exc}")
        return EXIT_FAILURE
    size = format_size(dest.stat().st_size)
    err(f"restored tenant {args.tenant} {as_of(point)} to {dest} ({size})")
    return EXIT_OK


async def _restore_to(tenant: str, dest: Path, *, at: datetime | None) -> RestoredPoint:
    """Restore ``tenant`` as of ``at`` into ``dest``, with a progress bar on a terminal."""
    settings = Settings.from_env()
    async with open_bucket(settings, create=False) as bucket:
        with transfer_progress(f"restoring {tenant}") as progress:
            return await restore_at(
                bucket, tenant, dest, prefix=settings.prefix, at=at, progress=progress
            )


def as_of(point: RestoredPoint) -> str:
    """When the restored database stood so, for people."""
    if point.at is None:
        return "as created (empty)"
    return f"as of {iso(point.at)} (log index {point.index})"


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Restore TENANT into a temporary file (every object verified as a machine's restore "
        "does) and run PRAGMA integrity_check on it. Exit 1 on any problem, naming the "
        "damaged object's key. Reads the bucket only."
    )
    parser.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    add_at(parser)
    parser.set_defaults(handler=lambda args: asyncio.run(_verify(args)))


async def _verify(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="tenantdb-verify-") as scratch:
        dest = Path(scratch) / f"{args.tenant}.sqlite3"
        try:
            point = await _restore_to(args.tenant, dest, at=args.at)
        except TenantDBError as exc:
            key = getattr(exc, "key", "")
            named = f" (object {key})" if key and key not in str(exc) else ""
            err(f"error: verify {args.tenant}: {exc}{named}")
            return EXIT_FAILURE
        problems = await asyncio.to_thread(integrity_problems, dest)
    if problems:
        raise IntegrityCheckError(tenant=args.tenant, problems=problems)
    err(f"tenant {args.tenant}: ok {as_of(point)}, integrity_check passed")
    return EXIT_OK


# --- tenantdb rollback ---


def _configure_rollback(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Publish TENANT's database as it was at TIME as its newest state, under a new lease "
        "generation; the next machine to serve the tenant restores it. The one command "
        "that changes a tenant. It takes the lease as a machine does, so it is refused "
        "while a machine holds it (stop the tenant's machine first) unless --wait. Nothing "
        "is deleted: the history after TIME stays restorable within the retention window."
    )
    parser.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    parser.add_argument(
        "--to", type=time_arg, required=True, metavar="TIME", help=f"the moment: {TIME_HELP}"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait until the holder releases the lease, or it expires, instead of refusing",
    )
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    parser.set_defaults(handler=lambda args: asyncio.run(_rollback(args)))


async def _rollback(args: argparse.Namespace) -> int:
    tenant, moment = args.tenant, iso(args.to)
    if not args.yes:
        if not sys.stdin.isatty():
            err(f"error: refusing to roll tenant {tenant} back without confirmation: pass --yes")
            return EXIT_FAILURE
        if not confirm(f"Roll tenant {tenant} back to {moment}? Later writes stop counting."):
            err("aborted")
            return EXIT_FAILURE
    settings = Settings.from_env(tenant=tenant)
    async with open_bucket(settings, create=False) as bucket:
        status = await read_status(bucket, tenant, prefix=settings.prefix)
        if args.wait and status is not None and status.lease == "held":
            err(f"waiting for machine {status.observed.record.owner} to release the lease ...")
        with (
            tempfile.TemporaryDirectory(prefix="tenantdb-rollback-") as scratch,
            transfer_progress(f"restoring {tenant} as of {moment}") as progress,
        ):
            try:
                result = await rollback(
                    settings,
                    bucket,
                    args.to,
                    wait=args.wait,
                    progress=progress,
                    work_dir=Path(scratch),
                )
            except LeaseHeldError as exc:
                err(
                    f"error: {exc}. Stop the tenant's machine first (its final publish "
                    "releases the lease), or pass --wait"
                )
                return EXIT_FAILURE
    out(
        f"rolled tenant {tenant} back {as_of(result.restored)}: generation "
        f"{result.generation}, snapshot {result.snapshot}"
    )
    return EXIT_OK


RESTORE_COMMANDS: dict[str, Command] = {
    "restore": Command(
        help="write a tenant's database, now or at a past moment, to a file (no lease taken)",
        configure=_configure_restore,
    ),
    "verify": Command(
        help="restore a tenant into a temporary file and check its integrity",
        configure=_configure_verify,
    ),
    "rollback": Command(
        help="publish a tenant's database as it was at a past moment as its newest state",
        configure=_configure_rollback,
    ),
}
