"""``tenantdb tenants``: create (or fork), export and purge tenants straight in the bucket.

Each subcommand opens the bucket the environment names, which must exist, and never
touches a machine's files: see ``tenantdb.fleet`` for what each writes and why it is safe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
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
from tenantdb.cli.query import configure_schema
from tenantdb.cli.restore import add_at, as_of
from tenantdb.cli.teardown import destroy_machines
from tenantdb.config import Settings
from tenantdb.errors import LeaseHeldError
from tenantdb.fleet.create import create_tenant
from tenantdb.fleet.export import export_tenant
from tenantdb.fleet.purge import purge_tenant
from tenantdb.routing.machines_api import MachinesClient
from tenantdb.storage import open_bucket

__all__ = ["TENANTS_COMMANDS"]


def _configure_tenants(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tenants_command", metavar="SUBCOMMAND", required=True)

    create = sub.add_parser(
        "create",
        help="create a tenant, empty or forked from another's state",
        description="Create TENANT in the bucket: empty, or with --from a fork of SOURCE as "
        "it is now (its snapshot is copied inside the bucket, its log re-encoded as the "
        "fork's) or as it was at --at (restored and verified here, then uploaded). The fork "
        "has its own history and shares no object with SOURCE, which is only read. Refused "
        "if anything of TENANT is in the bucket already.",
    )
    create.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    create.add_argument(
        "--from", dest="source", type=tenant_arg, metavar="SOURCE", help="tenant to fork"
    )
    create.add_argument(
        "--at",
        type=time_arg,
        metavar="TIME",
        help=f"fork SOURCE as it was then (default: as it is now): {TIME_HELP}",
    )
    create.add_argument("--json", action="store_true", help="print the result as JSON")
    create.set_defaults(handler=lambda args: asyncio.run(_create(args)))

    export = sub.add_parser(
        "export",
        help="write a tenant's database to a SQLite file or an SQL dump, verified",
        description="Write TENANT's database, now or as of --at, to FILE: a SQLite file, or "
        "an SQL dump (--format sql) that is replayed into a scratch database and must dump "
        "back identically before it is written. Everything is verified as `tenantdb verify` "
        "does. Reads the bucket only.",
    )
    export.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    export.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="file to write"
    )
    add_at(export)
    export.add_argument(
        "--format", choices=("sqlite", "sql"), default="sqlite", help="default: sqlite"
    )
    export.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    export.set_defaults(handler=lambda args: asyncio.run(_export(args)))

    delete = sub.add_parser(
        "delete",
        help="delete every object of a tenant from the bucket, history included",
        description="Delete every object under TENANT's prefix (snapshots, log, history, "
        "lock.json), check that nothing is left and print a receipt. With FLY_API_TOKEN "
        "and FLY_APP_NAME, the tenant's machines are stopped gracefully and destroyed "
        "first. Refused while a machine holds the tenant's lease. An "
        "interrupted purge is resumed by running it again; meanwhile lock.json marks the "
        "tenant as being purged, so no machine takes it.",
    )
    delete.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    delete.add_argument(
        "--purge",
        action="store_true",
        required=True,
        help="required: the data is gone for good, with its point-in-time history",
    )
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    delete.add_argument("--json", action="store_true", help="print the receipt as JSON")
    delete.set_defaults(handler=lambda args: asyncio.run(_delete(args)))

    configure_schema(sub)


async def _create(args: argparse.Namespace) -> int:
    if args.at is not None and args.source is None:
        err("error: --at needs --from: the moment is the source tenant's")
        return EXIT_FAILURE
    settings = Settings.from_env()
    async with open_bucket(settings, create=False) as bucket:
        with transfer_progress(f"restoring {args.source or args.tenant}") as progress:
            created = await create_tenant(
                bucket,
                args.tenant,
                prefix=settings.prefix,
                lease_ttl=settings.lease_ttl,
                source=args.source,
                at=args.at,
                region=settings.fly_region,
                progress=progress,
            )
    if args.json:
        fields = {
            "tenant": created.tenant,
            "source": created.source,
            "at": iso(created.at),
            "snapshot": created.snapshot,
            "state": created.state,
            "db_pages": created.db_pages,
            "copied_objects": created.copied,
            "uploaded_bytes": created.uploaded_bytes,
        }
        out(json.dumps(fields, indent=2))
    elif created.source is None:
        out(f"created tenant {created.tenant} (empty)")
    else:
        when = f"as of {iso(created.at)}" if created.at else "as it is now"
        out(
            f"created tenant {created.tenant} from {created.source} {when}: "
            f"{created.copied} object(s) copied in the bucket, "
            f"{format_size(created.uploaded_bytes)} uploaded, {created.db_pages} pages"
        )
    return EXIT_OK


async def _export(args: argparse.Namespace) -> int:
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
    settings = Settings.from_env()
    try:
        async with open_bucket(settings, create=False) as bucket:
            with transfer_progress(f"restoring {args.tenant}") as progress:
                result = await export_tenant(
                    bucket,
                    args.tenant,
                    dest,
                    prefix=settings.prefix,
                    at=args.at,
                    format=args.format,
                    progress=progress,
                )
    except OSError as exc:  # the local side: a full disk, a read-only directory
        err(f"error: cannot write {dest}: {exc.strerror or exc}")
        return EXIT_FAILURE
    what = "SQL dump" if result.format == "sql" else "SQLite file"
    err(
        f"exported tenant {args.tenant} {as_of(result.point)} to {dest} "
        f"({what}, {format_size(result.size)}, integrity_check passed)"
    )
    return EXIT_OK


async def _delete(args: argparse.Namespace) -> int:
    tenant = args.tenant
    if not args.yes:
        if not sys.stdin.isatty():
            err(f"error: refusing to purge tenant {tenant} without confirmation: pass --yes")
            return EXIT_FAILURE
        question = (
            f"Destroy tenant {tenant}'s machines (with a Fly token) and delete every object "
            "of it, its history included, for good?"
        )
        if not confirm(question):
            err("aborted")
            return EXIT_FAILURE
    settings = Settings.from_env()
    async with open_bucket(settings, create=False) as bucket:
        machines_done = await _destroy_machines(settings, tenant)
        try:
            receipt = await purge_tenant(bucket, tenant, prefix=settings.prefix)
        except LeaseHeldError as exc:
            err(
                f"error: {exc}: nothing was deleted. Stop the tenant's machines first "
                f"(`tenantdb machines destroy {tenant}` stops them gracefully), then purge"
            )
            return EXIT_FAILURE
    if args.json:
        fields = {
            "tenant": receipt.tenant,
            "keys": receipt.keys,
            "bytes": receipt.bytes,
            "seconds": round(receipt.seconds, 3),
            "resumed": receipt.resumed,
            "key_erased": receipt.key_erased,
        }
        out(json.dumps(fields, indent=2))
    else:
        resumed = " (resumed an interrupted purge)" if receipt.resumed else ""
        out(
            f"purged tenant {tenant}{resumed}: {receipt.keys} key(s), "
            f"{format_size(receipt.bytes)} deleted in {receipt.seconds:.1f}s; "
            f"nothing is left under {settings.prefix}{tenant}/"
        )
        if receipt.key_erased:
            out(
                "its data key was deleted first: any copy of its history anywhere else "
                "cannot be read any more"
            )
    if not machines_done and settings.bucket_name:  # a deployment's: its machines matter
        err(
            "note: FLY_API_TOKEN or FLY_APP_NAME is unset: the tenant's machines, if any, "
            "were left alone (a machine that starts later creates the tenant anew, empty)"
        )
    return EXIT_OK


async def _destroy_machines(settings: Settings, tenant: str) -> bool:
    """With a Fly token, the tenant's machines go first: stopped gracefully (releasing the
    lease), then destroyed, so that none recreates the tenant after the purge. False when
    there is no token to do it with."""
    app, token = settings.app_name, settings.fly_api_token
    if not app or token is None:
        return False
    async with MachinesClient(app, token, settings.machines_api_url) as client:
        machines = await client.find_tenant_machines(tenant, settings.metadata_key)
        await destroy_machines(client, machines, tenant)
    return True


TENANTS_COMMANDS: dict[str, Command] = {
    "tenants": Command(
        help="create (or fork), export, purge tenants in the bucket; show their schema versions",
        configure=_configure_tenants,
    ),
}
