"""Roll a tenant back: publish its database as of an earlier moment as a new generation.

The one operator action that changes a tenant. It takes the lease like any machine (so it
is refused while a live machine holds it, unless asked to wait), records its takeover,
restores the moment with ``restore_at``, publishes the result as a new snapshot whose log
continues after the current tail, and releases the lease. The snapshot is stamped on the
bucket's clock, after every time the history holds, never on the operator's: a restore as
of any moment before the rollback returns what was there then. Nothing is deleted: the
history after that moment stays restorable until retention removes it, and the next
machine to start restores the rolled-back state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tenantdb.config import Settings
from tenantdb.errors import ConfigurationError, LeaseHeldError, LeaseLostError, TenantDBError
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LockRecord, LogPointer, SchemaVersion
from tenantdb.protocol.snapshot import publish_snapshot, temp_snapshot_path
from tenantdb.replication.history import read_history
from tenantdb.replication.pitr import Progress, RestoredPoint, restore_at
from tenantdb.replication.shipper import carried_segments, put_log_object
from tenantdb.replication.takeovers import record_takeover, takeover_key
from tenantdb.storage.base import Bucket

__all__ = [
    "RollbackResult",
    "acquire",
    "give_back",
    "operator_lease",
    "publish_as_newest",
    "republish",
    "rollback",
    "routing_hint",
]

log = logging.getLogger("tenantdb")


@dataclass(frozen=True)
class RollbackResult:
    """What a rollback (or another ``republish``) published."""

    generation: int
    restored: RestoredPoint
    snapshot: str


async def rollback(
    settings: Settings,
    bucket: Bucket,
    to: datetime,
    *,
    wait: bool = False,
    progress: Progress | None = None,
    work_dir: Path | None = None,
) -> RollbackResult:
    """Publish ``settings.tenant``'s database as of ``to`` as its newest state.

    Raises ``LeaseHeldError`` while another machine holds the lease, unless ``wait``: then
    it waits for the lease to be released or to expire.
    """
    tenant = settings.tenant
    if tenant is None:
        raise ConfigurationError("no tenant to roll back: name one", variable="TENANT_ID")
    result = await republish(
        settings, bucket, tenant, "rollback", at=to, wait=wait, work_dir=work_dir
    )
    log.info(
        "tenant %s: rolled back to %s as generation %d (%s)",
        tenant,
        result.restored.at,
        result.generation,
        result.snapshot,
    )
    return result


async def republish(
    settings: Settings,
    bucket: Bucket,
    tenant: str,
    role: str,
    *,
    at: datetime | None,
    wait: bool = False,
    work_dir: Path | None = None,
) -> RollbackResult:
    """Under ``tenant``'s lease, taken as ``role``: restore it as of ``at`` (None: now),
    publish that as its newest state through ``bucket``, release. ``LeaseHeldError`` while
    another machine holds the lease, unless ``wait``.

    It reports what happened in the bucket, not what its last request was told: a publish
    whose answer was lost but which landed is a published result, and so is one whose
    release then failed (the lease then expires after its TTL instead).
    """
    lease = operator_lease(settings, bucket, tenant, role)
    await acquire(lease, wait=wait)
    renewing = asyncio.get_running_loop().create_task(lease.keep_renewed())
    copy = temp_snapshot_path(work_dir or Path.cwd())
    try:
        await record_takeover(lease)
        restored = await restore_at(bucket, tenant, copy, prefix=settings.prefix, at=at)
        # The schema of a past state is not recorded: unknown until a machine opens it.
        # The current state (a seal) keeps the schema lock.json records.
        previous = lease.previous
        schema = previous.schema if at is None and previous is not None else None
        try:
            await publish_as_newest(
                lease,
                copy,
                prefix=settings.prefix,
                state=restored.state,
                db_pages=restored.db_pages,
                schema=schema,
            )
        except TenantDBError:
            # The release's conditional write finds out whether the publish landed
            # unheard (a 412 on our own landed write adopts it).
            await give_back(lease)
            if not _published(lease):
                if lease.status == "held":  # the release failed too: nothing more is known
                    log.warning(
                        "tenant %s: the %s may have been published (a write's answer was "
                        "lost and the release failed): `tenantdb status %s` shows what "
                        "lock.json names",
                        tenant,
                        role,
                        tenant,
                    )
                raise
        else:
            await _release(lease, role)
    except BaseException:
        await give_back(lease)
        raise
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        copy.unlink(missing_ok=True)
    record = lease.record
    if record is None or record.snapshot is None:
        raise LeaseLostError(f"tenant {tenant}: the {role} was not published", tenant=tenant)
    return RollbackResult(record.generation, restored, record.snapshot.key)


def _published(lease: Lease) -> bool:
    """Whether the last write of ``lease`` known to have landed names a new snapshot."""
    record, previous = lease.record, lease.previous
    if record is None or record.snapshot is None:
        return False
    return previous is None or previous.snapshot != record.snapshot


async def _release(lease: Lease, role: str) -> None:
    """Release after the publish: a failure leaves the lease to expire, the result stands."""
    try:
        await lease.release(last_owner=routing_hint(lease))
    except TenantDBError as exc:
        log.warning(
            "tenant %s: the %s is published, but its lease could not be released (%s): "
            "machines take the tenant over once it expires, within %.0fs",
            lease.tenant,
            role,
            exc,
            lease.ttl,
        )


def operator_lease(settings: Settings, bucket: Bucket, tenant: str, role: str) -> Lease:
    """The lease an operator's command takes on ``tenant``, as ``<role>@<host>``, in its
    own region as a machine would."""
    return Lease(
        bucket,
        tenant,
        machine_id=f"{role}@{socket.gethostname()}",
        region=settings.fly_region,
        ttl=settings.lease_ttl,
        prefix=settings.prefix,
        cross_region=settings.consistent_across_regions,
    )


async def give_back(lease: Lease) -> None:
    """Release ``lease`` if still held (best effort): the tenant's machine may take it at
    once instead of waiting out the TTL. Its conditional write also finds out whether an
    earlier write of ours landed with its answer lost (``lease.record`` then says so)."""
    if lease.status == "held":
        with contextlib.suppress(TenantDBError):
            await lease.release(last_owner=routing_hint(lease))


def routing_hint(lease: Lease) -> str | None:
    """The machine to name on release: routing keeps pointing at the tenant's machine, not
    at the command that held the lease for a while."""
    previous = lease.previous
    return (previous.last_owner or previous.owner) if previous else None


async def publish_as_newest(
    lease: Lease,
    copy: Path,
    *,
    prefix: str,
    state: str,
    db_pages: int,
    schema: SchemaVersion | None,
) -> LockRecord:
    """Publish the database at ``copy`` (in ``state``, at ``schema``; None: unknown) as the
    tenant's newest state under the held ``lease``, its takeover recorded: a snapshot stamped
    on the bucket's clock after all history, which the log continues from after every index
    used so far (so the history before stays restorable)."""
    previous = lease.previous
    base = previous.log.tail + 1 if previous and previous.log else 1
    pointer = LogPointer.empty(base, state, db_pages)
    # The new log drops what lock.json carries inline: their objects first.
    for key, body in carried_segments(lease.record, prefix=prefix):
        await put_log_object(lease.bucket, key, body)
    taken_ms = await _history_end_ms(lease, prefix)
    return await publish_snapshot(
        lease, lease.bucket, copy, log=pointer, taken_ms=taken_ms, schema=schema
    )


async def _history_end_ms(lease: Lease, prefix: str) -> int:
    """When the rollback takes effect (Unix ms): on the bucket's clock, after all history.

    The operator's clock may be behind the machines' and the bucket's: a rollback stamped
    by it would start before commits it undoes, and a restore as of a moment before the
    rollback would return the rolled-back state. The bucket's clock (its Date, else the
    Last-Modified of the takeover record just written) is read instead, and the time is
    moved past every time the history already holds.
    """
    tenant, record = lease.tenant, lease.record
    if record is None:
        raise LeaseLostError(f"tenant {tenant}: the rollback lost the lease", tenant=tenant)
    info = await lease.bucket.head(takeover_key(prefix, tenant, record.generation))
    clock = info.server_date or info.last_modified
    bucket_now = math.ceil(clock.timestamp() * 1000)
    if clock.microsecond == 0:
        # An HTTP date names a whole second: the bucket's time is before that second's end.
        bucket_now = (math.floor(clock.timestamp()) + 1) * 1000
    history = await read_history(lease.bucket, tenant, prefix=prefix)
    # Not our own takeover record's ``at``: that is the operator's clock again.
    times = [t.at for t in history.takeovers if t.generation < record.generation]
    times += [s.last_modified for s in history.snapshots]
    times += [s.taken_at for s in history.snapshots if s.taken_at is not None]
    times += [e.last_modified for e in history.segments]
    # A list, not max(a, *rest): a LIST that shows no history yet (one that lags, as a
    # cross-region LIST may) leaves the bucket's clock alone, not one int to iterate.
    return max([bucket_now, *(math.ceil(t.timestamp() * 1000) + 1 for t in times)])


async def acquire(lease: Lease, *, wait: bool) -> None:
    """Take ``lease``; ``LeaseHeldError`` while a machine holds it, unless ``wait``: then
    wait until it is released or expires."""
    while True:
        try:
            await lease.acquire()
            return
        except LeaseHeldError as held:
            if not wait:
                raise
            log.info("tenant %s: waiting for %s to give up the lease", lease.tenant, held.owner)
            await asyncio.sleep(min(max(held.expires_in, 0.2), lease.ttl / 3))
