"""``tenantdb machines move``: move a tenant to a new machine in another region.

The move is a handoff, as a graceful stop makes one: a copy of the tenant's machine starts
in the new region and stands by (the old one holds the lease), the old machine is stopped
through the Machines API (Fly sends it its stop signal, SIGINT: it ships its log tail and
releases the lease), the standby takes the lease at once, and only when the tenant's
``lock.json`` names the new machine is the old one destroyed. Any step that fails stops the
move with both machines in place and says what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenantdb.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    err,
    fly_settings,
    out,
    positive_int,
    tenant_arg,
)
from tenantdb.cli.status import TenantStatus, read_status
from tenantdb.errors import MachinesAPIError, MoveError, TenantDBError
from tenantdb.routing.machines_api import Machine, MachinesClient
from tenantdb.storage import Bucket, open_bucket

__all__ = ["configure_move", "move_tenant"]

_REGION_RE = re.compile(r"[a-z][a-z0-9]{1,9}")
# How often lock.json is read while waiting for the new machine to take the lease.
_POLL_INTERVAL = 0.5
# States in which the old machine may still be running its process.
_QUIET_STATES = frozenset({"stopped", "created", "suspended"})

Report = Callable[[str], None]


@dataclass(frozen=True)
class MoveTimeouts:
    """How long each wait of a move may take, in seconds."""

    start: float = 120.0
    handoff: float = 120.0


def _region(value: str) -> str:
    if not _REGION_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a Fly region code (ams, iad, ...)")
    return value


def configure_move(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    parents: list[argparse.ArgumentParser],
    epilog: str,
) -> None:
    """Add ``move`` to the ``machines`` subcommands."""
    move = sub.add_parser(
        "move",
        parents=parents,
        epilog=epilog,
        help="move a tenant to a new machine in another region (a graceful handoff)",
        description="Start a copy of TENANT's machine in REGION (same image, config and "
        "metadata), wait until it runs, stop the old machine gracefully (it ships its log "
        "and releases the lease; the new one takes it at once), wait until the tenant's "
        "lock.json names the new machine, then destroy the old one. On any failure both "
        "machines are kept and the error says what to do. Needs the bucket's settings "
        "(BUCKET_NAME and the AWS_* variables) besides the Fly ones.",
    )
    move.add_argument("tenant", type=tenant_arg, metavar="TENANT", help="tenant id")
    move.add_argument("--region", type=_region, required=True, help="the Fly region to move to")
    move.add_argument(
        "--start-timeout",
        type=positive_int,
        default=120,
        metavar="SECONDS",
        help="how long the new machine may take to start (default: 120)",
    )
    move.add_argument(
        "--handoff-timeout",
        type=positive_int,
        default=120,
        metavar="SECONDS",
        help="how long the old machine may take to stop and the new one to take the "
        "lease (default: 120; keep it above the machines' kill_timeout)",
    )
    move.set_defaults(handler=lambda args: asyncio.run(_move(args)))


async def _move(args: argparse.Namespace) -> int:
    settings, app, token = fly_settings(args)
    timeouts = MoveTimeouts(start=args.start_timeout, handoff=args.handoff_timeout)
    async with (
        MachinesClient(app, token, settings.machines_api_url) as client,
        open_bucket(settings) as bucket,
    ):
        machines = await client.find_tenant_machines(args.tenant, settings.metadata_key)
        if len(machines) != 1:
            ids = ", ".join(m.id for m in machines) or "none"
            err(
                f"error: tenant {args.tenant} must have exactly one machine to move, it has "
                f"{ids}; finish or undo an earlier move (`tenantdb machines list --tenant "
                f"{args.tenant}`)"
            )
            return EXIT_FAILURE
        [old] = machines
        if old.region == args.region:
            err(f"error: machine {old.id} of tenant {args.tenant} is in {args.region} already")
            return EXIT_FAILURE
        if not settings.consistent_across_regions:
            err(
                f"error: the bucket is not declared strongly consistent across regions "
                f"(TENANTDB_BUCKET_CONSISTENCY={settings.bucket_consistency}), so a machine in "
                f"{args.region} would refuse the lease last held in {old.region or 'its region'}; "
                "make the bucket Single-region or Multi-region and set "
                "TENANTDB_BUCKET_CONSISTENCY=strong; nothing was changed"
            )
            return EXIT_FAILURE
        problem = await _lock_problem(bucket, args.tenant, old, settings.prefix)
        if problem:
            err(f"error: {problem}; nothing was changed")
            return EXIT_FAILURE
        started = time.monotonic()
        new = await move_tenant(
            client,
            bucket,
            old,
            tenant=args.tenant,
            region=args.region,
            prefix=settings.prefix,
            timeouts=timeouts,
            report=err,
        )
    out(
        f"moved tenant {args.tenant} from machine {old.id} ({old.region or '?'}) to "
        f"{new.id} ({new.region or args.region}) in {time.monotonic() - started:.1f}s"
    )
    return EXIT_OK


async def _lock_problem(bucket: Bucket, tenant: str, old: Machine, prefix: str) -> str:
    """Why the bucket cannot show this move's handoff ("" if it can).

    Checked before anything changes: a move watched in the wrong bucket would stop the old
    machine and then wait in vain.
    """
    status = await read_status(bucket, tenant, prefix=prefix)
    if status is None:
        return (
            f"the {bucket.kind} bucket has no {prefix}{tenant}/lock.json: set BUCKET_NAME and "
            "the AWS_* variables to the app's bucket (`fly storage list`)"
        )
    owner = status.observed.record.owner
    if owner not in (None, old.id):
        return (
            f"{prefix}{tenant}/lock.json names machine {owner} as holder, not {old.id}: "
            "is this the app's bucket, and TENANTDB_PREFIX its prefix?"
        )
    return ""


async def move_tenant(
    client: MachinesClient,
    bucket: Bucket,
    old: Machine,
    *,
    tenant: str,
    region: str,
    prefix: str,
    timeouts: MoveTimeouts,
    report: Report,
) -> Machine:
    """Move ``tenant`` from machine ``old`` to a copy of it in ``region``; return the copy.

    Raises ``MoveError`` (both machines kept) when a step fails.
    """
    report(f"creating a copy of machine {old.id} in {region} ...")
    try:
        new = await client.copy_machine(old.id, region=region, name=f"{tenant}-{region}")
    except asyncio.CancelledError:
        report(
            f"interrupted while creating the copy: machine {old.id} still serves the tenant; "
            f"a copy may exist: check `tenantdb machines list --tenant {tenant}`"
        )
        raise
    except MachinesAPIError as exc:
        raise MoveError(
            f"move of tenant {tenant} stopped: creating the copy failed ({exc}). Machine "
            f"{old.id} still serves the tenant. A copy may exist all the same (an answer "
            f"can be lost): check `tenantdb machines list --tenant {tenant}` and destroy "
            "any new machine before trying again.",
            tenant=tenant,
            step="create",
            kept=(old.id,),
        ) from exc
    try:
        await _hand_over(
            client, bucket, old, new, tenant=tenant, prefix=prefix, timeouts=timeouts, report=report
        )
    except asyncio.CancelledError:
        # Ctrl-C: the machines stay as they are, and the operator learns which they are.
        report(
            f"interrupted: both machines are kept (old {old.id}, new {new.id}); see "
            f"`tenantdb status {tenant}` for which holds the lease, and `tenantdb machines "
            f"list --tenant {tenant}`"
        )
        raise
    return new


async def _hand_over(
    client: MachinesClient,
    bucket: Bucket,
    old: Machine,
    new: Machine,
    *,
    tenant: str,
    prefix: str,
    timeouts: MoveTimeouts,
    report: Report,
) -> None:
    """Start ``new``, stop ``old``, watch the lease move to ``new``, destroy ``old``."""
    kept = (old.id, new.id)

    def failed(step: str, problem: str, advice: str) -> MoveError:
        return MoveError(
            f"move of tenant {tenant} stopped: {problem}. Both machines are kept "
            f"(old {old.id}, new {new.id}). {advice}",
            tenant=tenant,
            step=step,
            kept=kept,
        )

    report(f"waiting for machine {new.id} to start ...")
    try:
        await client.wait_for_state(
            new.id, "started", instance_id=new.instance_id, timeout=timeouts.start
        )
    except MachinesAPIError as exc:
        raise failed(
            "start",
            f"new machine {new.id} did not start ({exc})",
            f"{old.id} still serves the tenant; remove the new one with "
            f"`fly machine destroy {new.id} --force`, then try again.",
        ) from exc

    if old.state not in _QUIET_STATES:
        report(f"stopping machine {old.id} gracefully (it ships its log and releases the lease)")
        try:
            await client.stop_machine(old.id)
        except MachinesAPIError as exc:
            raise failed(
                "stop",
                f"stopping {old.id} failed ({exc})",
                f"Run the move's last steps by hand: `fly machine stop {old.id}`, check "
                f"`tenantdb status {tenant}` names {new.id}, then `fly machine destroy "
                f"{old.id}`; or remove the new one with `fly machine destroy {new.id} --force`.",
            ) from exc

    report(f"waiting for lock.json to name machine {new.id} ...")
    try:
        status = await _wait_for_owner(bucket, tenant, new.id, prefix, timeouts.handoff, report)
    except (TenantDBError, TimeoutError) as exc:
        raise failed(
            "handoff",
            f"machine {new.id} did not take the lease ({exc})",
            f"See `tenantdb status {tenant}` and the new machine's logs (`fly logs -i "
            f"{new.id}`). To go back: `fly machine destroy {new.id} --force`, then "
            f"`fly machine start {old.id}`.",
        ) from exc
    report(f"machine {new.id} holds the lease (generation {status.observed.record.generation})")

    try:
        await client.wait_for_state(
            old.id, "stopped", instance_id=old.instance_id, timeout=timeouts.handoff
        )
        await client.destroy_machine(old.id, force=True)
    except MachinesAPIError as exc:
        raise failed(
            "destroy",
            f"the old machine {old.id} could not be destroyed ({exc})",
            f"{new.id} serves the tenant; remove the old one with "
            f"`fly machine destroy {old.id} --force`.",
        ) from exc
    report(f"destroyed machine {old.id}")


async def _wait_for_owner(
    bucket: Bucket, tenant: str, owner: str, prefix: str, timeout: float, report: Report
) -> TenantStatus:
    """Poll lock.json until ``owner`` holds the lease; report each change of holder."""
    deadline = time.monotonic() + timeout
    seen = ""
    last_error = "no lock.json"
    while True:
        try:
            status = await read_status(bucket, tenant, prefix=prefix)
        except TenantDBError as exc:
            # A bucket hiccup is not the end of a handoff: keep polling until the deadline.
            status, last_error = None, str(exc)
        if status is not None:
            record = status.observed.record
            holder = f"owner {record.owner}" if record.owner else "released"
            now = f"{holder}, generation {record.generation}"
            if now != seen:
                report(f"  lock.json: {now}")
                seen = now
            if record.owner == owner and status.lease == "held":
                return status
        if time.monotonic() >= deadline:
            where = f"lock.json says {seen}" if seen else last_error
            raise TimeoutError(f"not within {timeout:.0f}s; {where}")
        await asyncio.sleep(_POLL_INTERVAL)
