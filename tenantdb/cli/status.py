"""The operator's reading verbs on tenants in the bucket: ``status`` and ``history``.

Each opens the bucket the environment names (``BUCKET_NAME`` for S3, else the embedded
local bucket directory), which must exist: none of them creates one. They take no lease
and write no object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from tenantdb.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Command,
    err,
    format_age,
    format_size,
    iso,
    out,
    print_table,
    tenant_arg,
)
from tenantdb.cli.cost import Prices, TenantCost, cost_of
from tenantdb.cli.plaintext import Plaintext, plaintext_in_history
from tenantdb.config import Settings
from tenantdb.errors import InvalidTenantError, TenantDBError
from tenantdb.fleet.purge import is_purge_mark
from tenantdb.protocol.lease import Lease, ObservedLock, read_lock
from tenantdb.replication.history import History, read_history
from tenantdb.storage import Bucket, describe_bucket, open_bucket
from tenantdb.storage.encrypted import EncryptedBucket
from tenantdb.tenants import validate_tenant

__all__ = [
    "STATUS_COMMANDS",
    "TenantStatus",
    "list_tenants",
    "read_status",
]

# Tenants read at once (lock.json and a LIST each): enough to hide round trips, few enough
# to stay far below any bucket's request rate limits.
_PARALLEL_READS = 8
LeaseState = Literal["held", "expired", "released", "purging"]


@dataclass(frozen=True)
class TenantStatus:
    """One tenant as its lock.json shows it, with times on the bucket's clock."""

    tenant: str
    observed: ObservedLock
    expires_in: float
    now: datetime
    # The earliest moment a point-in-time restore accepts, when the history was read.
    restorable_from: datetime | None = None
    # With encryption on (and the history read): the plaintext objects lock.json names.
    plaintext: Plaintext | None = None
    # With the history read: the last day's usage and the bytes stored, and their prices.
    cost: TenantCost | None = None
    prices: Prices | None = None

    @property
    def lease(self) -> LeaseState:
        """Whether a machine holds the lease now, or a purge is deleting the tenant."""
        if self.observed.record.owner is None:
            return "released"
        if is_purge_mark(self.observed.record):
            return "purging"
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
            "expires_in": round(self.expires_in, 1) if self.lease in ("held", "expired") else None,
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
            "restorable_from": iso(self.restorable_from),
            "encryption": None
            if self.plaintext is None
            else {"data_key": self.plaintext.data_key, "plaintext": list(self.plaintext.keys)},
            "cost": None
            if self.cost is None or self.prices is None
            else {
                "last_day": asdict(self.cost.last_day),
                "stored_bytes": self.cost.stored_bytes,
                "monthly_usd": round(self.cost.monthly(self.prices), 4),
                "prices": asdict(self.prices),
            },
            "checked_at": iso(self.now),
        }

    def row(self) -> tuple[str, ...]:
        """This status as a row of the ``tenantdb status`` table (PLAINTEXT: with encryption)."""
        record = self.observed.record
        if self.lease == "released":
            # "idle": the tenant's machines stopped themselves; the next request wakes one.
            lease = f"released ({record.released})" if record.released else "released"
        elif self.lease == "purging":
            # Until `tenants delete --purge` is run again and finishes: no machine takes it.
            lease = "purging"
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
            iso(self.restorable_from) or "-",
            *self._cost_cells(),
            *(() if self.plaintext is None else (_plaintext_cell(self.plaintext),)),
        )

    def _cost_cells(self) -> tuple[str, str]:
        """The last day's billed requests (class A / B) and the month's estimate."""
        if self.cost is None or self.prices is None:
            return "-", "-"
        day = self.cost.last_day
        return f"{day.class_a:,} / {day.class_b:,}", f"${self.cost.monthly(self.prices):,.2f}"


def _plaintext_cell(plaintext: Plaintext) -> str:
    count = len(plaintext.keys)
    if not count:
        return "none"
    return f"{count} object{'s' if count > 1 else ''}" + (
        "" if plaintext.data_key else " (no data key)"
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
    "REQUESTS A/B (DAY)",
    "EST./MONTH",
)


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


async def _read_full_status(
    bucket: Bucket, tenant: str, *, prefix: str, prices: Prices
) -> TenantStatus | None:
    """The tenant's status with its retention window and cost (a LIST of its objects)."""
    history = await read_history(bucket, tenant, prefix=prefix)
    if history.lock is None:
        return None
    status = _status_of(bucket, tenant, history.lock, prefix, history.restorable_from())
    status = replace(status, cost=cost_of(history, status.now), prices=prices)
    if isinstance(bucket, EncryptedBucket):
        return replace(status, plaintext=await plaintext_in_history(bucket, history))
    return status


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
        "point-in-time restore accepts (a LIST of the tenant's objects). With "
        "TENANTDB_ENCRYPTION_KEY set, also how many objects of the history lock.json names "
        "are still plaintext (written before the tenant's data key; `tenantdb keys seal` "
        "takes a sealed snapshot). Also what the tenant cost in its last day: the billed "
        "requests its machines recorded (class A: writes and lists, B: reads; each machine "
        "records once an hour and when it stops), and a month's estimate with the storage, at "
        "TENANTDB_PRICE_CLASS_A and _CLASS_B (USD per 1,000 requests) and "
        "TENANTDB_PRICE_STORAGE (per GB a month), Tigris's list prices by default. Without "
        "TENANT, every tenant under the prefix."
    )
    parser.add_argument("tenants", nargs="*", type=tenant_arg, metavar="TENANT")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(handler=lambda args: asyncio.run(_status(args)))


async def _status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    prefix, bucket_name = settings.prefix, describe_bucket(settings)
    prices = Prices.of(settings)
    async with open_bucket(settings, create=False) as bucket:
        tenants = args.tenants or await list_tenants(bucket, prefix)
        limit = asyncio.Semaphore(_PARALLEL_READS)

        async def one(tenant: str) -> TenantStatus | Exception | None:
            async with limit:
                try:
                    return await _read_full_status(bucket, tenant, prefix=prefix, prices=prices)
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
        header = _STATUS_HEADER + (("PLAINTEXT",) if settings.encryption_keys else ())
        print_table([header, *(s.row() for s in found)])
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
        return {k: iso(v) if isinstance(v, datetime) else v for k, v in fields.items()}

    return {
        "tenant": history.tenant,
        "restorable_from": iso(history.restorable_from()),
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

    out(f"tenant {history.tenant}: restorable from {iso(history.restorable_from()) or 'nowhere'}")
    out("")
    section(
        "snapshots",
        [
            ("KEY", "SIZE", "WRITTEN", "GEN", "BASE", "TAKEN AT", "PUBLISHED"),
            *(
                (
                    s.key.removeprefix(root),
                    format_size(s.size),
                    iso(s.last_modified) or "-",
                    str(s.generation),
                    str(s.base) if s.base is not None else "-",
                    iso(s.taken_at) or "-",
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
                    iso(s.last_modified) or "-",
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
                (str(t.generation), t.owner or "-", t.region or "-", iso(t.at) or "-", str(t.tail))
                for t in history.takeovers
            ),
        ],
    )


STATUS_COMMANDS: dict[str, Command] = {
    "status": Command(
        help="show tenants' leases, logs, snapshots and retention windows from the bucket",
        configure=_configure_status,
    ),
    "history": Command(
        help="list a tenant's snapshots, log segments and takeovers in the bucket",
        configure=_configure_history,
    ),
}
