"""The standby: another machine holds the lease; follow its log, take over in time.

A standby polls lock.json with conditional GETs, keeps a warm copy of the tenant current
(replication/follower.py), and takes the lease when its holder releases it or lets it
expire, handing the copy to the restoring role. Its holder stopping for idleness stops it too.
With tail hints (``TENANTDB_TAIL_HINTS``, machine/tail_hints.py) it reads lock.json when the
holder's stream tells it moved, and otherwise only once per ``_quiet_pause``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from typing import Any, ClassVar

import tenantdb.logs as logs
from tenantdb import clock
from tenantdb.errors import LeaseHeldError, LockFileCorruptError, TenantDBError
from tenantdb.machine.bookmark import Bookmark
from tenantdb.machine.context import Machine, MachineRole
from tenantdb.machine.local_data import local_generation, mark_generation
from tenantdb.machine.mover import TenantState
from tenantdb.machine.restoring import RECOVERY_PAUSES, Restoring
from tenantdb.machine.tail_hints import TailHints
from tenantdb.protocol.lease import CLOCK_GRANULARITY, ObservedLock
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.replication.follower import Follower

__all__ = ["Standby"]

log = logging.getLogger("tenantdb")

# The shortest time between two reads of lock.json that a replica's waiting reads ask for:
# at most 20 GETs a second.
MIN_POLL_GAP = 0.05
# The same between reads the holder's hints ask for (a stream's line, an older holder's
# long poll answer, or a read that found the log past every line told). Under continuous
# writes a write waits for the next read, up to this long: of the lag goal's 50 ms (one
# bucket round trip + 50 ms), 15 go to this wait, up to 15 to the read and the follow (p99
# under 100 writes/s), and the rest to serving it. At most 67 GETs of lock.json a second,
# however fast the holder writes; only those that find something new are billed (a 304 is
# not), so never more than the holder's own PUTs, which cost ten times as much.
PUSHED_READ_GAP = 0.015
# How long after a read that found the log moved the next reads come PUSHED_READ_GAP apart
# without waiting for a line, even once the lines caught up: a holder under continuous
# writes pauses now and then (a slow CAS, a checkpoint) for longer than a short leg, and
# the write after the pause would wait for its line.
CHAIN_HOLD = 3 * PUSHED_READ_GAP


class Standby(MachineRole):
    """Follows the holder named by lock.json; takes the lease when it is free."""

    state: ClassVar[TenantState] = "standby"  # "replica" in the subclass
    # Whether reads of lock.json come unasked while the log moves (``_pause``): for a
    # replica, whose lag its readers see; a standby's copy only has to be warm.
    follows_closely: ClassVar[bool] = False
    required = ("standby",)

    def __init__(self, machine: Machine, held: LeaseHeldError | None) -> None:
        super().__init__(machine)
        self._held = held
        self.follower = Follower(
            machine.lease.bucket, machine.tenant, machine.path, prefix=machine.settings.prefix
        )
        self._observed: ObservedLock | None = None  # the last view of lock.json
        self._confirmed_at = 0.0  # monotonic time lock.json was last seen (changed or not)
        # The last read of lock.json found it damaged: this machine can neither follow nor
        # take over until someone repairs it, so it must not look like a healthy standby.
        self.lock_damaged = False
        client, settings = machine.tail_hints, machine.settings
        self.hints = (
            TailHints(
                client,
                machine.tenant,
                machine_id=settings.machine_id,
                hint_wait=self._hint_wait(),
                vouch=self._vouched,
            )
            if client is not None
            else None
        )
        self._poll_now = asyncio.Event()  # set to read lock.json at once (a replica's reads)
        self._last_poll = 0.0  # when the last read that found the lease held was sent
        self._moved_at = 0.0  # when the last read that found the log moved was sent

    def enter(self) -> None:
        self.machine.holder = self._held
        log.warning(
            "tenant %s: standing by, %s", self.machine.tenant, self._held or "lock.json unreadable"
        )
        # Restarted when it dies: it only reads, and follows into a copy it vouches for.
        self.spawn("standby", self._standby_loop, "restart")

    async def _standby_loop(self) -> None:
        """Follow the holder (``_follow_holder``); its hint streams end with it."""
        try:
            await self._follow_holder()
        finally:
            if self.hints is not None:
                await self.hints.close()

    def reasons(self) -> Iterator[str]:
        if self.lock_damaged:
            yield "the tenant's lock.json is damaged: no machine can hold the tenant"

    def handoff_expected(self) -> bool:
        """True when, as last seen, the holder released the lease or let it expire."""
        observed = self._observed
        if observed is None:
            return False
        if clock.monotonic() - self._confirmed_at > 2 * self.machine.settings.follow_interval + 1:
            return False  # not polled lately (restoring the copy): nothing is known
        # Not "expires within handoff_wait": a live holder's lease always looks that close
        # when the TTL is short, since it is renewed only every TTL/3.
        return observed.record.owner is None or self.machine.lease.expires_in(observed) <= 0

    async def _follow_holder(self) -> None:
        """Poll lock.json (conditional GETs), keep the warm copy current, take over in time."""
        machine, lease, tenant = self.machine, self.machine.lease, self.machine.tenant
        interval = machine.settings.follow_interval
        generation = await asyncio.to_thread(local_generation, tenant, machine.path)
        failures, retry_at = 0, 0.0
        # Polled every interval: each problem is logged once, not at every poll.
        unread, unacquired = logs.RecurringProblem(log), logs.RecurringProblem(log)
        while self.mover.role is self:
            # In the last second before the expiry the standby estimates, every poll reads
            # the lock whole, for a fresh server Date: the takeover is not late by S3's
            # one-second Last-Modified.
            since = self._observed
            if since is not None and lease.expires_in(since) <= CLOCK_GRANULARITY:
                since = None
            sent, previous = clock.monotonic(), self._observed
            try:
                observed = await lease.read(since=since)
            except TenantDBError as exc:
                self.lock_damaged = isinstance(exc, LockFileCorruptError)
                unread.warn("tenant %s: standby could not read lock.json: %s", tenant, exc)
                await self._pause(interval)
                continue
            if unread.clear():
                log.info("tenant %s: standby reads lock.json again", tenant)
            self.lock_damaged = False
            self._observed, self._confirmed_at = observed, clock.monotonic()
            if observed is not None and self._still_held(observed):
                # While lock.json is still at the generation the local file was written in,
                # that file may hold this machine's unpublished writes: the takeover's rules
                # decide about it, the follower leaves it alone.
                follow = observed.record.generation != generation
                if follow and clock.monotonic() >= retry_at and not self._copy_current(observed):
                    try:
                        if generation != 0:
                            # The follower writes the file from here: never again "the
                            # newest data" of a holding of this machine.
                            await asyncio.to_thread(mark_generation, machine.path, 0)
                            generation = 0
                        await self._follow(observed.record)
                        failures = 0
                    except (TenantDBError, OSError, sqlite3.Error) as exc:
                        pause = RECOVERY_PAUSES[min(failures, len(RECOVERY_PAUSES) - 1)]
                        failures, retry_at = failures + 1, clock.monotonic() + pause
                        log.error(
                            "tenant %s: the standby could not follow the log (%s); retrying "
                            "in %.0fs",
                            tenant,
                            exc,
                            pause,
                        )
                self._last_poll = sent
                if previous is not None and Bookmark.of(observed.record) > Bookmark.of(
                    previous.record
                ):
                    self._moved_at = sent
                self._polled(observed.record, sent)
                await self._pause(interval, hinted=True)
                continue
            if observed is not None and self._holder_stopped_idle(observed.record):
                # Taking over would keep a tenant nobody uses awake: stop too, unless a
                # request waits here (then this machine serves it).
                await self._pause(interval)
                continue
            # Released, expired or gone: take the lease now (acquire judges it afresh).
            async with self._taking_over():
                try:
                    await lease.acquire()
                except LeaseHeldError as held:
                    machine.holder = held
                    self._observed = None
                    unacquired.clear()
                except TenantDBError as exc:
                    unacquired.warn("tenant %s: standby could not acquire yet: %s", tenant, exc)
                else:
                    self.mover.move(Restoring(machine, follower=self.follower))
                    return
            await self._pause(interval)

    def _holder_stopped_idle(self, record: LockRecord) -> bool:
        """True (and ``idle()`` returns) when the holder released the lease for idleness,
        no request for the tenant runs here and this machine stops when idle at all."""
        activity = self.machine.activity
        if record.owner is not None or record.released != "idle" or activity.running:
            return False
        if not self.machine.settings.idle_stop:
            return False  # TENANTDB_IDLE_STOP=0 here: never stop, so take the tenant over
        if not activity.idle.is_set():
            log.info(
                "tenant %s: the holder stopped for idleness; this standby stops too",
                self.machine.tenant,
            )
            activity.idle.set()
        return True

    def _still_held(self, observed: ObservedLock) -> bool:
        machine, lease, record = self.machine, self.machine.lease, observed.record
        if record.owner is None or lease.expires_in(observed) <= 0:
            return False
        if (record.owner, record.claim) == (machine.settings.machine_id, lease.claim):
            return False  # this very process's holding (it was fenced): acquire() takes it back
        if machine.holder is None or machine.holder.owner != record.owner:
            machine.holder = LeaseHeldError(
                tenant=machine.tenant,
                owner=record.owner,
                region=record.region or "",
                expires_in=lease.expires_in(observed),
            )
        return True

    def _taking_over(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held around an attempt to take the lease and the move to restoring that follows
        (a replica lets no read of its copy run across the move)."""
        return contextlib.nullcontext()

    async def _pause(self, seconds: float, *, hinted: bool = False) -> None:
        """Wait between two reads of lock.json: ``seconds``, or, with tail hints while
        another machine holds the lease (``hinted``), until the holder tells it moved or a
        read is due anyway (``_quiet_pause``); back to ``seconds`` if it cannot be asked.
        One read at a time: what the holder tells meanwhile wakes the next one. If it
        ``follows_closely``, while the reads find the log past every line told
        (``TailHints.untold``) or found it moved within ``CHAIN_HOLD``, the next comes
        ``PUSHED_READ_GAP`` after the last, unasked."""
        observed = self._observed
        target = self.hints.target(observed) if hinted and self.hints is not None else None
        if target is None or observed is None or self.hints is None:
            await self._sleep(seconds)
            return
        # While the holder's lines for what the reads found are still on their way (it
        # wrote within the last leg between the regions), or a read found the log moved
        # within CHAIN_HOLD, writes are coming: no need to wait for a line. A write then
        # waits for the next read (PUSHED_READ_GAP at most), not for its line (a leg) and
        # then a read. After that, back to the lines: a burst of writes costs a leg's worth
        # of reads more, at least CHAIN_HOLD's, answered 304 (not billed).
        chained = self.follows_closely and (
            clock.monotonic() - self._moved_at < CHAIN_HOLD or self.hints.untold(target)
        )
        moved = chained or await self._wait_for_hint(
            self.hints, seconds, target, observed.info.etag
        )
        self._poll_now.clear()
        gap = self._last_poll + (PUSHED_READ_GAP if moved else MIN_POLL_GAP) - clock.monotonic()
        if gap > 0:
            await asyncio.sleep(gap)

    async def _wait_for_hint(
        self, hints: TailHints, seconds: float, target: tuple[str, Bookmark], etag: str
    ) -> bool:
        """Wait until the holder tells lock.json moved past ``target`` (True) or a read is
        due anyway; ``seconds`` if the holder cannot be asked."""
        started = clock.monotonic()
        until = started + max(self._quiet_pause(), MIN_POLL_GAP)
        hint = asyncio.create_task(hints.wait(target, etag, until))
        try:
            await self._wake_on(hint, until)
            if hint.done() and not hint.result() and clock.monotonic() < until:
                await self._wake_on(None, started + seconds)  # no hints: the plain poll
        finally:
            hint.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hint
        return hint.done() and not hint.cancelled() and hint.result()

    async def _wake_on(self, hint: asyncio.Task[bool] | None, until: float) -> None:
        """Wait until monotonic ``until``, ``hint`` is done or a read is asked for."""
        asked = asyncio.ensure_future(self._poll_now.wait())
        try:
            waits: set[asyncio.Future[Any]] = {asked, *([hint] if hint else [])}
            timeout = max(until - clock.monotonic(), 0)
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()

    def _quiet_pause(self) -> float:
        """The longest wait for a hint: a read of lock.json at least every two TTLs checks
        what the holder's hints say (a holder that dies is noticed by its hints failing)."""
        return 2 * self.machine.settings.lease_ttl

    def _hint_wait(self) -> float:
        """The longest wait one hint stream asks the holder for."""
        return self.machine.settings.lease_ttl / 3

    def _vouched(self, position: Bookmark, sent: float) -> None:
        """The holder told, on a stream asked for at monotonic ``sent``, that it held at
        exactly ``position`` (a replica's copy is current as of then if it is there)."""

    async def _sleep(self, seconds: float) -> None:
        """Wait between two polls of lock.json, without hints."""
        await asyncio.sleep(seconds)

    def _polled(self, record: LockRecord, sent: float) -> None:
        """A poll sent at monotonic ``sent`` found ``record``, still held, and the copy was
        brought up to it if it could be (a replica notes how current its copy is)."""

    def _copy_current(self, observed: ObservedLock) -> bool:
        return self.follower.hashes(observed.record) is not None

    async def _follow(self, record: LockRecord) -> None:
        await self.follower.catch_up(record)
