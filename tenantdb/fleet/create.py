"""Create a tenant in the bucket: empty, or forked from another tenant's state at a moment.

A new tenant is a ``lock.json`` with no holder (generation 1), its own takeover record, and,
for a fork, its own copy of the data: the next machine to serve it restores that like any
tenant's. Nothing of the source is written, and the fork shares no object with it, so the
source's garbage collection can never take anything from the fork.

A fork of the current state copies the source's snapshot inside the bucket (S3 CopyObject:
no download through this machine) and re-encodes the source's log, a few small objects, as
one segment of the fork; a fork as of a past moment restores that moment here (verified, as
``tenantdb restore`` does) and uploads it as the fork's snapshot.

Every object is new and written with ``If-None-Match: *``; the takeover record goes first (it
claims generation 1: a concurrent create of the same tenant stops there) and ``lock.json``
last, so an interrupted create leaves no tenant, only objects ``tenantdb tenants delete
--purge`` removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import socket
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from tenantdb.errors import (
    ObjectNotFoundError,
    PreconditionFailedError,
    ReplicationError,
    StorageError,
    TenantDBError,
)
from tenantdb.fleet.errors import FleetError, TenantExistsError, UnknownTenantError
from tenantdb.machine.migrations import schema_of
from tenantdb.protocol.lease import read_lock
from tenantdb.protocol.lockfile import (
    LOCK_MAX_BYTES,
    LockRecord,
    LogPointer,
    SnapshotName,
    SnapshotRef,
    now_iso,
)
from tenantdb.protocol.snapshot import file_sha256
from tenantdb.replication.checksum import format_state
from tenantdb.replication.compaction import merge_segments
from tenantdb.replication.log_objects import LogObjects
from tenantdb.replication.pitr import Progress, restore_at
from tenantdb.replication.segment import (
    SEGMENT_MAX_BYTES,
    Segment,
    chunk_key,
    decode_segment,
    encode_segment,
    segment_key,
)
from tenantdb.replication.takeovers import Takeover, takeover_key
from tenantdb.storage.base import Bucket, ObjectInfo
from tenantdb.tenants import validate_tenant

__all__ = ["CreatedTenant", "create_tenant"]

# The fork's log starts at 2: its snapshot stands for index 1, so no restore of it ever
# starts from an empty database (which only a log from segment 1 allows).
_FORK_BASE = 2
# Above this many bytes of source log, a fork restores here instead of merging the log in
# memory into one segment, which must stay below SEGMENT_MAX_BYTES (a holder snapshots
# long before its log gets near it).
_MERGE_MAX_BYTES = SEGMENT_MAX_BYTES // 2


@dataclass(frozen=True)
class CreatedTenant:
    """What ``create_tenant`` wrote."""

    tenant: str
    source: str | None
    # The moment of the source the fork holds (None: its current state, or no source).
    at: datetime | None
    snapshot: str | None
    state: str
    db_pages: int
    # Objects copied inside the bucket, and bytes sent from this machine.
    copied: int
    uploaded_bytes: int


@dataclass(frozen=True)
class _Data:
    """The new tenant's snapshot and log, uploaded; keys to remove if the create fails."""

    snapshot: SnapshotRef | None
    log: LogPointer | None
    keys: tuple[str, ...]
    copied: int
    uploaded_bytes: int


