"""The ``tenantdb`` command.

Layout: ``build_parser()`` builds one argparse parser from ``COMMANDS``, a dict of
top-level subcommands (name -> ``Command``). Each command fills in its own parser and sets
``handler`` (a function of the parsed arguments returning an exit code) on every leaf.
A new top-level command (for example ``tenantdb dev``) is one more ``COMMANDS`` entry.

Exit codes: 0 success, 1 failure (a ``TenantDBError``, or any other error, printed as one
line without a traceback), 2 usage error (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from tenantdb.cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Command,
    env_pair,
    port_number,
    print_table,
)
from tenantdb.cli.common import confirm as _confirm
from tenantdb.cli.common import err as _err
from tenantdb.cli.common import fly_settings as _fly_settings
from tenantdb.cli.common import out as _out
from tenantdb.cli.common import positive_int as _positive_int
from tenantdb.cli.common import tenant_arg as _tenant_arg
from tenantdb.cli.deploy import DEPLOY_COMMANDS
from tenantdb.cli.dev import DEV_COMMANDS
from tenantdb.cli.doctor import DOCTOR_COMMANDS
from tenantdb.cli.keys import KEYS_COMMANDS
from tenantdb.cli.migrate import MIGRATE_COMMANDS
from tenantdb.cli.move import configure_move
from tenantdb.cli.query import QUERY_COMMANDS
from tenantdb.cli.restore import RESTORE_COMMANDS
from tenantdb.cli.status import STATUS_COMMANDS
from tenantdb.cli.teardown import destroy_machines
from tenantdb.cli.tenants import TENANTS_COMMANDS
from tenantdb.errors import TenantDBError
from tenantdb.routing.machines_api import MachinesClient

if TYPE_CHECKING:  # the emulation is imported only by the dev command
    pass

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def _version() -> str:
    try:
        return version("tenantdb")
    except PackageNotFoundError:
        return "unknown"


# --- argument types: raise ArgumentTypeError so argparse reports a usage error (exit 2) ---


def _memory_mb(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of MB") from None
    # Fly allocates memory in 256 MB steps.
    if number < 256 or number % 256:
        raise argparse.ArgumentTypeError(f"{number} MB: use a multiple of 256 (256, 512, ...)")
    return number


# --- tenantdb machines ... ---


def _machines_options() -> argparse.ArgumentParser:
    """Options every ``machines`` subcommand takes, accepted after the subcommand name."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("Fly options")
    group.add_argument("--app", help="Fly app name (default: $FLY_APP_NAME)")
    group.add_argument(
        "--api-url",
        metavar="URL",
        help="Machines API base URL (default: $TENANTDB_MACHINES_API_URL or "
        "https://api.machines.dev)",
    )
    return common


_MACHINES_EPILOG = (
    "Environment: FLY_APP_NAME (or --app) and FLY_API_TOKEN (from `fly tokens create deploy`) "
    "are required; TENANTDB_METADATA_KEY names the metadata key (default: customer_id)."
)


