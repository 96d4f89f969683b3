"""Purge a tenant: delete every object under its prefix, history included, and prove it.

The steps, each safe to interrupt and run again:

1. **Mark.** ``lock.json`` is replaced, by a conditional write, with a *purge mark*: a
   lease held by ``purge@<host>`` (claim ``purge``) for the longest TTL a lock may have,
   one generation on. No machine takes a lease that is held, and a holder fenced by the
   new generation writes nothing more that any reader trusts: while the objects go, the
   tenant is nobody's. The mark is refused (``LeaseHeldError``, naming the machine and when
   its lease expires) while a machine holds the lease; an expired or released lease is
   taken like a machine takes one. A tenant with objects but no lock.json (an interrupted
   create) gets the mark with ``If-None-Match: *``.
2. **Delete.** Every key under ``<prefix><tenant>/`` but lock.json, listed (S3 lists 1,000
   keys a page), deleted 1,000 keys per DeleteObjects request, a few at once, each retried
   by the bucket. Listed again until nothing but lock.json is left (a fenced holder's last
   uploads can land meanwhile).
3. **Unmark.** lock.json goes last, ``If-Match`` the mark's ETag; a final listing must find
   nothing. Until then the tenant shows as being purged, never alive.

Run again after an interruption, the purge finds its own mark and goes on from step 2.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from tenantdb.errors import LeaseHeldError, PreconditionFailedError
from tenantdb.fleet.errors import FleetError, UnknownTenantError
from tenantdb.protocol.lease import Lease, ObservedLock, read_lock
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.storage.base import DELETE_BATCH, Bucket, ObjectInfo
from tenantdb.storage.data_keys import KEY_OBJECT
from tenantdb.tenants import validate_tenant

__all__ = ["PURGE_CLAIM", "PurgeReceipt", "is_purge_mark", "purge_tenant"]

PURGE_CLAIM = "purge"
# The longest TTL lock.json may carry: nothing waits out a purge mark.
_MARK_TTL = float(2**31)
# DeleteObjects requests in flight at once.
_PARALLEL_BATCHES = 4
# Listings after the first, for objects that land while the purge runs.
_ROUNDS = 5

# (keys deleted so far, keys listed in all): after each batch.
PurgeProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class PurgeReceipt:
    """What a purge deleted: keys, their bytes, and how long it took."""

    tenant: str
    keys: int
    bytes: int
    seconds: float
    # Whether it went on from an earlier, interrupted purge's mark.
    resumed: bool
    # Whether the tenant's wrapped data key (encryption at rest) was there, deleted first:
    # from that delete on, no copy of its history can be read, wherever it sits.
    key_erased: bool = False


def is_purge_mark(record: LockRecord) -> bool:
    """Whether ``record`` is a purge's mark: the tenant is being deleted."""
    return record.claim == PURGE_CLAIM and (record.owner or "").startswith("purge@")


async def purge_tenant(
    bucket: Bucket,
    tenant: str,
    *,
    prefix: str,
    progress: PurgeProgress | None = None,
) -> PurgeReceipt:
    """Delete every object of ``tenant``; ``LeaseHeldError`` while a machine holds its lease.

    ``UnknownTenantError`` if the bucket holds nothing under the tenant's prefix.
    """
    started = time.monotonic()
    validate_tenant(tenant)
    root = f"{prefix}{tenant}/"
    lock_key = f"{root}lock.json"
    observed = await read_lock(bucket, tenant, lock_key)
    if observed is None and not await bucket.list(root):
        raise UnknownTenantError(
            f"no tenant {tenant}: nothing under {root} in the bucket (already purged?)",
            tenant=tenant,
        )
    resumed = observed is not None and is_purge_mark(observed.record)
    mark = await _mark(bucket, tenant, observed, lock_key)
    keys, size = 0, 0
    key_object = f"{root}{KEY_OBJECT}"
    key_erased = False
    if found := [info for info in await bucket.list(key_object) if info.key == key_object]:
        # Crypto-shredding: the data key goes before the data it opens.
        await bucket.delete(key_object)
        keys, size, key_erased = 1, found[0].size, True
    for _ in range(_ROUNDS):
        left = [info for info in await _listed(bucket, root, tenant) if info.key != lock_key]
        if not left:
            break
        deleted = await _delete_all(bucket, left, progress, done=keys)
        keys, size = keys + len(left), size + deleted
    else:
        raise FleetError(
            f"tenant {tenant}: objects kept appearing under {root} after {_ROUNDS} rounds of "
            "deletes (a machine still writing?); lock.json keeps the purge mark: run the "
            "purge again",
            tenant=tenant,
        )
    try:
        await bucket.delete(lock_key, if_match=mark.etag)
    except PreconditionFailedError as exc:
        raise FleetError(
            f"tenant {tenant}: {lock_key} changed during the purge: run it again", tenant=tenant
        ) from exc
    keys, size = keys + 1, size + mark.size
    if remaining := await bucket.list(root):
        raise FleetError(
            f"tenant {tenant}: {len(remaining)} object(s) left under {root} after the purge "
            f"(first {remaining[0].key}): run it again",
            tenant=tenant,
        )
    return PurgeReceipt(tenant, keys, size, time.monotonic() - started, resumed, key_erased)