async def create_tenant(
    bucket: Bucket,
    tenant: str,
    *,
    prefix: str,
    lease_ttl: float,
    source: str | None = None,
    at: datetime | None = None,
    region: str = "",
    progress: Progress | None = None,
) -> CreatedTenant:
    """Create ``tenant`` empty, or as ``source`` is now (or was at ``at``).

    ``TenantExistsError`` if anything is under the tenant's prefix already,
    ``UnknownTenantError`` if ``source`` has no lock.json.
    """
    validate_tenant(tenant)
    if source is not None:
        validate_tenant(source)
    if source == tenant:
        raise FleetError(f"tenant {tenant} cannot be forked from itself", tenant=tenant)
    if at is not None and source is None:
        raise FleetError(f"tenant {tenant}: a moment needs a tenant to fork from", tenant=tenant)
    await _check_absent(bucket, tenant, prefix)
    origin = None if source is None else await _read_source(bucket, source, prefix)
    claim = secrets.token_hex(8)
    # Claims generation 1 before anything else is written: a second create stops here.
    takeover = Takeover(
        generation=1,
        owner=f"create@{socket.gethostname()}",
        region=region or None,
        at=datetime.now(UTC),
        tail=0,
        snapshot=None,
        claim=claim,
    )
    takeover_at = takeover_key(prefix, tenant, 1)
    written = await _claim(bucket, takeover, key=takeover_at, prefix=prefix, tenant=tenant)
    data = _Data(None, None, (), 0, 0)
    try:
        if origin is not None:
            taken_ms = _bucket_ms(written, takeover.at)
            data = await _fork(
                bucket, tenant, origin, prefix=prefix, at=at, taken_ms=taken_ms, progress=progress
            )
    except Exception:
        await _remove(bucket, [takeover_at])
        raise
    record = LockRecord(
        tenant=tenant,
        owner=None,
        region=region or None,
        generation=1,
        seq=1,
        ttl_seconds=lease_ttl,
        snapshot=data.snapshot,
        log=data.log,
        last_owner=None,
        # An empty database is at version 0 of any list; a fork's is not known here.
        schema=schema_of(()) if origin is None else None,
    )
    await _publish(bucket, record, prefix=prefix, keys=(*data.keys, takeover_at))
    return CreatedTenant(
        tenant=tenant,
        source=source,
        at=at,
        snapshot=data.snapshot.key if data.snapshot else None,
        state=data.log.state if data.log else format_state(0),
        db_pages=data.log.db_pages if data.log else 0,
        copied=data.copied,
        uploaded_bytes=data.uploaded_bytes,
    )


async def _check_absent(bucket: Bucket, tenant: str, prefix: str) -> None:
    found = await bucket.list(f"{prefix}{tenant}/")
    if any(info.key == f"{prefix}{tenant}/lock.json" for info in found):
        raise _exists(tenant, prefix, "it exists")
    if found:
        raise TenantExistsError(
            f"tenant {tenant} has {len(found)} object(s) under {prefix}{tenant}/ but no "
            "lock.json (an interrupted create or purge): `tenantdb tenants delete "
            f"{tenant} --purge` removes them",
            tenant=tenant,
        )


async def _claim(
    bucket: Bucket, takeover: Takeover, *, key: str, prefix: str, tenant: str
) -> ObjectInfo:
    """Write the takeover record of generation 1; ``TenantExistsError`` if another did."""
    try:
        return await bucket.put(key, takeover.to_json(), if_none_match="*")
    except PreconditionFailedError:
        pass
    try:
        stored = await bucket.get(key, max_size=LOCK_MAX_BYTES)
        ours = Takeover.parse(stored.body, key=key).claim == takeover.claim
    except TenantDBError:
        ours = False
    if not ours:
        raise _exists(tenant, prefix, "another create or a machine took it meanwhile")
    return stored.info  # this very write landed; its answer was lost


def _exists(tenant: str, prefix: str, why: str) -> TenantExistsError:
    return TenantExistsError(
        f"tenant {tenant} already exists ({why}: {prefix}{tenant}/lock.json); "
        "choose another id, or delete it first",
        tenant=tenant,
    )


def _bucket_ms(info: ObjectInfo, floor: datetime) -> int:
    """When the create takes effect (Unix ms) on the bucket's clock, not before ``floor``.

    The fork's snapshot is stamped with it: a restore of the fork as of an earlier moment
    is refused (its history starts here), never answered with the source's data.
    """
    clock = info.server_date or info.last_modified
    # An HTTP date names a whole second: the bucket's time is before that second's end.
    ms = (math.floor(clock.timestamp()) + 1) * 1000
    return max(ms, math.ceil(floor.timestamp() * 1000) + 1)


