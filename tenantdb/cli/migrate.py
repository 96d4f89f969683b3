"""``tenantdb migrate status`` and ``migrate run``: tenants' schema versions against an app's
migrations, and migrating the tenants no machine holds (``tenantdb.fleet.migrate``).

A tenant's version is its ``PRAGMA user_version`` (tenantdb applies migrations in order and
counts them there), as lock.json records it with a hash of the migrations that made it
(one GET per tenant), else read from its restored copy as ``tenantdb query`` reads it. The
app's migrations come from ``--app module:attribute``: the ``migrations`` given to its
``TenantDBMiddleware``, or the list itself.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from tenantdb.asgi.middleware import TenantDBMiddleware
from tenantdb.cli.common import EXIT_FAILURE, EXIT_OK, Command, err, out, print_table
from tenantdb.cli.progress import count_progress
from tenantdb.cli.query import SchemaSeen, add_tenant_selection, run_schemas
from tenantdb.cli.status import list_tenants
from tenantdb.config import Settings
from tenantdb.errors import ConfigurationError
from tenantdb.fleet.migrate import MigrateResult, list_changed_in_place, migrate_tenant
from tenantdb.protocol.lockfile import SchemaVersion
from tenantdb.storage import open_bucket

__all__ = ["MIGRATE_COMMANDS", "app_migrations"]


_APP_HELP = "the app whose TenantDBMiddleware has the migrations, or the list itself"
_CHANGED_IN_PLACE = "migration list changed in place"


def _configure_migrate(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="migrate_command", metavar="SUBCOMMAND", required=True)
    status = sub.add_parser(
        "status",
        help="each tenant's schema version against the app's migrations",
        description="Compare each tenant's schema version (the migrations applied, as its "
        "lock.json records it, else PRAGMA user_version read from its restored copy, "
        "cached as `tenantdb query` does) with the number of migrations the app has: "
        "tenants behind (they migrate at their machine's next start), current, ahead of "
        "the code (a machine of this code refuses them), and those whose recorded "
        "migrations are not the app's (the migration list changed in place).",
    )
    status.add_argument(
        "--app",
        required=True,
        metavar="MODULE:ATTR",
        help=_APP_HELP,
    )
    add_tenant_selection(status)
    status.add_argument("--json", action="store_true", help="print a JSON object")
    status.set_defaults(handler=lambda args: asyncio.run(_status(args)))

    run = sub.add_parser(
        "run",
        help="migrate the tenants no machine holds, in the bucket",
        description="For each tenant behind the app's migrations whose lease is free "
        "(its machines stopped): take the lease as a rollback does, restore it, apply the "
        "pending migrations, verify, publish a snapshot, release the lease. Tenants held "
        "by a running machine are listed and left alone (they migrate at their next "
        "start). Run it again to resume: current tenants are skipped. Exit 1 if any "
        "tenant failed.",
    )
    run.add_argument("--app", required=True, metavar="MODULE:ATTR", help=_APP_HELP)
    add_tenant_selection(run, cache=False)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="apply the migrations to a restored copy, report errors and time, publish nothing",
    )
    run.add_argument(
        "--wait",
        action="store_true",
        help="wait for each held tenant until its machine releases the lease (or it "
        "expires), instead of listing it",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object per tenant")
    run.set_defaults(handler=lambda args: asyncio.run(_run(args)))


def app_migrations(spec: str) -> Sequence[Any]:
    """The migrations of ``module:attr``: its ``TenantDBMiddleware``'s, or the list itself."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"--app {spec!r}: expected MODULE:ATTR, e.g. notes:app")
    # The app's module is in the working directory, as for uvicorn.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for name in attribute.split("."):
            target = getattr(target, name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"--app {spec!r}: cannot load it: {exc}") from exc
    if isinstance(target, list | tuple):
        return target
    for middleware in getattr(target, "user_middleware", None) or ():
        if getattr(middleware, "cls", None) is TenantDBMiddleware:
            return tuple(middleware.kwargs.get("migrations", ()))
    raise ConfigurationError(
        f"--app {spec!r}: no TenantDBMiddleware(migrations=...) in it; name the list of "
        "migrations itself (MODULE:MIGRATIONS)"
    )


