"""Tail hints: a standby long-polls the holder for "lock.json moved" instead of polling it.

The holder's side (``wait_for_tail``) answers a waiting request as soon as a write of
lock.json lands that moves the published position past the one the standby has, or the
lease stops being held here, else after the wait asked for. The standby's side
(``TailHints``) asks the holder lock.json names, over the private network, through a
``TailHintClient`` (routing/tail_hints.py), and reads lock.json only when an answer says it
moved, when a read is due anyway (``quiet_pause``) or when the holder cannot be asked.

A hint is never data: whatever it says, the standby reads lock.json and follows what that
names exactly as without hints. A wrong hint costs a read; a holder that cannot answer
(dead, stopped, paused, old, unreachable) sends the standby back to polling every
``TENANTDB_FOLLOW_INTERVAL``, so a lease that expires is noticed as soon as without hints.

An answer "unchanged" can only vouch that nothing newer exists: the holder of the very
lease (its generation) lock.json named still held it at exactly the position asked past
when it answered, so no write it published before the request was sent is missing from a
copy at that position (the holder is the only writer, and publishes in order). A replica
counts its copy's lag from that send (``TailHints.wait``'s ``vouch``), never from the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from tenantdb import clock
from tenantdb.machine.bookmark import Bookmark
from tenantdb.protocol.lease import Lease, ObservedLock

__all__ = ["HintAnswer", "TailHintClient", "TailHints", "TailState", "wait_for_tail"]

log = logging.getLogger("tenantdb")

HintAnswer = Literal["moved", "unchanged", "failed"]
"""What a standby makes of one hint request: lock.json moved past its position (or the
holder no longer holds the lease), it did not within the wait, or no usable answer came."""

# How long a standby polls the plain way after its holder could not be asked, before it
# asks again (a holder that is down is not asked at every poll).
HINT_RETRY = 5.0
# A failed hint request that took less than this is asked again once before giving up.
_QUICK_FAILURE = 0.5


@dataclass(frozen=True)
class TailState:
    """What a holder answers: whether it holds the lease, and the position it published."""

    holding: bool
    position: Bookmark | None


class TailHintClient(Protocol):
    """Asks a holder, over the private network, to answer once its tail passes ``after``."""

    async def wait_past(self, holder: str, tenant: str, after: Bookmark, wait: float) -> HintAnswer:
        """Ask ``holder`` to answer once the position it published passes ``after`` (or it
        stops holding ``tenant``), or after ``wait`` seconds; never raises."""
        ...


def _state(lease: Lease) -> TailState:
    record = lease.record
    position = Bookmark.of(record) if record is not None else None
    return TailState(lease.status == "held" and lease.valid_for > 0, position)


async def wait_for_tail(lease: Lease, after: Bookmark, wait: float) -> TailState:
    """The holder's side: return once the published position is past ``after`` or the
    lease is no longer held here, else after ``wait`` seconds (never past the lease's
    validity).

    A position before ``after`` is not an answer: the standby read a lock.json whose write
    has landed but whose answer has not reached this holder yet. Answered "moved" at once,
    its next read of lock.json would find nothing new, and it would stop asking for hints.
    """
    deadline = clock.monotonic() + wait
    while True:
        state = _state(lease)
        if not state.holding or state.position is None or state.position > after:
            return state
        left = min(deadline - clock.monotonic(), lease.valid_for)
        if left <= 0:
            return _state(lease)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await lease.changed.wait()


class TailHints:
    """The standby's side: when to ask the holder, and what its answers were worth."""

    def __init__(
        self, client: TailHintClient, tenant: str, *, machine_id: str, hint_wait: float
    ) -> None:
        self.client = client
        self.tenant = tenant
        self.machine_id = machine_id
        self.hint_wait = hint_wait  # the longest wait one request asks the holder for
        self._retry_at = 0.0
        self._working = True  # logged once each time hints stop working
        self._moved_from: str | None = None  # lock.json's ETag when the last hint said "moved"

    def target(self, observed: ObservedLock | None) -> tuple[str, Bookmark] | None:
        """The holder to ask and the position to ask past, or None: poll the plain way (no
        other holder, or the holder could not be asked lately)."""
        moved_from, self._moved_from = self._moved_from, None
        if observed is None or clock.monotonic() < self._retry_at:
            return None
        record = observed.record
        if record.owner is None or record.owner == self.machine_id:
            return None
        if moved_from == observed.info.etag:
            # The holder said lock.json moved, and it had not: its hints cannot be used now
            # (a restarted process of that machine, say), so they cost no loop of reads.
            self._give_up(record.owner, "its hint did not match lock.json")
            return None
        return record.owner, Bookmark.of(record)

    async def wait(
        self,
        target: tuple[str, Bookmark],
        etag: str,
        until: float,
        vouch: Callable[[float], None],
    ) -> bool:
        """Ask until monotonic ``until``: True once the holder says lock.json moved; False at
        ``until`` or as soon as the holder cannot be asked. Each answer that the holder
        still holds at exactly the target's position calls ``vouch`` with the monotonic
        time its request was sent (the answer says nothing of any earlier moment)."""
        holder, after = target
        retried = False
        while (left := until - clock.monotonic()) > 0:
            asked = clock.monotonic()
            answer = await self.client.wait_past(
                holder, self.tenant, after, min(left, self.hint_wait)
            )
            if answer == "failed":
                # One quick failure (a keep-alive connection the holder had just closed) is
                # asked again at once; a second, or one that took long, is not.
                if not retried and clock.monotonic() - asked < _QUICK_FAILURE:
                    retried = True
                    continue
                self._give_up(holder, "it did not answer")
                return False
            retried, self._working = False, True
            if answer == "moved":
                self._moved_from = etag
                return True
            vouch(asked)
        return False

    def _give_up(self, holder: str, why: str) -> None:
        self._retry_at = clock.monotonic() + HINT_RETRY
        if self._working:
            self._working = False
            log.info(
                "tenant %s: no tail hints from machine %s (%s): polling lock.json every "
                "TENANTDB_FOLLOW_INTERVAL, asking again every %.0fs",
                self.tenant,
                holder,
                why,
                HINT_RETRY,
            )
