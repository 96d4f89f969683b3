"""The operator's verbs on tenants' data in the bucket: status, history, restore, verify, rollback.

Each opens the bucket the environment names (``BUCKET_NAME`` for S3, else the embedded
local bucket directory), which must exist: none of them creates one. All but ``rollback``
only read it: they take no lease and write no object. ``rollback`` takes the lease as a
machine would and publishes a new state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sqlite3
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from tenantdb.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    TIME_HELP,
    Command,
    confirm,
    err,
    format_age,
    format_size,
    out,
    print_table,
    tenant_arg,
    time_arg,
)
from tenantdb.cli.progress import transfer_progress
from tenantdb.config import Settings
from tenantdb.errors import (
    IntegrityCheckError,
    InvalidTenantError,
    LeaseHeldError,
    TenantDBError,
)
from tenantdb.protocol.lease import Lease, ObservedLock, read_lock
from tenantdb.replication.history import History, read_history
from tenantdb.replication.pitr import RestoredPoint, restore_at
from tenantdb.replication.rollback import rollback
from tenantdb.storage import Bucket, describe_bucket, open_bucket
from tenantdb.tenants import validate_tenant

__all__ = [
    "TENANT_COMMANDS",
    "TenantStatus",
    "list_tenants",
    "read_status",
]

# Tenants read at once (lock.json and a LIST each): enough to hide round trips, few enough
# to stay far below any bucket's request rate limits.
_PARALLEL_READS = 8
LeaseState = Literal["held", "expired", "released"]


@dataclass(frozen=True)
class TenantStatus:
    """One tenant as its lock.json shows it, with times on the bucket's clock."""

    tenant: str
    observed: ObservedLock
    expires_in: float
    now: datetime
    # The earliest moment a point-in-time restore accepts, when the history was read.
    restorable_from: datetime | None = None

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
            "released": record.released,
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
            "restorable_from": _iso(self.restorable_from),
            "checked_at": _iso(self.now),
        }

    def row(self) -> tuple[str, ...]:
        """This status as a row of the ``tenantdb status`` table."""
        record = self.observed.record
        if self.lease == "released":
            # "idle": the tenant's machines stopped themselves; the next request wakes one.
            lease = f"released ({record.released})" if record.released else "released"
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
            _iso(self.restorable_from) or "-",
        )


_STATUS_HEADER = (
    "TENANT",
    "HOLDER",
    "REGION",
    "GEN",
    "LEASE",
    "TAIL",
    "LOG AGE",
    "SNAPSHOT",
    "RESTORABLE FROM",
)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


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
    """The tenant's status from its lock.json alone; None when it has none (no such tenant)."""
    observed = await read_lock(bucket, tenant, f"{prefix}{tenant}/lock.json")
    return None if observed is None else _status_of(bucket, tenant, observed, prefix)


async def _read_full_status(bucket: Bucket, tenant: str, *, prefix: str) -> TenantStatus | None:
    """The tenant's status with its retention window (a LIST of its objects)."""
    history = await read_history(bucket, tenant, prefix=prefix)
    if history.lock is None:
        return None
    return _status_of(bucket, tenant, history.lock, prefix, history.restorable_from())


def _status_of(
    bucket: Bucket,
    tenant: str,
    observed: ObservedLock,
    prefix: str,
    restorable_from: datetime | None = None,
) -> TenantStatus:
    # A Lease object only to judge expiry as holders do: it never writes here.
    judge = Lease(bucket, tenant, machine_id="tenantdb-cli", region="", ttl=1, prefix=prefix)
    now = observed.info.server_date or datetime.now(UTC)
    return TenantStatus(tenant, observed, judge.expires_in(observed), now, restorable_from)


# --- tenantdb status ---


def _configure_status(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show each tenant's lease (holder, region, generation, seconds left on the bucket's "
        "clock), log tail and its age, newest snapshot, and the earliest moment a "
        "point-in-time restore accepts (a LIST of the tenant's objects). Without TENANT, "
        "every tenant under the prefix."
    )
    parser.add_argument("tenants", nargs="*", type=tenant_arg, metavar="TENANT")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(handler=lambda args: asyncio.run(_status(args)))


async def _status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    prefix, bucket_name = settings.prefix, describe_bucket(settings)
    async with open_bucket(settings, create=False) as bucket:
        tenants = args.tenants or await list_tenants(bucket, prefix)
        limit = asyncio.Semaphore(_PARALLEL_READS)

        async def one(tenant: str) -> TenantStatus | Exception | None:
            async with limit:
                try:
                    return await _read_full_status(bucket, tenant, prefix=prefix)
                except TenantDBError as exc:
                    return exc
                except Exception as exc:  # a bug: the other tenants are still shown
                    return RuntimeError(f"unexpected {type(exc).__name__}: {str(exc)[:500]}")

        results = await asyncio.gather(*(one(t) for t in tenants))
    code = EXIT_OK
    found: list[TenantStatus] = []
    for tenant, result in zip(tenants, results, strict=True):
        if isinstance(result, TenantStatus):
            found.append(result)
            continue
        code = EXIT_FAILURE
        if result is None:
            err(f"error: tenant {tenant}: no {prefix}{tenant}/lock.json in the {bucket_name}")
        else:
            err(f"error: tenant {tenant}: {result}")
    if args.json:
        out(json.dumps([s.to_json() for s in found], indent=2))
    elif found:
        print_table([_STATUS_HEADER, *(s.row() for s in found)])
        err(f"(read from the {bucket_name})")
    elif not tenants:
        err(f"no tenants under {prefix!r} in the {bucket_name}")
    return code