async def _status(args: argparse.Namespace) -> int:
    migrations = app_migrations(args.app)
    expected = len(migrations)
    versions: dict[str, int] = {}
    changed: dict[str, str] = {}

    def emit(seen: SchemaSeen) -> None:
        versions[seen.tenant] = seen.version
        if seen.hash is not None:
            drift = list_changed_in_place(SchemaVersion(seen.version, seen.hash), migrations)
            if drift is not None:
                changed[seen.tenant] = drift

    code = await run_schemas(args, emit)

    def state(tenant: str, version: int) -> str:
        if tenant in changed:
            return _CHANGED_IN_PLACE
        if version < expected:
            return f"behind by {expected - version}"
        return "current" if version == expected else f"ahead by {version - expected}"

    counts = Counter(versions.values())
    behind = sorted(t for t, v in versions.items() if v < expected and t not in changed)
    ahead = sorted(t for t, v in versions.items() if v > expected)
    if args.json:
        report = {
            "migrations": expected,
            "tenants": {t: versions[t] for t in sorted(versions)},
            "versions": {str(v): n for v, n in sorted(counts.items())},
            "behind": behind,
            "ahead": ahead,
            "changed_in_place": sorted(changed),
        }
        out(json.dumps(report, indent=2))
    elif versions:
        rows = [(t, str(v), state(t, v)) for t, v in sorted(versions.items())]
        print_table([("TENANT", "VERSION", "STATE"), *rows])
        current = len(versions) - len(behind) - len(ahead) - len(changed)
        err(
            f"the app has {expected} migration(s): {current} tenant(s) current, "
            f"{len(behind)} behind, {len(ahead)} ahead of the code"
            + (f", {len(changed)} {_CHANGED_IN_PLACE}" if changed else "")
        )
    for tenant, drift in sorted(changed.items()):
        err(f"warning: tenant {tenant}: {drift}")
    return code


async def _run(args: argparse.Namespace) -> int:
    migrations = app_migrations(args.app)
    if bool(args.tenants) == bool(args.all):
        err("error: name the tenants to migrate, or pass --all (not both)")
        return EXIT_FAILURE
    settings = Settings.from_env()
    outcomes: Counter[str] = Counter()
    async with open_bucket(settings, create=False) as bucket:
        tenants = args.tenants or await list_tenants(bucket, settings.prefix)
        gate = asyncio.Semaphore(args.parallel)

        async def one(tenant: str) -> MigrateResult:
            async with gate:
                return await migrate_tenant(
                    settings, bucket, tenant, migrations, dry_run=args.dry_run, wait=args.wait
                )

        with count_progress("migrating tenants") as progress:
            for done in asyncio.as_completed([one(tenant) for tenant in tenants]):
                result = await done
                outcomes[result.outcome] += 1
                _report(result, as_json=args.json)
                if progress is not None:
                    progress(outcomes.total(), len(tenants))
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
    err(f"{len(tenants)} tenant(s) against {len(migrations)} migration(s): {summary or 'none'}")
    return EXIT_FAILURE if outcomes["failed"] else EXIT_OK


def _report(result: MigrateResult, *, as_json: bool) -> None:
    if as_json:
        out(json.dumps({**asdict(result), "seconds": round(result.seconds, 3)}))
        if result.outcome == "failed":
            err(f"error: tenant {result.tenant}: {result.detail}")
        return
    took = f"in {result.seconds:.1f}s"
    if result.outcome == "migrated":
        out(
            f"{result.tenant}: migrated {result.before} -> {result.after} {took} "
            f"(generation {result.generation})"
        )
    elif result.outcome == "checked":
        out(f"{result.tenant}: dry run {result.before} -> {result.after} {took}, not published")
    elif result.outcome == "current":
        out(f"{result.tenant}: current (version {result.before})")
        if result.detail is not None:
            err(f"warning: tenant {result.tenant}: {result.detail}")
    elif result.outcome == "held":
        out(f"{result.tenant}: {result.detail}")
    else:
        err(f"error: tenant {result.tenant}: {result.detail}")


MIGRATE_COMMANDS: dict[str, Command] = {
    "migrate": Command(
        help="compare tenants' schema versions with an app's migrations; migrate stopped ones",
        configure=_configure_migrate,
    ),
}
