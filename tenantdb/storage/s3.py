"""The S3 bucket: the Bucket interface over an S3-compatible store (Tigris, R2, MinIO, moto).

Everything an SDK call raises is translated at ``_call``, where it is made, into
``tenantdb.errors.StorageError`` subclasses (``raise ... from exc``), so callers never see an
SDK type. Transient failures and 409 conflicts are retried by ``with_retries`` with the same
policy on every backend; botocore's own retries are switched off so the two never multiply.
The SDK itself is imported by ``s3_sdk`` only; file transfers live in ``s3_upload`` and
``s3_download``, the error rules in ``s3_errors``.
"""

from __future__ import annotations

import builtins
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

from tenantdb.config import Addressing, is_tigris_endpoint
from tenantdb.errors import (
    BucketConfigurationError,
    ConfigurationError,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageError,
    TransientStorageError,
)
from tenantdb.storage.base import (
    DELETE_BATCH,
    ObjectInfo,
    RetryPolicy,
    SmallObject,
    with_retries,
)
from tenantdb.storage.s3_answers import object_info, read_whole, server_date, utc
from tenantdb.storage.s3_download import RangedDownloads
from tenantdb.storage.s3_errors import TRANSIENT_CODES, check_key, safe_url, translate
from tenantdb.storage.s3_sdk import (
    SDK_ERRORS,
    ClientError,
    ClientSetupError,
    failure_of,
    open_client,
    status_and_code,
)
from tenantdb.storage.s3_upload import FileUploads, part_size_for

if TYPE_CHECKING:
    from tenantdb.config import Secret, Settings

__all__ = ["S3Bucket", "addressing_style"]

T = TypeVar("T")

MiB = 1 << 20
# S3 refuses multipart parts below 5 MiB (except the last).
_MIN_PART_SIZE = 5 * MiB


def _loopback_or_ip(endpoint_url: str) -> bool:
    """Whether the endpoint cannot do virtual-hosted buckets (an IP address or localhost)."""
    host = urlsplit(endpoint_url).hostname or ""
    if host == "localhost" or "." not in host:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def addressing_style(endpoint_url: str | None, choice: Addressing = "auto") -> str:
    """The botocore ``addressing_style`` for an endpoint: ``choice``, or what suits it.

    Tigris documents virtual-hosted style and tells boto3 users to set it
    (https://www.tigrisdata.com/docs/sdks/s3/aws-python-sdk/); botocore's own "auto" sends
    path style to every custom endpoint. Local servers (localhost, an IP address) cannot
    take a bucket in the host name, and other stores keep the path style they all accept;
    AWS itself (no endpoint) keeps botocore's choice.
    """
    if choice != "auto":
        return choice
    if not endpoint_url:
        return "auto"
    if is_tigris_endpoint(endpoint_url) and not _loopback_or_ip(endpoint_url):
        return "virtual"
    return "path"