def _configure_machines(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _MACHINES_EPILOG
    common = [_machines_options()]
    sub = parser.add_subparsers(dest="machines_command", metavar="SUBCOMMAND", required=True)

    create = sub.add_parser(
        "create",
        parents=common,
        epilog=_MACHINES_EPILOG,
        help="create the machine that serves a tenant",
        description="Create one Fly Machine for TENANT: metadata <key>=TENANT, env "
        "TENANT_ID=TENANT, autostop/autostart on, the stop timeout of TENANTDB_KILL_TIMEOUT "
        "and config.metrics on TENANTDB_METRICS_PORT (so Fly scrapes it). Refuses if the "
        "tenant already has one, unless --replica. "
        "Put secrets in `fly secrets`, not --env: env values are visible in the machine config.",
    )
    create.add_argument("tenant", type=_tenant_arg, help="tenant id (a lowercase DNS label)")
    create.add_argument("--image", required=True, help="container image to run")
    create.add_argument("--region", help="Fly region (default: chosen by Fly)")
    create.add_argument(
        "--memory-mb",
        type=_memory_mb,
        default=256,
        metavar="N",
        help="memory in MB, a multiple of 256 (default: 256)",
    )
    create.add_argument(
        "--cpus", type=_positive_int, default=1, metavar="N", help="CPU count (default: 1)"
    )
    create.add_argument(
        "--internal-port",
        type=port_number,
        default=8080,
        metavar="PORT",
        help="port the app listens on inside the machine (default: 8080)",
    )
    create.add_argument(
        "--env",
        type=env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the machine (repeatable)",
    )
    create.add_argument(
        "--replica",
        action="store_true",
        help="one more machine for a tenant that has one: a read replica (env "
        "TENANTDB_REPLICA_READS=1; the tenant's other machines need it too), say in another "
        "region (see Read replicas in the README)",
    )
    create.set_defaults(handler=_machines_create)

    list_ = sub.add_parser(
        "list",
        parents=common,
        epilog=_MACHINES_EPILOG,
        help="list the app's machines and the tenants they serve",
        description="List the machines of the Fly app, with the tenant each one serves.",
    )
    list_.add_argument("--tenant", type=_tenant_arg, help="only this tenant's machines")
    list_.add_argument("--json", action="store_true", help="print a JSON array")
    list_.set_defaults(handler=_machines_list)

    destroy = sub.add_parser(
        "destroy",
        parents=common,
        epilog=_MACHINES_EPILOG,
        help="destroy a tenant's machines (its data in the bucket is kept)",
        description="Destroy every machine whose metadata names TENANT. Running machines "
        "are stopped gracefully first so they publish a final snapshot; the tenant's data "
        "in the bucket is kept.",
    )
    destroy.add_argument("tenant", type=_tenant_arg, help="tenant id")
    destroy.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    destroy.add_argument(
        "--force",
        action="store_true",
        help="kill running machines without a graceful stop (writes since the last "
        "snapshot are lost)",
    )
    destroy.add_argument(
        "--stop-timeout",
        type=_positive_int,
        default=120,
        metavar="SECONDS",
        help="how long to wait for a graceful stop (default: 120)",
    )
    destroy.set_defaults(handler=_machines_destroy)

    configure_move(sub, parents=common, epilog=_MACHINES_EPILOG)


def _machines_create(args: argparse.Namespace) -> int:
    return asyncio.run(_create(args))


async def _create(args: argparse.Namespace) -> int:
    settings, app, token = _fly_settings(args)
    env = dict(args.env)
    async with MachinesClient(app, token, settings.machines_api_url) as client:
        existing = await client.find_tenant_machines(args.tenant, settings.metadata_key)
        if args.replica:
            # A replica stands by for the lease like any second machine, and serves reads.
            if not existing:
                _err(
                    f"error: tenant {args.tenant} has no machine in app {app} yet: create "
                    "its first one without --replica"
                )
                return EXIT_FAILURE
            env["TENANTDB_REPLICA_READS"] = "1"
        elif existing:
            # One machine per tenant unless asked: a second one stands by, taking the
            # lease over only if the first goes.
            ids = ", ".join(m.id for m in existing)
            _err(
                f"error: tenant {args.tenant} already has machine(s) {ids} in app {app} "
                "(--replica adds a read replica)"
            )
            return EXIT_FAILURE
        machine = await client.create_machine(
            args.tenant,
            image=args.image,
            region=args.region,
            metadata_key=settings.metadata_key,
            env=env,
            internal_port=args.internal_port,
            memory_mb=args.memory_mb,
            cpus=args.cpus,
            kill_timeout=settings.kill_timeout,
            metrics_port=settings.metrics_port,
        )
    _out(
        f"created {'replica ' if args.replica else ''}machine {machine.id} for tenant "
        f"{args.tenant} (region {machine.region or '?'}, state {machine.state or '?'})"
    )
    if args.replica:
        _out(
            "every machine of the tenant needs TENANTDB_REPLICA_READS=1 (fly.toml [env], or "
            "--env when creating it): the holder's answers carry the bookmarks replicas wait for"
        )
    return EXIT_OK


def _machines_list(args: argparse.Namespace) -> int:
    return asyncio.run(_list(args))


async def _list(args: argparse.Namespace) -> int:
    settings, app, token = _fly_settings(args)
    key = settings.metadata_key
    async with MachinesClient(app, token, settings.machines_api_url) as client:
        if args.tenant:
            machines = await client.find_tenant_machines(args.tenant, key)
        else:
            machines = await client.list_machines()
    if args.json:
        rows = [{**m.to_json(), "tenant": m.tenant(key)} for m in machines]
        _out(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    if not machines:
        _out(f"no machines in app {app}" + (f" for tenant {args.tenant}" if args.tenant else ""))
        return EXIT_OK
    table = [("ID", "TENANT", "STATE", "REGION", "NAME")]
    table += [(m.id, m.tenant(key) or "-", m.state, m.region, m.name) for m in machines]
    print_table(table)
    return EXIT_OK


def _machines_destroy(args: argparse.Namespace) -> int:
    return asyncio.run(_destroy(args))


async def _destroy(args: argparse.Namespace) -> int:
    settings, app, token = _fly_settings(args)
    async with MachinesClient(app, token, settings.machines_api_url) as client:
        machines = await client.find_tenant_machines(args.tenant, settings.metadata_key)
        if not machines:
            _err(f"error: no machines for tenant {args.tenant} in app {app}")
            return EXIT_FAILURE
        ids = ", ".join(m.id for m in machines)
        if not args.yes:
            if not sys.stdin.isatty():
                _err(
                    f"error: refusing to destroy {ids} of tenant {args.tenant} without "
                    "confirmation: pass --yes"
                )
                return EXIT_FAILURE
            if not _confirm(f"Destroy machine(s) {ids} of tenant {args.tenant} in app {app}?"):
                _err("aborted")
                return EXIT_FAILURE
        await destroy_machines(
            client, machines, args.tenant, force=args.force, stop_timeout=args.stop_timeout
        )
    return EXIT_OK


# --- tenantdb dev ---


# Top-level subcommands.
COMMANDS: dict[str, Command] = {
    "machines": Command(
        help="create, list, move and destroy tenant machines (Fly Machines API)",
        configure=_configure_machines,
    ),
    **DEV_COMMANDS,
    **STATUS_COMMANDS,
    **RESTORE_COMMANDS,
    **TENANTS_COMMANDS,
    **QUERY_COMMANDS,
    **MIGRATE_COMMANDS,
    **DEPLOY_COMMANDS,
    **DOCTOR_COMMANDS,
    **KEYS_COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    """Return the ``tenantdb`` argument parser with every command in ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="One SQLite database per tenant, one Fly Machine per tenant.",
        epilog="Environment: FLY_API_TOKEN, FLY_APP_NAME, TENANTDB_MACHINES_API_URL, "
        "TENANTDB_METADATA_KEY (see Configuration in the README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.configure(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tenantdb`` command and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # --help, --version and usage errors: argparse has printed; keep its code.
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args)
    except TenantDBError as exc:
        _err(f"error: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line and exit 1, never a traceback
        _err(f"error: unexpected {type(exc).__name__}: {str(exc)[:500]} (a bug in tenantdb)")
        return EXIT_FAILURE