async def _read_source(bucket: Bucket, source: str, prefix: str) -> LockRecord:
    """The lock.json of the tenant to fork; ``UnknownTenantError`` if it has none."""
    lock_key = f"{prefix}{source}/lock.json"
    observed = await read_lock(bucket, source, lock_key)
    if observed is None:
        raise UnknownTenantError(
            f"no tenant {source} to fork from: no {lock_key} in the bucket", tenant=source
        )
    return observed.record


async def _fork(
    bucket: Bucket,
    tenant: str,
    record: LockRecord,
    *,
    prefix: str,
    at: datetime | None,
    taken_ms: int,
    progress: Progress | None,
) -> _Data:
    source = record.tenant
    name = SnapshotName(1, 1, _FORK_BASE, taken_ms)
    snapshot_key = name.key(f"{prefix}{tenant}/snapshots/", secrets.token_hex(8))
    if at is None and await _log_size(bucket, record, prefix) <= _MERGE_MAX_BYTES:
        try:
            return await _copy_current(bucket, tenant, record, prefix=prefix, key=snapshot_key)
        except ObjectNotFoundError as exc:
            raise FleetError(
                f"tenant {source} changed while it was forked ({exc.key} is gone): try again",
                tenant=tenant,
            ) from exc
    return await _restore_and_upload(
        bucket, tenant, source, prefix=prefix, at=at, key=snapshot_key, progress=progress
    )


async def _log_size(bucket: Bucket, record: LockRecord, prefix: str) -> int:
    """The bytes of the source's log objects (one LIST of its log)."""
    if record.log is None or record.log.tail < record.log.base:
        return 0
    found = await bucket.list(f"{prefix}{record.tenant}/log/")
    sizes = {info.key: info.size for info in found}
    keys = {chunk_key(prefix, record.tenant, c) for c in record.log.chunks()}  # a pack once
    return sum(sizes.get(key, 0) for key in keys)


async def _copy_current(
    bucket: Bucket, tenant: str, record: LockRecord, *, prefix: str, key: str
) -> _Data:
    """The source's current state: its snapshot copied in the bucket, its log merged."""
    keys: list[str] = []
    copied = 0
    snapshot: SnapshotRef | None = None
    try:
        if record.snapshot is not None:
            ref = record.snapshot
            keys.append(key)
            info = await _copy_once(bucket, ref.key, key)
            if info.size != ref.size:
                raise FleetError(
                    f"copy {key} of snapshot {ref.key} has {info.size} bytes, lock.json says "
                    f"{ref.size}: refusing it",
                    tenant=tenant,
                )
            # The same bytes: the hash lock.json records holds, and the fork's restore checks it.
            snapshot = SnapshotRef(key, ref.sha256, ref.size, now_iso())
            copied += 1
        log = record.log
        base = _FORK_BASE if snapshot is not None else 1
        if log is None or log.tail < log.base:
            # No segments: the snapshot alone (none: an empty database). A lock from before
            # the log existed records no state; the fork's first holder starts its log.
            pointer = None
            if snapshot is not None and log is not None:
                pointer = LogPointer.empty(base, log.state, log.db_pages)
            return _Data(snapshot, pointer, tuple(keys), copied, 0)
        body = await _merged_log(bucket, tenant, record, prefix=prefix, index=base)
        seg_key = segment_key(prefix, tenant, 1, base)
        keys.append(seg_key)
        await _put_once(bucket, seg_key, body)
        pointer = LogPointer(base, base, log.state, log.db_pages, ((1, base),), now_iso())
        return _Data(snapshot, pointer, tuple(keys), copied, len(body))
    except Exception:
        await _remove(bucket, keys)
        raise


