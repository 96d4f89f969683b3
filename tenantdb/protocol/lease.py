"""The tenant lease: ``lock.json``, one compare-and-swap cell per tenant.

``tenants/<tenant>/lock.json`` holds both the lease (who may write the tenant) and the
pointer to the current snapshot. Every change is a conditional PUT and bumps ``seq``, so
an ETag never matches twice; ``generation`` bumps on every acquisition and fences off any
earlier holder. Expiry is judged on the bucket's clock (``Last-Modified`` against the
response ``Date``), never on the local one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from tenantdb import clock
from tenantdb.errors import (
    CrossRegionLeaseError,
    LeaseHeldError,
    LeaseLostError,
    LockFileCorruptError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    TenantDBError,
)
from tenantdb.protocol.lockfile import (
    LOCK_MAX_BYTES,
    LockRecord,
    LogPointer,
    ReleaseReason,
    SchemaVersion,
    SnapshotName,
    SnapshotRef,
)
from tenantdb.storage.base import Bucket, ObjectInfo

__all__ = ["Lease", "ObservedLock", "read_lock"]

log = logging.getLogger("tenantdb.lease")

# S3's Last-Modified has one-second resolution: a takeover waits this much past the TTL.
CLOCK_GRANULARITY = 1.0
# How far the wall or boot clock may stray from the monotonic one between two looks before
# this machine takes it for a freeze (Fly's suspend): more than NTP slews in between.
FREEZE_TOLERANCE = 0.25
# How many times acquire() re-reads lock.json after losing a write race before giving up.
_ACQUIRE_RACES = 5

LeaseStatus = Literal["unheld", "held", "lost", "released"]


@dataclass(frozen=True)
class ObservedLock:
    """A lock record with what the bucket said about it when it was read, and when."""

    record: LockRecord
    info: ObjectInfo
    read_at: float = field(default_factory=lambda: clock.monotonic())  # when the answer arrived


async def read_lock(
    bucket: Bucket, tenant: str, key: str, *, since: ObservedLock | None = None
) -> ObservedLock | None:
    """Read and check ``lock.json`` at ``key``: None only on a definite 404 (a new tenant).

    With ``since``, a conditional GET that returns ``since`` while the object is unchanged.
    """
    try:
        if since is None:
            obj = await bucket.get(key, max_size=LOCK_MAX_BYTES)
        else:
            changed = await bucket.get_if_changed(key, since.info.etag, max_size=LOCK_MAX_BYTES)
            if changed is None:
                return since
            obj = changed
    except ObjectNotFoundError:
        return None
    except ObjectTooLargeError as exc:
        raise LockFileCorruptError(
            tenant=tenant, key=key, reason=f"{exc.size} bytes, not a lock"
        ) from exc
    return ObservedLock(LockRecord.parse(obj.body, tenant=tenant, key=key), obj.info)


class _Clocks(NamedTuple):
    """This machine's clocks, read together."""

    monotonic: float
    wall: float
    boot: float

    @classmethod
    def read(cls) -> _Clocks:
        """The clocks now."""
        return cls(clock.monotonic(), clock.wall(), clock.boottime())

    def most_since(self, then: _Clocks) -> float:
        """The most time any of the clocks counted since ``then``."""
        return max(self.monotonic - then.monotonic, self.wall - then.wall, self.boot - then.boot)


@dataclass(frozen=True)
class _Sent:
    """A write of ``lock.json`` whose outcome this machine has not heard yet."""

    record: LockRecord
    clocks: _Clocks  # before its first attempt left

    @property
    def sent_at(self) -> float:
        """The monotonic time it was sent."""
        return self.clocks.monotonic


class _EarlierWriteLanded(Exception):
    """An earlier write whose answer was lost turned out to have landed: derive again."""


