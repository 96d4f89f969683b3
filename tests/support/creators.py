"""Concurrent create-only writers, for the mutual exclusion tests.

``race(creators, key)`` runs one round in this process. ``creator_process`` is a
``multiprocessing`` target (importable, so it works with the ``spawn`` start method) that
races ``per_process`` writers in each round against the writers of the other processes,
all meeting at a shared barrier before every round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenantdb.errors import PreconditionFailedError
from tenantdb.storage import Bucket, LocalBucket


@dataclass(frozen=True)
class RoundResult:
    """What one group of creators saw in one round, and when (``time.monotonic``)."""

    round: int
    winners: tuple[str, ...]
    losers: int
    unexpected: tuple[str, ...]
    started: float
    finished: float


def body_of(name: str) -> bytes:
    """The bytes creator ``name`` tries to write: unique, so the winner is identifiable."""
    return f"written by {name}".encode()


async def race(creators: Sequence[tuple[str, Bucket]], key: str, round_no: int = 0) -> RoundResult:
    """Let every (name, bucket) try to create ``key`` with If-None-Match: * at once."""
    start = asyncio.Event()

    async def create(name: str, bucket: Bucket) -> str:
        await start.wait()
        await bucket.put(key, body_of(name), if_none_match="*")
        return name

    tasks = [asyncio.create_task(create(name, bucket)) for name, bucket in creators]
    await asyncio.sleep(0)  # let every task reach the start line first
    started = time.monotonic()
    start.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finished = time.monotonic()
    return RoundResult(
        round=round_no,
        winners=tuple(o for o in outcomes if isinstance(o, str)),
        losers=sum(isinstance(o, PreconditionFailedError) for o in outcomes),
        unexpected=tuple(
            repr(o)
            for o in outcomes
            if isinstance(o, BaseException) and not isinstance(o, PreconditionFailedError)
        ),
        started=started,
        finished=finished,
    )


def creator_process(
    root: str, index: int, per_process: int, rounds: int, barrier: Any, results: Any
) -> None:
    """Process target: race ``per_process`` creators per round; put results on a queue."""

    async def main() -> None:
        # Enough threads that all local creators of this process really run at once
        # (LocalBucket works in asyncio.to_thread).
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(per_process + 1))
        async with LocalBucket(Path(root)) as bucket:
            creators = [(f"p{index}-c{i}", bucket) for i in range(per_process)]
            for round_no in range(rounds):
                await asyncio.to_thread(barrier.wait, 60)
                results.put(await race(creators, f"mutex/round-{round_no}", round_no))

    asyncio.run(main())
