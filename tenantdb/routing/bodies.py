"""Request bodies as Fly's replay sees them: whether one fits a replay, and streaming the rest."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

__all__ = ["MAX_REPLAY_BODY", "MeasuredBody", "body_stream", "measure", "read_up_to"]

# Fly's docs: "requests larger than 1MB cannot be replayed"; a megabyte is 10**6 bytes, and
# reading it as 1 MiB would send bodies of 1,000,001-1,048,576 bytes to a replay that fails.
MAX_REPLAY_BODY = 1_000_000


@dataclass(frozen=True, slots=True)
class MeasuredBody:
    """What was learnt of a request body: whether Fly can replay it, and what was read."""

    replayable: bool
    chunks: list[bytes]
    more: bool
    size: str = ""


async def measure(scope: Scope, receive: Receive) -> MeasuredBody:
    """Find out whether the request's body fits a replay, reading at most the limit of it.

    Raises ``ClientDisconnect`` if the client goes away while its body is read.
    """
    if scope["type"] != "http":
        return MeasuredBody(True, [], False)
    length = Headers(scope=scope).get("content-length", "")
    if length.isascii() and length.isdigit():
        size = int(length)
        return MeasuredBody(size <= MAX_REPLAY_BODY, [], True, f"a body of {size} bytes")
    # Unknown length (chunked, or HTTP/2 without content-length): read up to the limit; a
    # body that ends within it is replayed, a longer one is streamed.
    chunks, more = await read_up_to(receive, MAX_REPLAY_BODY)
    return MeasuredBody(sum(map(len, chunks)) <= MAX_REPLAY_BODY, chunks, more, "a streamed body")


async def read_up_to(receive: Receive, limit: int) -> tuple[list[bytes], bool]:
    """Read body chunks until the body ends or passes ``limit``; return them and "more"."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more and size <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = bool(message.get("more_body", False))
    return chunks, more


async def body_stream(chunks: list[bytes], receive: Receive, more: bool) -> AsyncIterator[bytes]:
    """The body: the ``chunks`` read already, then the rest from ``receive`` if ``more``."""
    for chunk in chunks:
        if chunk:
            yield chunk
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        more = bool(message.get("more_body", False))