async def _mark(bucket: Bucket, tenant: str, observed: ObservedLock | None, key: str) -> ObjectInfo:
    """Put the purge mark in lock.json (see the module's step 1); return what was written."""
    if observed is not None and is_purge_mark(observed.record):
        return observed.info
    if observed is None:
        record = LockRecord(
            tenant=tenant,
            owner=_owner(),
            region=None,
            generation=1,
            seq=1,
            ttl_seconds=_MARK_TTL,
            last_owner=None,
            claim=PURGE_CLAIM,
        )
        if_match = None
    else:
        current = observed.record
        if current.owner is not None:
            # A Lease object only to judge expiry as machines do: it never writes here.
            judge = Lease(bucket, tenant, machine_id="tenantdb-purge", region="", ttl=1)
            if (expires_in := judge.expires_in(observed)) > 0:
                raise LeaseHeldError(
                    tenant=tenant,
                    owner=current.owner,
                    region=current.region or "",
                    expires_in=expires_in,
                )
        record = replace(
            current,
            owner=_owner(),
            generation=current.generation + 1,
            seq=current.seq + 1,
            ttl_seconds=_MARK_TTL,
            last_owner=current.owner or current.last_owner,
            claim=PURGE_CLAIM,
            released=None,
        )
        if_match = observed.info.etag
    try:
        return await bucket.put(
            key, record.to_json(), if_match=if_match, if_none_match=None if if_match else "*"
        )
    except PreconditionFailedError as exc:
        again = await read_lock(bucket, tenant, key)
        if again is not None and again.record == record:
            return again.info  # this very write landed; its answer was lost
        raise FleetError(
            f"tenant {tenant}: {key} changed while the purge was marking it (a machine "
            "starting?): run the purge again",
            tenant=tenant,
        ) from exc


async def _listed(bucket: Bucket, root: str, tenant: str) -> list[ObjectInfo]:
    """The objects under ``root``; a listing that names any other key is refused whole."""
    found = await bucket.list(root)
    for info in found:
        if not info.key.startswith(root):
            raise FleetError(
                f"listing {root} returned the key {info.key!r}, outside it: deleting nothing "
                "on the word of that listing",
                tenant=tenant,
            )
    return found


def _owner() -> str:
    return f"purge@{socket.gethostname()}"


async def _delete_all(
    bucket: Bucket, objects: list[ObjectInfo], progress: PurgeProgress | None, *, done: int
) -> int:
    """Delete ``objects`` in batches of DELETE_BATCH keys, a few batches at once; their bytes."""
    gate = asyncio.Semaphore(_PARALLEL_BATCHES)
    total = done + len(objects)
    deleted = done

    async def delete(batch: list[ObjectInfo]) -> None:
        nonlocal deleted
        async with gate:
            await bucket.delete_many([info.key for info in batch])
        deleted += len(batch)
        if progress is not None:
            progress(deleted, total)

    batches = [objects[i : i + DELETE_BATCH] for i in range(0, len(objects), DELETE_BATCH)]
    results = await asyncio.gather(*(delete(b) for b in batches), return_exceptions=True)
    # Every batch has ended: the first failure, if any, stops the purge.
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return sum(info.size for info in objects)
