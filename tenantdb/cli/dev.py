"""``tenantdb dev``: the tenants' machines on this computer, behind a Fly-like proxy."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from tenantdb.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Command,
    env_pair,
    port_number,
)
from tenantdb.cli.common import err as _err
from tenantdb.cli.common import out as _out
from tenantdb.cli.common import positive_int as _positive_int
from tenantdb.cli.common import tenant_arg as _tenant_arg
from tenantdb.errors import ConfigurationError
from tenantdb.logs import configure_logging

if TYPE_CHECKING:  # the emulation is imported only by the dev command
    from tenantdb.dev.cluster import ClusterConfig

__all__ = ["DEV_COMMANDS", "dev_cluster_config"]


def _tenant_list(value: str) -> tuple[str, ...]:
    return tuple(_tenant_arg(part.strip()) for part in value.split(","))


def _region_list(value: str) -> tuple[str, ...]:
    from tenantdb.dev.regions import validate_regions

    try:
        return validate_regions([part.strip() for part in value.split(",")])
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _latency_ms(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of milliseconds") from None
    if not 0 <= number <= 10_000:
        raise argparse.ArgumentTypeError(f"{number:g} ms must be 0 to 10000")
    return number


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
        "--port",
        type=port_number,
        default=8080,
        help="port of the proxy on 127.0.0.1 (default: 8080)",
    )
    parser.add_argument(
        "--app", default="tenantdb-dev", help="the emulated Fly app's name (default: tenantdb-dev)"
    )
    parser.add_argument(
        "--regions",
        "--region",
        type=_region_list,
        default=("dev",),
        metavar="R1,R2,...",
        help="regions of the machines (FLY_REGION): each tenant's first machine in the first, "
        "its others spread over them all in turn; requests enter in the first unless their "
        "tenantdb-dev-region header names another (default: dev)",
    )
    parser.add_argument(
        "--region-latency-ms",
        type=_latency_ms,
        default=30.0,
        metavar="MS",
        help="latency injected each way of every hop between two regions: the proxy to a "
        "machine, one machine to another (default: 30)",
    )
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
        type=env_pair,
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
    from tenantdb.dev.regions import RegionLatency

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
        regions=args.regions,
        latency=RegionLatency(args.region_latency_ms / 1000),
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


DEV_COMMANDS: dict[str, Command] = {
    "dev": Command(
        help="run the tenants' machines locally behind a Fly-like proxy (no cloud account)",
        configure=_configure_dev,
    ),
}