# --- tenantdb history ---


def _configure_history(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "List TENANT's snapshots and log segments in the bucket (size, when written, which "
        "generation wrote them, whether lock.json ever published them) and its takeovers "
        "(each acquisition of the lease), with the earliest moment a restore accepts."
    )
    parser.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=lambda args: asyncio.run(_history(args)))


async def _history(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    async with open_bucket(settings, create=False) as bucket:
        history = await read_history(bucket, args.tenant, prefix=settings.prefix)
    if history.lock is None and not (history.snapshots or history.segments or history.takeovers):
        err(
            f"error: tenant {args.tenant}: nothing under {settings.prefix}{args.tenant}/ in the "
            f"{describe_bucket(settings)}"
        )
        return EXIT_FAILURE
    if args.json:
        out(json.dumps(_history_json(history), indent=2))
    else:
        _print_history(history)
    return EXIT_OK


def _history_json(history: History) -> dict[str, Any]:
    def plain(value: Any) -> dict[str, Any]:
        fields = asdict(value)
        return {k: _iso(v) if isinstance(v, datetime) else v for k, v in fields.items()}

    return {
        "tenant": history.tenant,
        "restorable_from": _iso(history.restorable_from()),
        "snapshots": [plain(s) for s in history.snapshots],
        "segments": [plain(s) for s in history.segments],
        "takeovers": [
            {k: v for k, v in plain(t).items() if k != "claim"} for t in history.takeovers
        ],
    }


def _print_history(history: History) -> None:
    root = f"{history.prefix}{history.tenant}/"

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    def section(title: str, rows: list[tuple[str, ...]]) -> None:
        out(f"{title}:")
        if len(rows) > 1:
            print_table(rows)
        else:
            out("  (none)")
        out("")

    out(f"tenant {history.tenant}: restorable from {_iso(history.restorable_from()) or 'nowhere'}")
    out("")
    section(
        "snapshots",
        [
            ("KEY", "SIZE", "WRITTEN", "GEN", "BASE", "TAKEN AT", "PUBLISHED"),
            *(
                (
                    s.key.removeprefix(root),
                    format_size(s.size),
                    _iso(s.last_modified) or "-",
                    str(s.generation),
                    str(s.base) if s.base is not None else "-",
                    _iso(s.taken_at) or "-",
                    yes(s.published),
                )
                for s in history.snapshots
            ),
        ],
    )
    section(
        "log segments",
        [
            ("KEY", "SIZE", "WRITTEN", "GEN", "FIRST", "LAST", "MERGED", "PUBLISHED"),
            *(
                (
                    s.key.removeprefix(root),
                    format_size(s.size),
                    _iso(s.last_modified) or "-",
                    str(s.generation),
                    str(s.first),
                    str(s.last),
                    yes(s.merged),
                    yes(s.published),
                )
                for s in history.segments
            ),
        ],
    )
    section(
        "takeovers",
        [
            ("GEN", "OWNER", "REGION", "AT", "LOG TAIL THEN"),
            *(
                (str(t.generation), t.owner or "-", t.region or "-", _iso(t.at) or "-", str(t.tail))
                for t in history.takeovers
            ),
        ],
    )


# --- tenantdb restore / verify ---


def _add_at(parser: argparse.ArgumentParser) -> None:
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
    _add_at(parser)
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
    err(f"restored tenant {args.tenant} {_as_of(point)} to {dest} ({size})")
    return EXIT_OK


async def _restore_to(tenant: str, dest: Path, *, at: datetime | None) -> RestoredPoint:
    """Restore ``tenant`` as of ``at`` into ``dest``, with a progress bar on a terminal."""
    settings = Settings.from_env()
    async with open_bucket(settings, create=False) as bucket:
        with transfer_progress(f"restoring {tenant}") as progress:
            return await restore_at(
                bucket, tenant, dest, prefix=settings.prefix, at=at, progress=progress
            )


def _as_of(point: RestoredPoint) -> str:
    """When the restored database stood so, for people."""
    if point.at is None:
        return "as created (empty)"
    return f"as of {_iso(point.at)} (log index {point.index})"


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Restore TENANT into a temporary file (every object verified as a machine's restore "
        "does) and run PRAGMA integrity_check on it. Exit 1 on any problem, naming the "
        "damaged object's key. Reads the bucket only."
    )
    parser.add_argument("tenant", type=tenant_arg, metavar="TENANT")
    _add_at(parser)
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
        problems = await asyncio.to_thread(_integrity_problems, dest)
    if problems:
        raise IntegrityCheckError(tenant=args.tenant, problems=problems)
    err(f"tenant {args.tenant}: ok {_as_of(point)}, integrity_check passed")
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
    tenant, moment = args.tenant, _iso(args.to)
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
        f"rolled tenant {tenant} back {_as_of(result.restored)}: generation "
        f"{result.generation}, snapshot {result.snapshot}"
    )
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
        help="show tenants' leases, logs, snapshots and retention windows from the bucket",
        configure=_configure_status,
    ),
    "history": Command(
        help="list a tenant's snapshots, log segments and takeovers in the bucket",
        configure=_configure_history,
    ),
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
