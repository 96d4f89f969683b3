"""Tail hints: a holder tells its standbys over one stream each time lock.json moves.

The holder's side (``wait_for_tail``) waits for a write of lock.json that moves the
published position past a given one, or for the lease to stop being held here. The holder
tells a standby's stream (asgi/tail_hints.py) each such move as it lands, one line each, for
the wait the standby asked for (or until a second passes without a move after one, see
``tail_moves``), then where it stands. The standby's side (``TailHints``)
keeps such a stream open to the holder lock.json names, over the private network, through
a ``TailHintClient``, and reads lock.json when a line says the position moved past its
copy, when a read is due anyway (``quiet_pause``) or when the holder cannot be asked. It
asks for the next stream when the current one has a quarter of its wait left, so the next
is open at the holder before the current ends and no move waits for a new request's round
trip. A holder before streams answers the same request once, as a long poll: a stream of
one line, and the next is asked for at once.

A hint is never data: whatever it says, the standby reads lock.json and follows what that
names exactly as without hints. A wrong hint costs a read; a holder that cannot answer
(dead, stopped, paused, unreachable, a stream cut, malformed or too slow) sends the
standby back to polling every ``TENANTDB_FOLLOW_INTERVAL``, so a lease that expires is
noticed as soon as without hints.

A line "holding at P" can only vouch that nothing newer than P exists: the holder of the
very lease (its generation) held it at exactly P when it wrote the line, after the
stream's request was sent, so no write it published before that send is missing from a copy
at P (the holder is the only writer, and publishes in order). A replica counts its copy's
lag from that send (the ``vouch`` callback), never from the line's arrival: a stream's
lines say nothing of any moment after its request, however late they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from tenantdb import clock
from tenantdb.machine.bookmark import Bookmark
from tenantdb.protocol.lease import Lease, ObservedLock

__all__ = [
    "QUIET_END",
    "TailHintClient",
    "TailHints",
    "TailState",
    "Told",
    "tail_moves",
    "wait_for_tail",
]

log = logging.getLogger("tenantdb")

# How long a standby polls the plain way after its holder could not be asked, before it
# asks again (a holder that is down is not asked at every poll).
HINT_RETRY = 5.0
# A failed hint stream that took less than this is asked again once before giving up.
_QUICK_FAILURE = 0.5
# A holder's stream that told of a move ends once this long passes without another (see
# ``tail_moves``); the standby asks for the next at once.
QUIET_END = 1.0
# The share of a stream's wait after which the next stream is asked for: the next reaches
# the holder a quarter of the wait before the current one ends there, whatever the leg.
_NEXT_STREAM = 0.75


@dataclass(frozen=True)
class TailState:
    """What a holder tells: whether it holds the lease, and the position it published."""

    holding: bool
    position: Bookmark | None


Told = Callable[[TailState], None]
"""Called with each state a holder's stream tells, in order."""


class TailHintClient(Protocol):
    """Asks a holder, over the private network, to tell each move of its tail past ``after``."""

    async def watch(
        self, holder: str, tenant: str, after: Bookmark, wait: float, told: Told
    ) -> bool:
        """Ask ``holder`` to tell ``told`` each move of the position it published past
        ``after`` (and whether it stops holding ``tenant``) for ``wait`` seconds; True once
        its answer ended whole, False when it could not be asked or its answer could not be
        used (``told`` saw every whole line before that); never raises."""
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


async def tail_moves(lease: Lease, after: Bookmark, wait: float) -> AsyncIterator[TailState]:
    """The holder's side of a stream: each move of the published position past the last
    one told (``after`` at first), for ``wait`` seconds or until ``QUIET_END`` passes
    without a move after one, then where it stands; it ends after a state that does not
    hold. Moves that land while the last state is being told come together, as the next.

    Why the quiet end: a server shutting down gracefully (Fly stopping the machine) takes
    no new requests, then waits for those in flight, hint streams among them, before the
    final publish and the release the standby waits for. Writes stop with the requests, so
    a stream that told of them ends a moment later instead of at the end of its wait.
    """
    deadline = clock.monotonic() + wait
    until = deadline
    while True:
        state = await wait_for_tail(lease, after, max(until - clock.monotonic(), 0))
        yield state
        if state.position is None or not state.holding or clock.monotonic() >= until:
            return
        after = state.position
        until = min(deadline, clock.monotonic() + QUIET_END)


