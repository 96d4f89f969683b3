"""Create-only writes are a mutex: of 32 concurrent creators of one key, exactly one wins.

This is what the lease rests on (``If-None-Match: *`` to create lock.json). Each backend
runs 20 rounds. The local bucket's creators live in several processes, because its
exclusion is an flock between processes, not anything inside one Python process.
"""

from __future__ import annotations

import multiprocessing
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from queue import Empty

from tenantdb.storage import Bucket, LocalBucket
from tenantdb.storage.s3 import S3Bucket
from tests.support.creators import RoundResult, body_of, creator_process, race

CREATORS = 32
ROUNDS = 20
PROCESSES = 4


async def assert_one_winner_per_round(
    results: list[RoundResult], reader: Bucket, creators: int
) -> None:
    by_round: dict[int, list[RoundResult]] = defaultdict(list)
    for result in results:
        by_round[result.round].append(result)
    assert sorted(by_round) == list(range(ROUNDS))
    for round_no, parts in sorted(by_round.items()):
        winners = [name for part in parts for name in part.winners]
        unexpected = [error for part in parts for error in part.unexpected]
        losers = sum(part.losers for part in parts)
        assert unexpected == [], f"round {round_no}: {unexpected}"
        assert len(winners) == 1, f"round {round_no}: winners {winners}"
        assert losers == creators - 1, f"round {round_no}: {losers} lost with a 412"
        stored = await reader.get(f"mutex/round-{round_no}")
        assert stored.body == body_of(winners[0])


async def test_local_creators_in_several_processes(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    context = multiprocessing.get_context("spawn")  # no fork of pytest's threads and loop
    barrier = context.Barrier(PROCESSES)
    queue = context.Queue()
    per_process = CREATORS // PROCESSES
    processes = [
        context.Process(
            target=creator_process,
            args=(str(root), index, per_process, ROUNDS, barrier, queue),
            daemon=True,
        )
        for index in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    results: list[RoundResult] = []
    try:
        while len(results) < PROCESSES * ROUNDS:
            try:
                results.append(queue.get(timeout=60))
            except Empty:
                raise AssertionError(f"creators stalled after {len(results)} results") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in processes] == [0] * PROCESSES

    async with LocalBucket(root) as reader:
        await assert_one_winner_per_round(results, reader, CREATORS)
    # The processes really raced: in most rounds, the last one started before the
    # first one was done (a barrier releases them together; monotonic is system-wide).
    overlapping = 0
    for round_no in range(ROUNDS):
        parts = [result for result in results if result.round == round_no]
        overlapping += max(p.started for p in parts) < min(p.finished for p in parts)
    assert overlapping >= ROUNDS // 2, f"only {overlapping} of {ROUNDS} rounds overlapped"


async def test_s3_concurrent_creators(make_s3_bucket: Callable[..., Awaitable[S3Bucket]]) -> None:
    first = await make_s3_bucket()
    # One client (its own connection pool) per creator, as separate machines would have.
    clients = [first] + [await make_s3_bucket(first.name) for _ in range(CREATORS - 1)]
    creators = [(f"c{index}", client) for index, client in enumerate(clients)]
    results = [
        await race(creators, f"mutex/round-{round_no}", round_no) for round_no in range(ROUNDS)
    ]
    await assert_one_winner_per_round(results, first, CREATORS)
