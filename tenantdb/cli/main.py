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
import logging
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from tenantdb.cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Command,
    print_table,
)
from tenantdb.cli.common import confirm as _confirm
from tenantdb.cli.common import err as _err
from tenantdb.cli.common import fly_settings as _fly_settings
from tenantdb.cli.common import out as _out
from tenantdb.cli.common import positive_int as _positive_int
from tenantdb.cli.common import tenant_arg as _tenant_arg
from tenantdb.cli.deploy import DEPLOY_COMMANDS
from tenantdb.cli.doctor import DOCTOR_COMMANDS
from tenantdb.cli.keys import KEYS_COMMANDS
from tenantdb.cli.migrate import MIGRATE_COMMANDS
from tenantdb.cli.move import configure_move
from tenantdb.cli.query import QUERY_COMMANDS
from tenantdb.cli.restore import RESTORE_COMMANDS
from tenantdb.cli.status import STATUS_COMMANDS
from tenantdb.cli.teardown import destroy_machines
from tenantdb.cli.tenants import TENANTS_COMMANDS
from tenantdb.errors import ConfigurationError, TenantDBError
from tenantdb.logs import configure_logging
from tenantdb.routing.machines_api import MachinesClient

if TYPE_CHECKING:  # the emulation is imported only by the dev command
    from tenantdb.dev.cluster import ClusterConfig

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _version() -> str:
    try:
        return version("tenantdb")
    except PackageNotFoundError:
        return "unknown"


# --- argument types: raise ArgumentTypeError so argparse reports a usage error (exit 2) ---


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    if not sep or not _ENV_NAME_RE.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value[:80]!r}")
    return name, val


def _memory_mb(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of MB") from None
    # Fly allocates memory in 256 MB steps.
    if number < 256 or number % 256:
        raise argparse.ArgumentTypeError(f"{number} MB: use a multiple of 256 (256, 512, ...)")
    return number


def _port(value: str) -> int:
    number = _positive_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a TCP port")
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
        type=_port,
        default=8080,
        metavar="PORT",
        help="port the app listens on inside the machine (default: 8080)",
    )
    create.add_argument(
        "--env",
        type=_env_pair,
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


def _tenant_list(value: str) -> tuple[str, ...]:
    return tuple(_tenant_arg(part.strip()) for part in value.split(","))


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{number:g} must not be negative")
    return number


def _configure_dev(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the multi-tenant app on this computer as it runs on Fly.io: one process per "
        "machine (FLY_MACHINE_ID, TENANT_ID, its own data dir), Fly's internal DNS, and a proxy "
        "that load-balances, follows fly-replay and starts stopped machines. Data goes to the "
        "embedded bucket in STATE_DIR/bucket, or to BUCKET_NAME when set. Ctrl-C stops every "
        "machine gracefully, so each publishes its data."
    )
    parser.add_argument(
        "--tenants",
        type=_tenant_list,
        default=("100", "200", "300"),
        metavar="T1,T2,...",
        help="tenants to run machines for (default: 100,200,300)",
    )
    parser.add_argument(
        "--machines-per-tenant",
        type=_positive_int,
        default=1,
        metavar="N",
        help="machines per tenant; all but the lease holder stand by (default: 1)",
    )
    parser.add_argument(
        "--replicas-per-tenant",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="read replicas per tenant besides its holder (TENANTDB_REPLICA_READS=1 on "
        "every machine; instead of --machines-per-tenant)",
    )
    parser.add_argument(
        "--port", type=_port, default=8080, help="port of the proxy on 127.0.0.1 (default: 8080)"
    )
    parser.add_argument(
        "--app", default="tenantdb-dev", help="the emulated Fly app's name (default: tenantdb-dev)"
    )
    parser.add_argument("--region", default="dev", help="FLY_REGION of the machines (default: dev)")
    parser.add_argument(
        "--idle-stop",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="TENANTDB_IDLE_STOP of every machine: after this long without requests a "
        "machine releases its tenant and exits 0, and is stopped until the next request "
        "(default: the machines' own setting, 300; 0: never)",
    )
    parser.add_argument(
        "--no-autostart",
        dest="autostart",
        action="store_false",
        help="the machines' service has autostart off, like auto_start_machines = false: "
        "requests never start a stopped machine",
    )
    parser.add_argument(
        "--kill-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long a stopping machine gets after SIGINT before SIGKILL (default: 30)",
    )
    app = parser.add_mutually_exclusive_group()
    app.add_argument(
        "--app-module",
        default="example_app:app",
        metavar="MODULE:APP",
        help="ASGI app each machine serves with uvicorn (default: example_app:app)",
    )
    app.add_argument(
        "--command",
        metavar="CMD",
        help="run CMD in each machine instead; it must listen on $HOST:$PORT",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".tenantdb"),
        help="machines, their data dirs and the local bucket (default: .tenantdb)",
    )
    parser.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for every machine (repeatable)",
    )
    parser.set_defaults(handler=_dev)


def _non_negative_int(value: str) -> int:
    """A whole number of at least 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{number} must be at least 0")
    return number


def dev_cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """The cluster ``tenantdb dev`` runs, from its arguments."""
    from tenantdb.dev.cluster import ClusterConfig

    machines, env = args.machines_per_tenant, dict(args.env)
    if args.replicas_per_tenant is not None:
        if machines != 1:
            raise ConfigurationError(
                "--replicas-per-tenant sets the machines per tenant: leave out "
                "--machines-per-tenant"
            )
        machines = args.replicas_per_tenant + 1
        env["TENANTDB_REPLICA_READS"] = "1"
    return ClusterConfig(
        tenants=args.tenants,
        machines_per_tenant=machines,
        app_name=args.app,
        region=args.region,
        port=args.port,
        app_module=args.app_module,
        command=tuple(shlex.split(args.command or "")),
        state_dir=args.state_dir,
        idle_stop=args.idle_stop,
        kill_timeout=args.kill_timeout,
        autostart=args.autostart,
        env=env,
    )


def _dev(args: argparse.Namespace) -> int:
    # Imported here: the emulation brings uvicorn and the DNS server, which no other
    # command needs.
    from tenantdb.dev.cluster import serve
    from tenantdb.dev.proxy import MachineUnavailableError

    config = dev_cluster_config(args)
    configure_logging()
    # The machines' lines are formatted already: shown as they are, after the machine's name.
    relay = logging.StreamHandler()
    relay.setFormatter(logging.Formatter("%(message)s"))
    machine_lines = logging.getLogger("tenantdb.dev.machine")
    machine_lines.addHandler(relay)
    machine_lines.propagate = False
    # One line per request from the proxy's HTTP client would drown the replay lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        stopped_cleanly = asyncio.run(serve(config, announce=_out))
    except MachineUnavailableError as exc:
        _err(f"error: {exc}")
        return EXIT_FAILURE
    return EXIT_OK if stopped_cleanly else EXIT_FAILURE


# Top-level subcommands.
COMMANDS: dict[str, Command] = {
    "machines": Command(
        help="create, list, move and destroy tenant machines (Fly Machines API)",
        configure=_configure_machines,
    ),
    "dev": Command(
        help="run the tenants' machines locally behind a Fly-like proxy (no cloud account)",
        configure=_configure_dev,
    ),
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