class TailHints:
    """The standby's side: when to ask the holder, and what its streams were worth."""

    def __init__(
        self,
        client: TailHintClient,
        tenant: str,
        *,
        machine_id: str,
        hint_wait: float,
        vouch: Callable[[Bookmark, float], None],
    ) -> None:
        self.client = client
        self.tenant = tenant
        self.machine_id = machine_id
        self.hint_wait = hint_wait  # the longest wait one stream asks the holder for
        # Called with a position the holder held at exactly, and the monotonic time the
        # stream that told it was asked for (a replica's copy there is current as of then).
        self.vouch = vouch
        self._retry_at = 0.0
        self._working = True  # logged once each time hints stop working
        self._moved_from: str | None = None  # lock.json's ETag when the last hint said "moved"
        self._listener: _Listener | None = None

    def target(self, observed: ObservedLock | None) -> tuple[str, Bookmark] | None:
        """The holder to ask and the position to ask past, or None: poll the plain way (no
        other holder, or the holder could not be asked lately)."""
        moved_from, self._moved_from = self._moved_from, None
        found = self._target(observed, moved_from)
        if found is None:
            self._drop()
        return found

    def _target(
        self, observed: ObservedLock | None, moved_from: str | None
    ) -> tuple[str, Bookmark] | None:
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

    def untold(self, target: tuple[str, Bookmark]) -> bool:
        """Whether the target's position (read from lock.json) is past every position the
        holder's streams told, while they still tell: its lines are on their way. False
        before the first line, and once the streams to that holder ended."""
        holder, read = target
        listener = self._listener
        if listener is None or listener.holder != holder or listener.task.done():
            return False
        return listener.newest is not None and read > listener.newest

    async def wait(self, target: tuple[str, Bookmark], etag: str, until: float) -> bool:
        """Wait until monotonic ``until``: True once the holder told that lock.json moved
        past the target's position (at once if it already did since the last read); False
        at ``until`` or as soon as the holder cannot be asked."""
        holder, after = target
        listener = self._listener
        if listener is None or listener.holder != holder or listener.task.done():
            if listener is not None:
                listener.raise_failure()
            self._drop()
            listener = self._listener = _Listener(self, holder, after)
        listener.have = after
        while not listener.moved():
            if listener.task.done() or clock.monotonic() >= until:
                listener.raise_failure()
                return False
            listener.told.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(until - clock.monotonic()):
                    await listener.told.wait()
        self._moved_from = etag
        return True

    async def close(self) -> None:
        """Stop asking the holder (the standby's loop ends)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.task.cancel()
            # A bug that ended them was raised to the loop already (``raise_failure``).
            await asyncio.gather(listener.task, return_exceptions=True)

    def _drop(self) -> None:
        """Stop the streams to a holder no longer asked (they end on the loop's next turn)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.task.cancel()

    def _answered(self) -> None:
        self._working = True

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


class _Listener:
    """The streams kept open to one holder, and what they told past the standby's copy."""

    def __init__(self, hints: TailHints, holder: str, have: Bookmark) -> None:
        self.hints = hints
        self.holder = holder
        self.have = have  # the position of the lock.json the standby read last
        self.newest: Bookmark | None = None  # the newest position told while holding
        self.final = False  # the holder told it no longer holds (or has no position)
        self.told = asyncio.Event()  # set at each line and when the streams end
        self.reported = False  # whether a bug that ended the streams was raised
        self.task = asyncio.create_task(self._listen())

    def raise_failure(self) -> None:
        """Raise what ended the streams if it was not a holder's answer but a bug (the
        standby's loop then dies loudly and is restarted, instead of polling in silence);
        once: the restarted loop makes new streams."""
        task = self.task
        if not self.reported and task.done() and not task.cancelled() and task.exception():
            self.reported = True
            task.result()

    def moved(self) -> bool:
        """True when the holder told of a position past ``have``, or that it stopped holding."""
        return self.final or (self.newest is not None and self.newest > self.have)

    def _tell(self, sent: float, state: TailState) -> None:
        if state.holding and state.position is not None:
            self.hints.vouch(state.position, sent)
            self.newest = max(self.newest or state.position, state.position)
        else:
            self.final = True
        self.told.set()

    async def _listen(self) -> None:
        """Keep a stream open to the holder until it stops holding or cannot be asked: the
        next one asked for at ``_NEXT_STREAM`` of the newest one's wait, or once none is
        open (a holder before streams answers at the first move)."""
        hints, streams = self.hints, dict[asyncio.Task[bool], float]()
        retried = False
        try:
            next_at = clock.monotonic()
            while not self.final:
                if not streams or clock.monotonic() >= next_at:
                    sent = clock.monotonic()
                    # Past what the standby has and what it was told: what it was told is
                    # not told again (it reads it anyway), and a holder answering once
                    # waits for the next move instead of answering at once again.
                    past = max(self.have, self.newest or self.have)
                    tell = functools.partial(self._tell, sent)
                    watch = hints.client.watch(
                        self.holder, hints.tenant, past, hints.hint_wait, tell
                    )
                    streams[asyncio.ensure_future(watch)] = sent
                    next_at = sent + _NEXT_STREAM * hints.hint_wait
                left = max(next_at - clock.monotonic(), 0)
                done, _ = await asyncio.wait(
                    streams, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                for stream in done:
                    sent = streams.pop(stream)
                    if stream.result():
                        retried = False
                        hints._answered()
                    elif not retried and clock.monotonic() - sent < _QUICK_FAILURE:
                        # One quick failure (a keep-alive connection the holder had just
                        # closed) is asked again at once; a second, or one that took long,
                        # is not.
                        retried, next_at = True, clock.monotonic()
                    else:
                        hints._give_up(self.holder, "it did not answer")
                        return
        finally:
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            self.told.set()
