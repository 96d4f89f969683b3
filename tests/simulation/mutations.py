"""Past fixes of tenantdb, reverted one at a time: the simulation must find each.

Each mutation is a function that monkeypatches the fix away (``pytest.MonkeyPatch``, so
it is undone after); ``python -m tests.simulation --mutation NAME --seeds N`` searches
seeds until one fails, and ``test_mutations.py`` replays the seed each was found at.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from pathlib import Path

import aiosqlite
import pytest

from tenantdb import clock
from tenantdb.connections import pool
from tenantdb.errors import LeaseLostError
from tenantdb.protocol import lease
from tenantdb.protocol.lockfile import now_ms
from tenantdb.replication import carrier, group_commit, next_segment, rollback, shipper
from tenantdb.replication.wal import WALPosition

__all__ = ["MUTATIONS"]


def group_commit_joins_an_earlier_publication(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 394b106: a waiter returned once any publication it joined found nothing left,
    even one that read the WAL before the waiter's commit."""

    async def wait(self: group_commit.GroupCommit, done: Callable[[], bool]) -> None:
        self._waiting += 1
        self._arrived.set()
        try:
            while not done():
                if self.closed:
                    raise LeaseLostError("log shipping stopped", tenant=self._tenant)
                flush = self._flush
                if flush is None or flush.done():
                    flush = self._flush = asyncio.get_running_loop().create_task(self._gathered())
                    flush.add_done_callback(group_commit.retrieve_exception)
                await asyncio.wait({flush})
                if not flush.cancelled() and not flush.result()[1]:
                    return  # nothing was left to publish (by the time it looked)
        finally:
            self._waiting -= 1

    monkeypatch.setattr(group_commit.GroupCommit, "wait", wait)


def two_wal_restarts_read_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 2b750bb: any WAL restart after tenantdb's own checkpoint was followed, even
    a second one (an app's checkpoint) whose WAL nobody read."""

    def restarted_once(old: WALPosition, new: WALPosition) -> bool:
        return True

    monkeypatch.setattr(next_segment, "restarted_once", restarted_once)


def inline_segments_dropped_before_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 757f25b: a snapshot's CAS dropped the segments lock.json carried inline
    without waiting for their objects to exist."""

    async def store_all(self: carrier.Carrier, record: object) -> None:
        return None

    monkeypatch.setattr(carrier.Carrier, "store_all", store_all)


def lease_valid_from_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease counted from when the answer of the write that landed arrived, not from
    when it was sent (the bucket's clock started at the send)."""
    confirm = lease.Lease._confirm

    def from_the_answer(self: lease.Lease, record: object, etag: str, sent: object) -> None:
        confirm(self, record, etag, sent)  # type: ignore[arg-type]
        self._aged = (0.0, lease._Clocks.read())

    monkeypatch.setattr(lease.Lease, "_confirm", from_the_answer)


def segment_times_rounded_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 31d7641: segment and snapshot times were rounded down to the millisecond,
    so a commit made just after a moment could be stamped at or before it."""

    def now_ms() -> int:
        return math.floor(clock.wall() * 1000)

    monkeypatch.setattr(shipper, "now_ms", now_ms)
    monkeypatch.setattr(next_segment, "now_ms", now_ms)


def rollback_on_the_operators_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 757f25b: a rollback was stamped by the operator's clock, which may be behind
    the history it rolls back (a restore as of a moment before the rollback then returned
    the rolled-back state)."""

    async def history_end_ms(lease: object, prefix: str) -> int:
        return now_ms()

    monkeypatch.setattr(rollback, "_history_end_ms", history_end_ms)


class _StatementTracker:
    """Before 1c89913 (condensed): the output gate's "this connection committed" from the
    statements the connection runs, read by their first keyword. ``ROLLBACK /* c */ TO``
    fails the ``ROLLBACK TO`` pattern and is read as a whole rollback: the commit after it
    counts for nothing, and its answer is not held until the bucket has it."""

    _FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*([A-Za-z]*)", re.DOTALL)
    _ROLLBACK_TO = re.compile(r"ROLLBACK\s+(?:TRANSACTION\s+)?TO\b", re.IGNORECASE)

    def __init__(self, conn: aiosqlite.Connection, db_path: Path) -> None:
        self._sqlite = conn._conn
        self._pending = self._committed = False
        self._sqlite.set_trace_callback(self._trace)

    async def take(self) -> bool:
        committed, self._committed = self._committed, False
        return committed

    def _trace(self, statement: str) -> None:
        match = self._FIRST_WORD.match(statement)
        word = match.group(1).upper() if match else ""
        if word in ("SELECT", "VALUES", "EXPLAIN", "BEGIN", "SAVEPOINT"):
            return
        if word in ("COMMIT", "END", "RELEASE"):
            self._committed = self._committed or self._pending
            if word != "RELEASE":
                self._pending = False
        elif word == "ROLLBACK":
            if not (match and self._ROLLBACK_TO.match(statement, match.start(1))):
                self._pending = False
        elif self._sqlite.in_transaction:
            self._pending = True
        else:
            self._committed = True


def rollback_to_read_as_a_rollback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 1c89913: the output gate read SQL text, and ``ROLLBACK /* c */ TO`` as a
    rollback of the whole transaction."""
    monkeypatch.setattr(pool, "CommitTracker", _StatementTracker)


MUTATIONS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "group_commit_join": group_commit_joins_an_earlier_publication,
    "double_wal_restart": two_wal_restarts_read_as_one,
    "inline_segments_dropped": inline_segments_dropped_before_upload,
    "lease_from_answer": lease_valid_from_the_answer,
    "segment_time_rounded_down": segment_times_rounded_down,
    "rollback_clock": rollback_on_the_operators_clock,
    "rollback_comment": rollback_to_read_as_a_rollback,
}
