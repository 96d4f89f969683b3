"""Tail hints, each side alone: the holder's wait on its lease, and a standby's reading of
the holder's answer (machine/tail_hints.py, asgi/tail_hints.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import pytest

from tenantdb.asgi.tail_hints import HttpTailHints, tail_state
from tenantdb.machine.bookmark import Bookmark
from tenantdb.machine.tail_hints import TailHints, TailState, wait_for_tail
from tenantdb.protocol.lease import Lease
from tenantdb.storage.local import LocalBucket
from tests.support.hint_servers import HostileHintServer


def holder_lease(bucket: LocalBucket) -> Lease:
    return Lease(bucket, "acme", machine_id="m1", region="ams", ttl=15)


async def test_the_holder_answers_a_hint_when_its_position_moves_not_on_a_renewal(
    local_bucket: LocalBucket,
) -> None:
    lease = holder_lease(local_bucket)
    record = await lease.acquire()
    waiting = asyncio.create_task(wait_for_tail(lease, Bookmark.of(record), 60))
    await lease.renew()  # lands, but names the same data: no hint
    await asyncio.sleep(0.05)
    assert not waiting.done()
    moved = await lease.advance()
    state = await asyncio.wait_for(waiting, 10)
    assert state.holding
    assert state.position == Bookmark.of(moved) > Bookmark.of(record)


async def test_the_holder_answers_at_once_once_it_no_longer_holds_the_lease(
    local_bucket: LocalBucket,
) -> None:
    lease = holder_lease(local_bucket)
    record = await lease.acquire()
    waiting = asyncio.create_task(wait_for_tail(lease, Bookmark.of(record), 60))
    await asyncio.sleep(0.05)
    await lease.release()
    state = await asyncio.wait_for(waiting, 10)
    assert not state.holding
    # Asked again, it does not wait at all.
    again = await asyncio.wait_for(wait_for_tail(lease, Bookmark.of(record), 60), 10)
    assert not again.holding


async def test_a_standby_ahead_of_the_holders_view_waits_for_the_next_write(
    local_bucket: LocalBucket,
) -> None:
    # The standby read a lock.json whose CAS landed before its answer reached the holder:
    # it asks past a position the holder does not know yet. "Moved" now would send it to
    # read the very lock.json it has, and it would stop asking for hints for a while.
    lease = holder_lease(local_bucket)
    record = await lease.acquire()
    landed = Bookmark.of(record)
    ahead = Bookmark(landed.generation + 1, landed.index)  # what ``advance`` publishes
    waiting = asyncio.create_task(wait_for_tail(lease, ahead, 60))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    caught_up = await lease.advance()  # the holder learns of the write the standby has
    assert Bookmark.of(caught_up) == ahead
    await asyncio.sleep(0.05)
    assert not waiting.done()
    moved = await lease.advance()  # the next write is news to the standby
    state = await asyncio.wait_for(waiting, 10)
    assert state.holding
    assert state.position == Bookmark.of(moved) > ahead


async def test_the_holder_answers_unchanged_after_the_wait(local_bucket: LocalBucket) -> None:
    lease = holder_lease(local_bucket)
    record = await lease.acquire()
    started = time.monotonic()
    state = await wait_for_tail(lease, Bookmark.of(record), 0.2)
    assert time.monotonic() - started >= 0.2
    assert state.holding
    assert state.position == Bookmark.of(record)


def test_a_standby_takes_only_whole_well_formed_lines_from_a_holder() -> None:
    assert tail_state(b'{"holding": true, "position": "3.17"}') == TailState(True, Bookmark(3, 17))
    assert tail_state(b'{"holding": false, "position": "4.0"}') == TailState(False, Bookmark(4, 0))
    assert tail_state(b'{"holding": true, "position": null}') == TailState(True, None)
    for line in (
        b"",
        b"[]",
        b"not json",
        b'{"holding": true, "position": "3.17"',  # cut mid-line
        b'{"holding": 1, "position": "3.17"}',
        b'{"holding": true, "position": 3}',
        b'{"holding": true, "position": "3.x"}',
        b'{"position": "3.17"}',
        b'{"holding": true, "position": "3.17", "pad": "' + b"x" * 1024 + b'"}',
    ):
        assert tail_state(line) is None, line


def test_a_line_nested_deep_enough_to_overflow_the_json_parser_is_malformed_not_a_crash() -> None:
    # Within the 1 KiB a line may have, 1,000 brackets made json.loads raise RecursionError,
    # which escaped the parser and killed the standby's loop instead of failing the stream.
    for line in (b"[" * 1000, b'{"holding": true, "position": ' + b"[" * 990 + b"]" * 990 + b"}"):
        assert tail_state(line) is None


@pytest.mark.parametrize("how", ["cut", "malformed", "trickle"])
async def test_a_hint_stream_cut_malformed_or_trickling_fails_and_tells_nothing(
    how: Literal["cut", "malformed", "trickle"],
) -> None:
    # Each answer is one line claiming the very position asked past (a vouch, if taken),
    # cut before its end, not a holder's, or never finished.
    told: list[TailState] = []
    with HostileHintServer(how) as hostile:
        async with HttpTailHints(lambda machine: f"http://127.0.0.1:{machine}", slack=0.5) as hints:
            started = time.monotonic()
            ended = await hints.watch(str(hostile.port), "acme", Bookmark(1, 5), 0.5, told.append)
            took = time.monotonic() - started
    assert ended is False
    assert told == []
    assert took < 1.5, took  # the wait and the slack, whatever the stream does


async def test_a_holder_id_that_makes_no_valid_url_is_a_holder_not_answering_not_a_crash() -> None:
    # The id comes from lock.json: with a template that puts it where a port goes, httpx
    # raised InvalidURL (no HTTPError), which killed the standby's loop every time.
    async with HttpTailHints(lambda machine: f"http://127.0.0.1:{machine}") as hints:
        assert await hints.watch("m1", "acme", Bookmark(1, 5), 0.5, lambda _: None) is False


async def test_a_bug_that_ends_the_hint_streams_is_raised_once_not_swallowed() -> None:
    class Broken:
        async def watch(self, *args: object) -> bool:
            raise RuntimeError("a bug in the hint client")

    hints = TailHints(Broken(), "acme", machine_id="m2", hint_wait=1.0, vouch=lambda *_: None)
    target = ("m1", Bookmark(1, 1))
    with pytest.raises(RuntimeError, match="a bug in the hint client"):
        await hints.wait(target, "etag", time.monotonic() + 2)
    # The restarted standby loop asks new streams (here they meet the same bug, raised
    # again); the loop's end closes them quietly.
    with pytest.raises(RuntimeError):
        await hints.wait(target, "etag", time.monotonic() + 2)
    await hints.close()
