"""A machine's answer of two lines 0.3 s apart (as a tail hint stream tells two moves), and
the check that each line crossed one leg between regions on its own, pipelined."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
from starlette.responses import StreamingResponse

__all__ = ["assert_each_line_crossed", "line_arrivals", "two_lines"]


def two_lines(sent: list[float]) -> StreamingResponse:
    """The answer; ``sent`` gets the monotonic time each line left."""

    async def body() -> AsyncIterator[bytes]:
        for n in range(2):
            if n:
                await asyncio.sleep(0.3)
            sent.append(time.monotonic())
            yield f"line {n}\n".encode()

    return StreamingResponse(body(), media_type="application/x-ndjson")


async def line_arrivals(answer: httpx.Response) -> list[float]:
    """The monotonic time each non-empty line of a streamed ``answer`` arrived."""
    return [time.monotonic() async for line in answer.aiter_lines() if line]


def assert_each_line_crossed(sent: list[float], came: list[float], leg: float) -> None:
    """Each line arrived at least ``leg`` after it left, and the legs did not add up."""
    assert len(came) == len(sent) == 2
    for left, arrived in zip(sent, came, strict=True):
        assert arrived - left >= leg - 0.01, (left, arrived)
    # Pipelined, not added up: the second line was not held for the first one's leg too.
    assert came[1] - sent[1] < 2 * leg
