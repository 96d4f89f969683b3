"""A bucket that reports to ``Metrics``: requests by price class, bytes, errors, durations.

Wrapping the bucket measures every request where it is made, for the lease, the shipper
and the router alike, without a timer in each of them. What an object is follows from its
key (see the bucket layout in the README).

Requests are counted in the class Tigris bills them in
(https://www.tigrisdata.com/docs/pricing/): one per call, a listing one per page of 1,000
keys, and a file's transfer as many as the bucket says it makes (the parts of a multipart
upload or of a ranged download). Retries inside the wrapped bucket are not seen here: under
faults the count is a floor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self, TypeVar, runtime_checkable

from tenantdb.errors import (
    AccessDeniedError,
    BucketConfigurationError,
    ConditionalConflictError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
)
from tenantdb.metrics import Metrics, RequestClass
from tenantdb.storage.base import Bucket, ObjectInfo, SmallObject

__all__ = ["MeteredBucket"]

T = TypeVar("T")
_LOCK = "/lock.json"
# S3's page of ListObjectsV2: each page is one billed LIST.
_LIST_PAGE = 1000
# Answers Tigris does not bill: refused writes (409, 412) and bad or unauthorized requests.
_UNBILLED = (
    PreconditionFailedError,
    ConditionalConflictError,
    AccessDeniedError,
    BucketConfigurationError,
)


@runtime_checkable
class _Transfers(Protocol):
    """A bucket that splits a file's transfer into several requests (``S3Bucket``)."""

    def upload_requests(self, size: int, *, conditional: bool) -> tuple[int, int]: ...
    def download_requests(self, size: int) -> int: ...


class MeteredBucket:
    """``bucket`` with each request and failure counted and each CAS and upload timed.

    ``tenant`` labels the request counts: the tenant this machine serves ("" for none).
    """

    def __init__(self, bucket: Bucket, metrics: Metrics, *, tenant: str = "") -> None:
        self.inner = bucket
        self.metrics = metrics
        self.tenant = tenant

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
        if key.endswith((".seg", ".pack")):
            return self.metrics.timing("segment")
        if key.endswith(".sqlite3"):
            return self.metrics.timing("snapshot")
        return nullcontext()

    async def _counted(
        self,
        key: str,
        price_class: RequestClass,
        call: Callable[[], Awaitable[T]],
        *,
        billed: Callable[[T], tuple[RequestClass, int]] | None = None,
    ) -> T:
        """Run ``call`` and count it: one request in ``price_class``, free if refused.

        ``billed`` tells from a result what was billed instead: (class, requests).
        """
        try:
            result = await call()
        except _UNBILLED as exc:
            self.metrics.bucket_request(self.tenant, "free")
            self.metrics.bucket_error(exc)
            raise
        except ObjectNotFoundError as exc:
            self.metrics.bucket_request(self.tenant, price_class)
            # A tenant that never ran has no lock.json: its first start and every lookup of
            # it get this answer, which is no failure of the bucket. Any other object
            # missing (a segment or snapshot lock.json names) is one.
            if not key.endswith(_LOCK):
                self.metrics.bucket_error(exc)
            raise
        except StorageError as exc:
            # A network failure may or may not have reached the store: count it as billed.
            self.metrics.bucket_request(self.tenant, price_class)
            self.metrics.bucket_error(exc)
            raise
        self.metrics.bucket_request(self.tenant, *(billed(result) if billed else (price_class, 1)))
        return result

    async def _written(
        self,
        key: str,
        call: Callable[[], Awaitable[ObjectInfo]],
        *,
        requests: Callable[[int], tuple[int, int]] = lambda _: (1, 0),
    ) -> ObjectInfo:
        """Run a write and count it: ``requests(size)`` is its (writes, reads) if it lands."""
        with self._timer(key):
            info = await self._counted(
                key, "A", call, billed=lambda info: ("A", requests(info.size)[0])
            )
        if reads := requests(info.size)[1]:
            self.metrics.bucket_request(self.tenant, "B", reads)
        self.metrics.bucket_bytes(self.tenant, "in", info.size)
        return info

    def _read(self, size: int) -> None:
        self.metrics.bucket_bytes(self.tenant, "out", size)

    async def get(self, key: str, *, max_size: int | None = None) -> SmallObject:
        """See ``Bucket.get``."""
        if max_size is None:  # called as the wrapped bucket would be, by the router's lookups
            found = await self._counted(key, "B", lambda: self.inner.get(key))
        else:
            found = await self._counted(key, "B", lambda: self.inner.get(key, max_size=max_size))
        self._read(len(found.body))
        return found

    async def get_if_changed(
        self, key: str, etag: str, *, max_size: int | None = None
    ) -> SmallObject | None:
        """See ``Bucket.get_if_changed``."""
        changed = await self._counted(
            key,
            "B",
            lambda: self.inner.get_if_changed(key, etag, max_size=max_size),
            # None is a 304 Not Modified, which Tigris does not bill.
            billed=lambda found: ("B", 1) if found else ("free", 1),
        )
        if changed is not None:
            self._read(len(changed.body))
        return changed

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
        return await self._counted(key, "B", lambda: self.inner.head(key))

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """See ``Bucket.delete``."""
        await self._counted(key, "free", lambda: self.inner.delete(key, if_match=if_match))

    async def delete_many(self, keys: Sequence[str]) -> None:
        """See ``Bucket.delete_many``: one POST, class A, whatever the number of keys."""
        if keys:
            await self._counted(keys[0], "A", lambda: self.inner.delete_many(keys))

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """See ``Bucket.list``."""
        return await self._counted(
            prefix,
            "A",
            lambda: self.inner.list(prefix),
            billed=lambda found: ("A", max(1, -(-len(found) // _LIST_PAGE))),
        )

    async def download_file(
        self, key: str, dest: Path, *, max_size: int | None = None
    ) -> ObjectInfo:
        """See ``Bucket.download_file``."""
        inner = self.inner
        info = await self._counted(
            key,
            "B",
            lambda: inner.download_file(key, dest, max_size=max_size),
            billed=lambda info: (
                "B",
                inner.download_requests(info.size) if isinstance(inner, _Transfers) else 1,
            ),
        )
        self._read(info.size)
        return info

    async def upload_file(
        self, key: str, src: Path, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """See ``Bucket.upload_file``."""
        inner = self.inner

        def requests(size: int) -> tuple[int, int]:
            if not isinstance(inner, _Transfers):
                return 1, 0
            return inner.upload_requests(size, conditional=if_none_match is not None)

        return await self._written(
            key,
            lambda: inner.upload_file(key, src, if_none_match=if_none_match),
            requests=requests,
        )

    async def copy(
        self, src: str, dst: str, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """See ``Bucket.copy``: one class A request (COPY), no bytes sent."""
        with self._timer(dst):
            return await self._counted(
                dst, "A", lambda: self.inner.copy(src, dst, if_none_match=if_none_match)
            )
