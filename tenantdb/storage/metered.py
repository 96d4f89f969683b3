"""A bucket that reports to ``Metrics``: errors by kind, CAS and upload durations.

Wrapping the bucket measures every request where it is made, for the lease, the shipper
and the router alike, without a timer in each of them. What an object is follows from its
key (see the bucket layout in the README).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from tenantdb.errors import ObjectNotFoundError, StorageError
from tenantdb.metrics import Metrics
from tenantdb.storage.base import Bucket, ObjectInfo, SmallObject

__all__ = ["MeteredBucket"]

T = TypeVar("T")
_LOCK = "/lock.json"


class MeteredBucket:
    """``bucket`` with each failure counted and each lock.json CAS and upload timed."""

    def __init__(self, bucket: Bucket, metrics: Metrics) -> None:
        self.inner = bucket
        self.metrics = metrics

    def __repr__(self) -> str:
        return f"MeteredBucket({self.inner!r})"

    @property
    def kind(self) -> Literal["s3", "local"]:
        """Which backend the wrapped bucket is."""
        return self.inner.kind

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    def _timer(self, key: str) -> AbstractContextManager[None]:
        if key.endswith(_LOCK):
            return self.metrics.timing("publish")
        if key.endswith(".seg"):
            return self.metrics.timing("segment")
        if key.endswith(".sqlite3"):
            return self.metrics.timing("snapshot")
        return nullcontext()

    async def _counted(self, key: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except ObjectNotFoundError as exc:
            # A tenant that never ran has no lock.json: its first start and every lookup of
            # it get this answer, which is no failure of the bucket. Any other object
            # missing (a segment or snapshot lock.json names) is one.
            if not key.endswith(_LOCK):
                self.metrics.bucket_error(exc)
            raise
        except StorageError as exc:
            self.metrics.bucket_error(exc)
            raise

    async def _written(self, key: str, call: Callable[[], Awaitable[T]]) -> T:
        with self._timer(key):
            return await self._counted(key, call)

    async def get(self, key: str, *, max_size: int | None = None) -> SmallObject:
        """See ``Bucket.get``."""
        if max_size is None:  # called as the wrapped bucket would be, by the router's lookups
            return await self._counted(key, lambda: self.inner.get(key))
        return await self._counted(key, lambda: self.inner.get(key, max_size=max_size))

    async def get_if_changed(
        self, key: str, etag: str, *, max_size: int | None = None
    ) -> SmallObject | None:
        """See ``Bucket.get_if_changed``."""
        return await self._counted(
            key, lambda: self.inner.get_if_changed(key, etag, max_size=max_size)
        )

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        """See ``Bucket.put``."""
        return await self._written(
            key,
            lambda: self.inner.put(key, body, if_match=if_match, if_none_match=if_none_match),
        )

    async def head(self, key: str) -> ObjectInfo:
        """See ``Bucket.head``."""
        return await self._counted(key, lambda: self.inner.head(key))

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """See ``Bucket.delete``."""
        await self._counted(key, lambda: self.inner.delete(key, if_match=if_match))

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """See ``Bucket.list``."""
        return await self._counted(prefix, lambda: self.inner.list(prefix))

    async def download_file(
        self, key: str, dest: Path, *, max_size: int | None = None
    ) -> ObjectInfo:
        """See ``Bucket.download_file``."""
        return await self._counted(
            key, lambda: self.inner.download_file(key, dest, max_size=max_size)
        )

    async def upload_file(
        self, key: str, src: Path, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """See ``Bucket.upload_file``."""
        return await self._written(
            key, lambda: self.inner.upload_file(key, src, if_none_match=if_none_match)
        )