class Lease:
    """One process's hold on one tenant: acquire, renew, publish, release.

    The holder is ``machine_id`` plus ``claim``: two processes of one machine are two
    claims, and only a restart of the same claim (which the caller must prove dead, as
    ``TenantDB`` does with the data directory's flock) takes a live lease back at once.

    Every write carries a ``seq`` this process never reuses, so when an answer is lost the
    write that landed is recognised by its record, and the lease's validity is counted from
    the moment *that* write was sent. After a 412 that is not one of our own writes the
    lease is *lost*: ``on_lost`` is called once and every further write raises
    ``LeaseLostError``.

    Why ~430 lines: the record, its ETag, the send time of the write that landed, the
    lost state and a freeze seen on the clocks change together under one write lock;
    every method is one move of that state, and split across classes the invariant would
    have no single owner.
    """

    def __init__(
        self,
        bucket: Bucket,
        tenant: str,
        *,
        machine_id: str,
        region: str,
        ttl: float,
        prefix: str = "tenants/",
        claim: str | None = None,
        on_lost: Callable[[LeaseLostError], None] | None = None,
        cross_region: bool = False,
    ) -> None:
        self.bucket = bucket
        self.tenant = tenant
        self.machine_id = machine_id
        self.region = region
        self.ttl = ttl
        # Whether the bucket is strongly consistent across regions, so that the lease may
        # move between regions (TENANTDB_BUCKET_CONSISTENCY=strong).
        self.cross_region = cross_region
        self.claim = claim or clock.token_hex(8)
        self.prefix = prefix
        self.key = f"{prefix}{tenant}/lock.json"
        self.snapshot_prefix = f"{prefix}{tenant}/snapshots/"
        self.status: LeaseStatus = "unheld"
        self.record: LockRecord | None = None
        self.previous: LockRecord | None = None
        self._on_lost = on_lost
        self._etag: str | None = None
        # Time counted since the write that landed last was *sent*, at the last look, and
        # the clocks then (at first, the clocks at that send).
        self._aged = (0.0, _Clocks(0.0, 0.0, 0.0))
        # A release was sent: it may land unheard, so this process no longer counts as holder.
        self._releasing = False
        self._unconfirmed: list[_Sent] = []
        self._next_seq = 1
        # Without a server Date header, expiry is timed by watching one ETag stay unchanged.
        self._watched: tuple[str, float] | None = None
        # Renewals and publishes both CAS on one ETag: interleaved, one would fence the other.
        self._write_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        # The clocks at the last look, and the monotonic time a freeze was seen at, until
        # a write sent after it lands.
        self._clocks = _Clocks.read()
        self._frozen_seen_at: float | None = None
        self._confirming = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Lease(tenant={self.tenant!r}, machine={self.machine_id!r}, {self.status})"

    @property
    def changed(self) -> asyncio.Event:
        """Set (then replaced by a fresh one) when a write of lock.json lands or the lease is
        lost: what a holder's tail hints wait on."""
        return self._changed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def read(self, since: ObservedLock | None = None) -> ObservedLock | None:
        """Read ``lock.json``: None only on a definite 404 (a new tenant).

        With ``since``, a conditional GET: ``since`` itself while lock.json is unchanged,
        which costs no body (a standby polls this way).
        """
        return await read_lock(self.bucket, self.tenant, self.key, since=since)

    def expires_in(self, observed: ObservedLock) -> float:
        """Seconds until an observed lease expires, judged on the bucket's clock.

        An answer without a ``Date`` header gives no server clock: the lease then counts as
        expired only once this process has seen the same ETag for a whole TTL.
        """
        now = clock.monotonic()
        age = observed.info.server_age
        if age is None:
            if self._watched is None or self._watched[0] != observed.info.etag:
                self._watched = (observed.info.etag, now)
            age = now - self._watched[1]
        else:
            # The bucket's clock at the read, plus the time elapsed since on the local one.
            age += now - observed.read_at
        return observed.record.ttl_seconds + CLOCK_GRANULARITY - age

    @property
    def valid_for(self) -> float:
        """Seconds this machine may still act as holder, by its own conservative clock.

        Between two looks, whichever local clock counted more time wins: a machine resumed
        from Fly's suspend (a snapshot restored, no signal) has a monotonic clock that did
        not count the time it was away, while its wall clock, once set again, did. Summed
        look by look, so the lease never grows younger: a wall clock stepped back cannot
        undo the time it counted once, nor hide a freeze that comes after the step.
        """
        if self.status != "held" or self._releasing:
            return 0.0
        now = _Clocks.read()
        self._look_for_freeze(now)
        aged, then = self._aged
        elapsed = aged + now.most_since(then)
        self._aged = (elapsed, now)
        return self.ttl - elapsed

    def _look_for_freeze(self, now: _Clocks | None = None) -> None:
        """Note a possible freeze when the wall or boot clock strayed from the monotonic one
        between the last look and ``now`` (the clocks read now, unless given).

        Counted more: the machine was away. Counted less (a wall clock stepped back): the
        step may hide a freeze in the same stretch, so it counts as one too.
        """
        then = self._clocks
        now = self._clocks = now or _Clocks.read()
        counted = now.monotonic - then.monotonic
        strays = (now.wall - then.wall - counted, now.boot - then.boot - counted)
        stray = max(strays, key=abs)
        if abs(stray) > FREEZE_TOLERANCE and self._frozen_seen_at is None:
            self._frozen_seen_at = now.monotonic
            if self.status == "held":
                log.warning(
                    "tenant %s: this machine's clocks strayed %+.1fs from its monotonic "
                    "clock (a suspend, or a clock stepped back over one?); answering again "
                    "once a renewal of the lease lands",
                    self.tenant,
                    stray,
                )

    def needs_confirming(self) -> bool:
        """Whether ``confirmed()`` would wait: a freeze was seen since the last renewal that
        landed (a check without a timeout or a task switch, for every request)."""
        self._look_for_freeze()
        return self._frozen_seen_at is not None

    async def confirmed(self) -> None:
        """Return once this holder may answer; raise ``LeaseLostError`` if it may not.

        After the machine was frozen (Fly's suspend resumes it with no signal, its clocks
        behind for a while), its local clocks cannot tell whether the lease lapsed
        meanwhile: one renewal sent since must land first (a 412 steps down). Otherwise
        this costs no request.
        """
        while self.needs_confirming():
            async with self._confirming:
                if self._frozen_seen_at is not None:
                    await self.renew()  # LeaseLostError unless this machine holds it

    async def acquire(self) -> LockRecord:
        """Take the lease, or raise ``LeaseHeldError`` naming the live holder."""
        for _ in range(_ACQUIRE_RACES):
            try:
                return await self._try_acquire()
            except PreconditionFailedError:
                # Another machine wrote lock.json between our read and our write: re-read it.
                continue
            except _EarlierWriteLanded:
                # One of our own earlier writes (a late acquisition or renewal) landed
                # between the read and this write: it holds the lease for us, or re-read.
                if self.status == "held" and self.record is not None:
                    return self.record
                continue
        raise LeaseLostError(
            f"tenant {self.tenant}: lock.json kept changing while acquiring", tenant=self.tenant
        )

    def _is_own_claim(self, record: LockRecord) -> bool:
        return record.owner == self.machine_id and record.claim == self.claim

    async def _try_acquire(self) -> LockRecord:
        observed = await self.read()
        if observed is None:
            record = LockRecord(
                tenant=self.tenant,
                owner=self.machine_id,
                region=self.region,
                generation=1,
                seq=1,
                ttl_seconds=self.ttl,
                claim=self.claim,
            )
            self.previous = None
            async with self._write_lock:
                return await self._write(record, if_none_match="*")
        current = observed.record
        if current.owner is not None and not self._is_own_claim(current):
            expires_in = self.expires_in(observed)
            if expires_in > 0:
                raise LeaseHeldError(
                    tenant=self.tenant,
                    owner=current.owner,
                    region=current.region or "",
                    expires_in=expires_in,
                )
            log.warning(
                "tenant %s: lease of %s expired %.1fs ago, taking over",
                self.tenant,
                current.owner,
                -expires_in,
            )
        self._check_region(current)
        record = replace(
            current,
            owner=self.machine_id,
            region=self.region,
            generation=current.generation + 1,
            seq=current.seq + 1,
            ttl_seconds=self.ttl,
            last_owner=current.owner or current.last_owner,
            claim=self.claim,
            released=None,
        )
        self.previous = current
        async with self._write_lock:
            return await self._write(record, if_match=observed.info.etag)

    def _check_region(self, current: LockRecord) -> None:
        """Refuse to take over from another region unless the bucket is consistent across them.

        Tigris: Global and Dual-region buckets are strongly consistent only within a region;
        Single-region and Multi-region ones everywhere, and those are the ones to use for
        conditional operations that span regions
        (https://www.tigrisdata.com/docs/concepts/consistency/).
        """
        if self.cross_region or not current.region or not self.region:
            return
        if current.region != self.region:
            raise CrossRegionLeaseError(
                tenant=self.tenant, region=self.region, holder_region=current.region
            )

    async def renew(self) -> LockRecord:
        """Extend the lease by rewriting ``lock.json`` (a new ``seq``)."""
        return await self._update(lambda current: current)

    async def advance(self) -> LockRecord:
        """Move the held lease to the next generation (CAS), as if taken over by itself."""
        return await self._update(
            lambda current: replace(current, generation=current.generation + 1)
        )

    def next_snapshot_key(self, *, base: int, taken_ms: int) -> str:
        """A key no snapshot ever had, sortable by age (see ``SnapshotName``)."""
        name = SnapshotName(self._held().generation, self._next_seq, base, taken_ms)
        return name.key(self.snapshot_prefix, clock.token_hex(8))

    async def publish(
        self,
        snapshot: SnapshotRef,
        log: LogPointer | None,
        *,
        schema: SchemaVersion | Literal["unchanged"] | None = "unchanged",
    ) -> LockRecord:
        """Point ``lock.json`` at an uploaded snapshot and its log (CAS); 412 means fenced.

        ``schema``: the snapshot's, unless it is the one the lock records (None: unknown).
        """

        def change(current: LockRecord) -> LockRecord:
            kept = current.schema if schema == "unchanged" else schema
            return replace(current, snapshot=snapshot, log=log, schema=kept)

        return await self._update(change)

    async def record_schema(self, schema: SchemaVersion) -> LockRecord:
        """Record the tenant's schema (CAS, also a renewal): every later write carries it on.

        Only once the bucket has the data at that schema: lock.json is never ahead of it.
        """
        return await self._update(lambda current: replace(current, schema=schema))

    async def update_log(self, change: Callable[[LogPointer | None], LogPointer]) -> LockRecord:
        """Replace lock.json's log by ``change(log)`` (CAS, also a renewal); 412: fenced.

        ``change`` is applied to the log as stored, again after adopting an earlier write
        of ours whose answer was lost (so it must accept its own result); it raises
        ``ReplicationError`` when it no longer applies.
        """
        return await self._update(lambda current: replace(current, log=change(current.log)))

    async def release(
        self, *, last_owner: str | None = None, reason: ReleaseReason | None = None
    ) -> None:
        """Give the lease up after the final publish: ``owner`` becomes null.

        ``last_owner`` (a routing hint for the tenant's stopped machine) is this machine,
        unless another is named: a holder that is not a machine of the app names one.
        ``reason`` tells the standbys why (``"idle"``: stop, do not take over).
        """
        self._releasing = True
        hint = last_owner or self.machine_id
        await self._update(
            lambda current: replace(
                current, owner=None, last_owner=hint, claim=None, released=reason
            )
        )

    def _held(self) -> LockRecord:
        if self.status != "held" or self.record is None:
            raise LeaseLostError(
                f"tenant {self.tenant}: this machine does not hold the lease ({self.status})",
                tenant=self.tenant,
            )
        return self.record

    async def _update(self, change: Callable[[LockRecord], LockRecord]) -> LockRecord:
        # The new record is derived under the lock, from the ETag the last write returned.
        async with self._write_lock:
            for _ in range(_ACQUIRE_RACES):
                record = replace(change(self._held()), seq=self._next_seq)
                try:
                    return await self._write(record, if_match=self._etag)
                except _EarlierWriteLanded:
                    continue  # adopted an earlier write of ours: apply the change on top of it
        raise LeaseLostError(
            f"tenant {self.tenant}: lock.json kept changing under this holder", tenant=self.tenant
        )

    async def _write(
        self,
        record: LockRecord,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> LockRecord:
        # Registered before sending: a cancelled or unanswered write may still have landed.
        sent = _Sent(record, _Clocks.read())
        self._unconfirmed.append(sent)
        self._next_seq = max(self._next_seq, record.seq + 1)
        try:
            info = await self.bucket.put(
                self.key, record.to_json(), if_match=if_match, if_none_match=if_none_match
            )
        except PreconditionFailedError as exc:
            # A read that fails here is no verdict: its StorageError propagates, not fencing.
            landed = await self._own_write_landed()
            if landed is None:
                self._unconfirmed.clear()  # the ETag moved on: none of them can land now
                if self.status != "held":
                    raise  # a lost acquisition race: acquire() re-reads
                return self._lose(exc)
            observed, earlier = landed
            self._confirm(observed.record, observed.info.etag, earlier)
            if earlier is not sent:
                raise _EarlierWriteLanded from exc
            return record
        self._confirm(record, info.etag, sent)
        return record

    def _confirm(self, record: LockRecord, etag: str, sent: _Sent) -> None:
        self.record, self._etag = record, etag
        self.status = "held" if self._is_own_claim(record) else "released"
        # Never later than the send of the write that landed: the bucket's clock started then.
        self._aged = (0.0, sent.clocks)
        if self._frozen_seen_at is not None and sent.sent_at >= self._frozen_seen_at:
            self._frozen_seen_at = None  # sent since the freeze: the bucket vouches again
        self._unconfirmed.clear()
        self._notify()

    async def _own_write_landed(self) -> tuple[ObservedLock, _Sent] | None:
        """After a 412: the lock as stored and our write it is, if it is one of ours."""
        observed = await self.read()
        if observed is None:
            return None
        for sent in self._unconfirmed:
            # Whole records, not bytes: the fields that matter (generation, seq, owner,
            # claim, snapshot) are all compared, and each of our writes has its own seq.
            if sent.record == observed.record:
                return observed, sent
        return None

    def _lose(self, exc: PreconditionFailedError) -> LockRecord:
        self.status = "lost"
        self._notify()
        lost = LeaseLostError(
            f"tenant {self.tenant}: lease lost, a newer holder wrote lock.json; "
            "this machine is fenced and will not write again",
            tenant=self.tenant,
        )
        log.error("%s", lost)
        if self._on_lost is not None:
            self._on_lost(lost)
        raise lost from exc

    async def keep_renewed(self) -> None:
        """Renew every ttl/3 until the lease is released or lost; step down in time.

        Transient failures are retried quickly; if no renewal lands before the lease could
        expire on the bucket, the holder steps down without writing.
        """
        safety = self.ttl / 5
        pause = self.ttl / 3
        while self.status == "held":
            await asyncio.sleep(pause)
            if self.status != "held":
                return
            # Every lock.json write renews: under a stream of log CASes, no extra write is
            # needed (and none competes with them for the ETag).
            fresh_for = self.valid_for - self.ttl * 2 / 3
            if fresh_for > 0:
                pause = fresh_for
                continue
            if self.valid_for <= safety:
                self.step_down("no renewal landed before the lease could expire; stepping down")
                return
            try:
                await asyncio.wait_for(self.renew(), timeout=self.valid_for - safety)
                pause = self.ttl / 3
            except LeaseLostError:
                return
            except (TenantDBError, TimeoutError) as exc:  # e.g. a damaged lock.json on re-read
                reason = str(exc) or f"{type(exc).__name__}, bucket did not answer in time"
                log.warning("tenant %s: lease renewal failed: %s", self.tenant, reason)
                pause = min(self.ttl / 10, 1.0)

    def step_down(self, reason: str) -> None:
        """Stop acting as holder without writing (renewals failed past the TTL)."""
        if self.status == "held":
            self.status = "lost"
            self._notify()
            lost = LeaseLostError(f"tenant {self.tenant}: {reason}", tenant=self.tenant)
            log.error("%s", lost)
            if self._on_lost is not None:
                self._on_lost(lost)
