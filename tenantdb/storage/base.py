"""The bucket interface every storage backend implements, and its shared retry policy."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self, TypeVar

from tenantdb.errors import ConditionalConflictError, TransientStorageError

__all__ = ["DELETE_BATCH", "Bucket", "ObjectInfo", "RetryPolicy", "SmallObject", "with_retries"]

log = logging.getLogger("tenantdb.storage")

T = TypeVar("T")

# The most keys one DeleteObjects request takes (S3's limit).
DELETE_BATCH = 1000


@dataclass(frozen=True)
class ObjectInfo:
    """What the bucket says about one object, with the server's own clock."""

    key: str
    etag: str
    size: int
    last_modified: datetime
    server_date: datetime | None = None

    @property
    def server_age(self) -> float | None:
        """Seconds since the last write on the server's clock alone; None if it sent no Date."""
        if self.server_date is None:
            return None
        return (self.server_date - self.last_modified).total_seconds()


@dataclass(frozen=True)
class SmallObject:
    """A small object read whole: the lease JSON."""

    info: ObjectInfo
    body: bytes


class Bucket(Protocol):
    """An S3-like bucket: conditional small writes, streamed files, listing.

    Every method raises only ``tenantdb.errors.StorageError`` subclasses; transient failures
    have already been retried when they surface.
    """

    @property
    def kind(self) -> Literal["s3", "local"]:
        """Which backend this is."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def get(self, key: str, *, max_size: int | None = None) -> SmallObject:
        """Read a small object whole; ObjectTooLargeError, unread, if above ``max_size``."""
        ...

    async def get_if_changed(
        self, key: str, etag: str, *, max_size: int | None = None
    ) -> SmallObject | None:
        """Read a small object whole unless its ETag is still ``etag``: None then, no body.

        A conditional GET (``If-None-Match: <etag>``, answered 304 by S3): polling an
        unchanged object costs a request but no transfer. Errors as ``get``.
        """
        ...

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        """Write a small object, optionally only if its ETag matches or it does not exist."""
        ...

    async def head(self, key: str) -> ObjectInfo:
        """Describe an object without reading it."""
        ...

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete an object; deleting a missing object is not an error."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete up to ``DELETE_BATCH`` objects in one request (S3 DeleteObjects); missing
        ones are not an error. ``StorageError`` naming a key the store refused to delete."""
        ...

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """List the objects whose keys start with ``prefix``, sorted by key."""
        ...

    async def download_file(
        self, key: str, dest: Path, *, max_size: int | None = None
    ) -> ObjectInfo:
        """Stream an object into ``dest`` (created or truncated) with bounded memory.

        With ``max_size``, an object the store says is larger raises ``ObjectTooLargeError``
        before ``dest`` is opened, and no more than ``max_size`` bytes are ever written.
        """
        ...

    async def copy(
        self, src: str, dst: str, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """Copy object ``src`` to ``dst`` inside the bucket (S3 CopyObject): no bytes pass
        through this machine. Returns what the bucket says about ``dst``.

        ``ObjectNotFoundError`` if ``src`` is missing; with ``if_none_match="*"``,
        ``PreconditionFailedError`` if ``dst`` exists (a retried copy whose first attempt
        landed included: use a key unique to the copy, as for ``upload_file``).
        """
        ...

    async def upload_file(
        self, key: str, src: Path, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """Stream ``src`` into a new object with bounded memory, optionally only if absent.

        With ``if_none_match="*"`` an existing object is left alone and the upload fails
        with PreconditionFailedError. That includes a retried upload whose first attempt
        landed but whose answer was lost: use a key unique to the upload, so that the
        caller can tell its own object from someone else's.
        """
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient storage failures."""

    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 2.0

    def delay(self, attempt: int) -> float:
        """Return the pause before retry number ``attempt`` (1-based)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


async def with_retries(
    operation: Callable[[], Awaitable[T]], *, policy: RetryPolicy, what: str
) -> T:
    """Run ``operation``, retrying transient errors and 409 conflicts with backoff."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await operation()
        except (TransientStorageError, ConditionalConflictError) as exc:
            if attempt == policy.attempts:
                raise
            pause = policy.delay(attempt)
            log.warning("%s failed (%s); retry %d in %.2fs", what, exc, attempt, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