async def _merged_log(
    bucket: Bucket, tenant: str, record: LockRecord, *, prefix: str, index: int
) -> bytes:
    """The source's whole log as one segment of ``tenant``: checked link by link."""
    log = record.log
    if log is None:  # pragma: no cover - callers check
        raise ValueError("no log")
    chunks = log.chunks()
    objects: list[tuple[str, bytes]] = []
    reads = LogObjects(bucket, record.tenant)
    try:
        for chunk in chunks:
            key = chunk_key(prefix, record.tenant, chunk)
            inline = None if chunk.merged else log.inline_segment(chunk.last)
            objects.append((key, await reads.segment_bytes(key, chunk, inline)))
    finally:
        reads.close()
    # Checks every object's hash and place, and that each follows the one before it.
    merged = await asyncio.to_thread(
        merge_segments, objects, chunks, record.tenant, record.generation
    )
    segment = await asyncio.to_thread(decode_segment, merged, key=f"merge of {record.tenant}'s log")
    header = segment.header
    if (format_state(header.state), header.db_pages) != (log.state, log.db_pages):
        raise ReplicationError(
            f"tenant {record.tenant}'s log gives state {format_state(header.state)} of "
            f"{header.db_pages} pages, lock.json says {log.state} of {log.db_pages}: "
            "refusing to fork it"
        )
    own = replace(header, tenant=tenant, generation=1, index=index)
    body = await asyncio.to_thread(encode_segment, Segment(own, segment.pages))
    if len(body) > SEGMENT_MAX_BYTES:
        raise FleetError(
            f"tenant {record.tenant}'s log merges into {len(body)} bytes, over a segment's "
            f"{SEGMENT_MAX_BYTES}: fork it as of a moment instead (--at 0s)",
            tenant=tenant,
        )
    return body


async def _restore_and_upload(
    bucket: Bucket,
    tenant: str,
    source: str,
    *,
    prefix: str,
    at: datetime | None,
    key: str,
    progress: Progress | None,
) -> _Data:
    """The source as of ``at``, restored and verified here, uploaded as the fork's snapshot."""
    with tempfile.TemporaryDirectory(prefix="tenantdb-fork-") as scratch:
        copy = Path(scratch) / f"{source}.sqlite3"
        point = await restore_at(bucket, source, copy, prefix=prefix, at=at, progress=progress)
        if point.db_pages == 0:
            return _Data(None, None, (), 0, 0)
        sha256 = await asyncio.to_thread(file_sha256, copy)
        size = copy.stat().st_size
        try:
            await bucket.upload_file(key, copy, if_none_match="*")
        except PreconditionFailedError:
            if (await bucket.head(key)).size != size:  # a retry of this very upload landed?
                raise
        except Exception:
            await _remove(bucket, [key])
            raise
    pointer = LogPointer.empty(_FORK_BASE, point.state, point.db_pages)
    return _Data(SnapshotRef(key, sha256, size, now_iso()), pointer, (key,), 0, size)


async def _copy_once(bucket: Bucket, src: str, dst: str) -> ObjectInfo:
    """Copy ``src`` to the new key ``dst``; a 412 is this very copy's lost answer."""
    try:
        return await bucket.copy(src, dst, if_none_match="*")
    except PreconditionFailedError:
        return await bucket.head(dst)  # the key is new and random: only ours can be there


async def _put_once(bucket: Bucket, key: str, body: bytes) -> None:
    try:
        await bucket.put(key, body, if_none_match="*")
    except PreconditionFailedError:
        existing = await bucket.get(key, max_size=len(body))
        if existing.body != body:
            raise


async def _publish(
    bucket: Bucket, record: LockRecord, *, prefix: str, keys: tuple[str, ...]
) -> None:
    """Write the new tenant's lock.json, the commit point; on refusal, remove the data."""
    key = f"{prefix}{record.tenant}/lock.json"
    try:
        await bucket.put(key, record.to_json(), if_none_match="*")
        return
    except PreconditionFailedError:
        try:
            stored = await bucket.get(key, max_size=LOCK_MAX_BYTES)
            ours = LockRecord.parse(stored.body, tenant=record.tenant, key=key) == record
        except TenantDBError:
            ours = False
        if ours:
            return  # an earlier attempt of this write landed; its answer was lost
        await _remove(bucket, list(keys))
        raise _exists(
            record.tenant, prefix, "a machine or another create wrote it meanwhile"
        ) from None


async def _remove(bucket: Bucket, keys: list[str]) -> None:
    """Delete objects this create wrote and no lock.json names; best effort (an object left
    behind is under the new tenant's prefix, where ``purge_tenant`` finds it)."""
    for key in keys:
        with contextlib.suppress(StorageError):
            await bucket.delete(key)