class S3Bucket:
    """A bucket on S3 or any S3-compatible store (Tigris, R2, MinIO, moto).

    Why ~360 lines: it is the whole Bucket protocol, one short method per operation around
    the one boundary (``_call``); the SDK, the error rules and the file transfers are in
    ``s3_sdk``, ``s3_errors``, ``s3_upload`` and ``s3_download``.
    """

    kind: Literal["s3"] = "s3"

    def __init__(
        self,
        name: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: Secret | None = None,
        tigris: bool = False,
        addressing: Addressing = "auto",
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so sharing it is safe
        multipart_threshold: int = 16 * MiB,
        part_size: int = 8 * MiB,
        concurrency: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not name:
            raise ConfigurationError("S3 bucket name must not be empty")
        if part_size < _MIN_PART_SIZE:
            raise ConfigurationError(f"S3 part size must be at least {_MIN_PART_SIZE} bytes")
        if multipart_threshold < 1 or concurrency < 1:
            raise ConfigurationError("multipart threshold and concurrency must be positive")
        self.name = name
        self.endpoint_url = endpoint_url
        # botocore ignores AWS_REGION, so the region always arrives here explicitly. Tigris
        # serves every region behind one endpoint and says to set the region to "auto"
        # (https://www.tigrisdata.com/docs/concepts/regions/).
        self.region = region or ("auto" if tigris else "us-east-1")
        self.tigris = tigris
        self.addressing_style = addressing_style(endpoint_url, addressing)
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._retry = retry
        self._multipart_threshold = multipart_threshold
        self._part_size = part_size
        self._concurrency = concurrency
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        # S3's own maximum; tests lower it to exercise pagination with a handful of keys.
        self._list_page_size = 1000
        self._uploads = FileUploads(
            name,
            lambda: self._s3,
            multipart_threshold=multipart_threshold,
            part_size=part_size,
            concurrency=concurrency,
        )
        self._downloads = RangedDownloads(
            name, lambda: self._s3, part_size=part_size, concurrency=concurrency
        )

    def upload_requests(self, size: int, *, conditional: bool) -> tuple[int, int]:
        """The (writes, reads) an ``upload_file`` of ``size`` bytes makes when nothing fails.

        One PUT below the multipart threshold; above it CreateMultipartUpload, one UploadPart
        per part and CompleteMultipartUpload, after a HEAD when it is conditional.
        """
        if size < self._multipart_threshold:
            return 1, 0
        parts = -(-size // part_size_for(size, self._part_size))
        return parts + 2, 1 if conditional else 0

    def download_requests(self, size: int) -> int:
        """The GETs a ``download_file`` of ``size`` bytes makes: one per part-sized range."""
        return max(1, -(-size // self._part_size))

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> S3Bucket:
        """Build the bucket named by ``settings`` (BUCKET_NAME, AWS_* variables)."""
        if not settings.bucket_name:
            raise ConfigurationError("BUCKET_NAME is not set: there is no S3 bucket to open")
        return cls(
            settings.bucket_name,
            endpoint_url=settings.endpoint_url,
            region=settings.region,
            access_key_id=settings.access_key_id,
            secret_access_key=settings.secret_access_key,
            tigris=settings.is_tigris,
            addressing=settings.s3_addressing,
            **options,
        )

    def __repr__(self) -> str:
        url = safe_url(self.endpoint_url)
        endpoint = f", endpoint_url={url!r}" if url else ""
        return (
            f"S3Bucket({self.name!r}{endpoint}, region={self.region!r}, "
            f"addressing={self.addressing_style!r})"
        )

    async def __aenter__(self) -> Self:
        if self._client is not None:
            raise StorageError(f"{self!r} is already open", operation="open")
        stack = AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                open_client(
                    endpoint_url=self.endpoint_url,
                    region=self.region,
                    access_key_id=self._access_key_id,
                    secret_access_key=(
                        self._secret_access_key.reveal() if self._secret_access_key else None
                    ),
                    addressing_style=self.addressing_style,
                    tigris=self.tigris,
                    connect_timeout=self._connect_timeout,
                    read_timeout=self._read_timeout,
                    max_pool_connections=max(16, 2 * self._concurrency),
                )
            )
        except ClientSetupError as exc:
            await stack.aclose()
            self._client = None
            raise BucketConfigurationError(
                f"cannot create an S3 client for bucket {self.name!r} "
                f"(endpoint {safe_url(self.endpoint_url)!r}, region {self.region!r}): {exc}",
                operation="open",
            ) from exc
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- the boundary: every SDK call goes through _call ------------------------------------

    @property
    def _s3(self) -> Any:
        if self._client is None:
            raise StorageError(f"{self!r} is not open: use `async with`", operation="use")
        return self._client

    async def _call(self, operation: str, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one attempt of an operation, translating SDK errors at the boundary."""
        try:
            return await fn()
        except StorageError:
            raise
        except SDK_ERRORS as exc:
            # Local-file OSErrors were already turned into LocalDiskError where they
            # happened, so an OSError reaching this point came from the network.
            raise translate(
                failure_of(exc),
                operation=operation,
                key=key,
                bucket=self.name,
                endpoint=self.endpoint_url,
            ) from exc

    async def _retrying(self, operation: str, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(
            lambda: self._call(operation, key, fn),
            policy=self._retry,
            what=f"S3 {operation} {key!r}",
        )

    # -- small objects ------------------------------------------------------------------------

    async def _read_small(
        self, key: str, response: dict[str, Any], max_size: int | None
    ) -> SmallObject:
        stream = response["Body"]
        try:
            declared = response.get("ContentLength")
            if max_size is not None and declared is not None and int(declared) > max_size:
                # Closing the unread stream drops the connection instead of draining it.
                raise ObjectTooLargeError(key=key, size=int(declared), limit=max_size)
            body = await read_whole(stream, max_size, key)
        finally:
            stream.close()
        return SmallObject(object_info(self.name, key, response, len(body)), body)

    async def get(self, key: str, *, max_size: int | None = None) -> SmallObject:
        """Read a small object whole; ObjectTooLargeError, unread, if above ``max_size``."""
        check_key(key, "get")

        async def get() -> SmallObject:
            response = await self._s3.get_object(Bucket=self.name, Key=key)
            return await self._read_small(key, response, max_size)

        return await self._retrying("get", key, get)

    async def get_if_changed(
        self, key: str, etag: str, *, max_size: int | None = None
    ) -> SmallObject | None:
        """Read a small object whole unless its ETag is still ``etag``: None then, no body."""
        check_key(key, "get")

        async def get() -> SmallObject | None:
            try:
                response = await self._s3.get_object(Bucket=self.name, Key=key, IfNoneMatch=etag)
            except ClientError as exc:
                # botocore raises the bodiless 304 Not Modified as an error (code "304").
                if status_and_code(exc)[0] == 304:
                    return None
                raise
            return await self._read_small(key, response, max_size)

        return await self._retrying("get", key, get)

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        """Write a small object, optionally only if its ETag matches or it does not exist."""
        check_key(key, "put")
        conditions: dict[str, str] = {}
        if if_match is not None:
            conditions["IfMatch"] = if_match
        if if_none_match is not None:
            conditions["IfNoneMatch"] = if_none_match

        async def put() -> ObjectInfo:
            try:
                response = await self._s3.put_object(
                    Bucket=self.name, Key=key, Body=body, **conditions
                )
            except ClientError as exc:
                status, code = status_and_code(exc)
                if if_match is not None and status == 404 and code != "NoSuchBucket":
                    # S3 answers If-Match on a missing object with 404 NoSuchKey; for a
                    # compare-and-swap that is simply a condition that did not hold.
                    raise PreconditionFailedError(
                        f"S3 put of {key!r} in bucket {self.name!r}: "
                        "the object does not exist (If-Match)",
                        key=key,
                        operation="put",
                    ) from exc
                raise
            return object_info(self.name, key, response, len(body))

        return await self._retrying("put", key, put)

    async def head(self, key: str) -> ObjectInfo:
        """Describe an object without reading it."""
        check_key(key, "head")

        async def head() -> ObjectInfo:
            response = await self._s3.head_object(Bucket=self.name, Key=key)
            return object_info(self.name, key, response, int(response["ContentLength"]))

        return await self._retrying("head", key, head)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete an object; deleting a missing object is not an error."""
        check_key(key, "delete")
        conditions = {"IfMatch": if_match} if if_match is not None else {}

        async def delete() -> None:
            try:
                await self._s3.delete_object(Bucket=self.name, Key=key, **conditions)
            except ClientError as exc:
                status, code = status_and_code(exc)
                missing = status == 404 and code != "NoSuchBucket"
                if not missing:
                    raise
                if if_match is not None:
                    # "Delete only this version" of something absent: the condition failed.
                    raise PreconditionFailedError(
                        f"S3 delete of {key!r} in bucket {self.name!r}: "
                        "the object does not exist (If-Match)",
                        key=key,
                        operation="delete",
                    ) from exc

        await self._retrying("delete", key, delete)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete up to ``DELETE_BATCH`` objects in one DeleteObjects request (quiet mode:
        the answer lists only the keys it could not delete)."""
        if len(keys) > DELETE_BATCH:
            raise ValueError(f"{len(keys)} keys: one batch deletes at most {DELETE_BATCH}")
        if not keys:
            return
        for key in keys:
            check_key(key, "delete")
        batch = {"Objects": [{"Key": key} for key in keys], "Quiet": True}

        async def delete() -> None:
            response = await self._s3.delete_objects(Bucket=self.name, Delete=batch)
            for error in response.get("Errors") or ():
                key, code = str(error.get("Key", "")), str(error.get("Code", ""))
                if code in ("NoSuchKey", "NotFound"):
                    continue
                kind = TransientStorageError if code in TRANSIENT_CODES else StorageError
                raise kind(
                    f"S3 delete of {key!r} in bucket {self.name!r} refused: {code[:100]}",
                    key=key,
                    operation="delete",
                )

        await self._retrying("delete", keys[0], delete)

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """List the objects whose keys start with ``prefix``, sorted by key."""

        async def list_keys() -> builtins.list[ObjectInfo]:
            found: builtins.list[ObjectInfo] = []
            token: str | None = None
            while True:
                params: dict[str, Any] = {
                    "Bucket": self.name,
                    "Prefix": prefix,
                    "MaxKeys": self._list_page_size,
                }
                if token:
                    params["ContinuationToken"] = token
                page = await self._s3.list_objects_v2(**params)
                date = server_date(page)
                for item in page.get("Contents", ()):
                    found.append(
                        ObjectInfo(
                            key=item["Key"],
                            etag=str(item.get("ETag", "")),
                            size=int(item["Size"]),
                            last_modified=utc(item["LastModified"]),
                            server_date=date,
                        )
                    )
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    break
            return sorted(found, key=lambda info: info.key)

        return await self._retrying("list", prefix, list_keys)

    # -- files --------------------------------------------------------------------------------

    async def download_file(
        self, key: str, dest: Path, *, max_size: int | None = None
    ) -> ObjectInfo:
        """Stream an object into ``dest`` (created or truncated) with bounded memory.

        The first ranged GET learns the size and ETag; the other ranges are fetched a few at
        a time with ``If-Match`` on that ETag, so an object replaced mid-download fails with
        ``PreconditionFailedError`` instead of mixing two versions in one file. After a
        failure ``dest`` holds partial data: download to a temporary name, then rename.
        With ``max_size``, the size the first answer announces is checked before ``dest``
        is opened, and no range writes more than it asked for.
        """
        check_key(key, "download")
        dest = Path(dest)

        return await self._retrying(
            "download", key, lambda: self._downloads.download(key, dest, max_size)
        )

    async def upload_file(
        self, key: str, src: Path, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """Stream ``src`` into a new object with bounded memory, optionally only if absent.

        Below the multipart threshold this is one streamed PUT; above it, a multipart upload
        with a few parts in flight, aborted on any failure so no parts are left behind.
        ``if_none_match="*"`` goes on the PUT, where the store checks it atomically. A
        multipart upload checks with a HEAD before it starts instead: S3 takes
        If-None-Match on CompleteMultipartUpload, but Tigris's page on conditional
        operations (https://www.tigrisdata.com/docs/objects/conditionals/) does not say it
        does, so write-once must not depend on it there. The
        HEAD is enough because tenantdb uploads files only to keys that never repeat
        (snapshots): the one writer that can have created the key is an earlier attempt of
        this very upload whose answer was lost. Either way an existing object gives
        PreconditionFailedError, which is never retried.
        """
        check_key(key, "upload")
        src = Path(src)
        conditions: dict[str, str] = {}
        if if_none_match is not None:
            conditions["IfNoneMatch"] = if_none_match
        return await self._retrying(
            "upload", key, lambda: self._uploads.upload(key, src, conditions)
        )

    async def copy(
        self, src: str, dst: str, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """Copy ``src`` to ``dst`` server-side (CopyObject, objects up to 5 GiB).

        ``If-None-Match: *`` is sent (S3 honours it on CopyObject); a HEAD of ``dst`` first
        also refuses an existing object on stores that ignore it. Then a HEAD of ``dst``
        describes the copy (CopyObject's answer carries no size).
        """
        check_key(src, "copy")
        check_key(dst, "copy")
        conditions = {"IfNoneMatch": if_none_match} if if_none_match is not None else {}

        async def copy() -> ObjectInfo:
            if if_none_match is not None:
                await self._uploads.absent(dst, "copy")
            source = {"Bucket": self.name, "Key": src}
            await self._s3.copy_object(Bucket=self.name, Key=dst, CopySource=source, **conditions)
            response = await self._s3.head_object(Bucket=self.name, Key=dst)
            return object_info(self.name, dst, response, int(response["ContentLength"]))

        return await self._retrying("copy", dst, copy)
