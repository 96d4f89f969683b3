"""The S3 bucket on aioboto3: conditional writes, streamed transfers, error translation.

This is the only module that imports aioboto3, aiobotocore or botocore. Everything the SDK
raises is translated here, where it is called, into ``tenantdb.errors.StorageError``
subclasses (``raise ... from exc``), so callers never see an SDK type. Transient failures
and 409 conflicts are retried by ``with_retries`` with the same policy on every backend;
botocore's own retries are switched off so the two never multiply.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import io
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache, partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.handlers import add_expect_header
from botocore.loaders import Loader, create_loader

from tenantdb.config import Addressing, is_tigris_endpoint
from tenantdb.errors import (
    AccessDeniedError,
    BucketConfigurationError,
    ConditionalConflictError,
    ConfigurationError,
    LocalDiskError,
    ObjectNotFoundError,
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

if TYPE_CHECKING:
    from tenantdb.config import Secret, Settings

__all__ = ["S3Bucket"]

log = logging.getLogger("tenantdb.storage.s3")

T = TypeVar("T")

MiB = 1 << 20
# S3 refuses multipart parts below 5 MiB (except the last) and uploads above 10,000 parts.
_MIN_PART_SIZE = 5 * MiB
_MAX_PARTS = 10_000
_MAX_KEY_BYTES = 1024
# Each ranged GET body is copied to disk in chunks of this size: memory per stream is bounded.
_READ_CHUNK = MiB

# Tigris serves reads from the nearest region unless asked for consistency; the lease (and
# everything that reads or replaces it) must see the latest write, so these operations ask.
_TIGRIS_CONSISTENT_OPERATIONS = (
    "PutObject",
    "GetObject",
    "HeadObject",
    "DeleteObject",
    "ListObjectsV2",
)

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_BUCKET_CODES = frozenset(
    {
        "NoSuchBucket",
        "InvalidBucketName",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
        "InvalidArgument",
        "KeyTooLongError",
        "InvalidURI",
    }
)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AccountProblem",
        "AllAccessDisabled",
        "RequestTimeTooSkewed",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
# Network failures from botocore, aiobotocore and aiohttp: the request may not have reached
# the server, or its answer was lost. All are worth another attempt. SSLError is excluded:
# a certificate that does not verify will not start verifying on a retry.
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
    ResponseStreamingError,
    IncompleteReadError,
    HTTPClientError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    TimeoutError,  # asyncio.TimeoutError is TimeoutError since 3.11
    ConnectionError,
)


def _check_key(key: str, operation: str) -> None:
    """Refuse keys that are ambiguous or unusable as paths, the same way on every backend."""
    segments = key.split("/")
    if (
        not key
        or "\x00" in key
        or any(segment in ("", ".", "..") for segment in segments)
        or len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES
    ):
        raise BucketConfigurationError(
            f"invalid object key {key[:200]!r}", key=key, operation=operation
        )


def _http_date(raw: str | None) -> datetime | None:
    """Parse an HTTP date header (RFC 7231), or None if absent or malformed."""
    if not raw:
        return None
    try:
        return parsedate_to_datetime(raw).astimezone(UTC)
    except (TypeError, ValueError):
        return None


def _headers(response: dict[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    return headers


def _server_date(response: dict[str, Any]) -> datetime | None:
    """The response's HTTP ``Date``: the server's clock, used for lease expiry."""
    return _http_date(_headers(response).get("date"))


def _safe_url(url: str | None) -> str | None:
    """The URL without any user:password part, fit for messages and reprs."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status_and_code(exc: ClientError) -> tuple[int, str]:
    response: dict[str, Any] = exc.response or {}
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status, str(response.get("Error", {}).get("Code") or status)


def _translate(
    exc: BaseException, *, operation: str, key: str, bucket: str, endpoint: str | None
) -> StorageError:
    """Map one SDK or network exception to the tenantdb error a caller can act on.

    Messages are built from the operation, bucket, key, endpoint (without credentials),
    status and error code only: never from the SDK's own text, which may carry URLs or
    request details.
    """
    # The S3 endpoint comes from AWS_ENDPOINT_URL_S3; unset, botocore asks AWS itself.
    url = _safe_url(endpoint) or "AWS S3 (AWS_ENDPOINT_URL_S3 is not set)"
    where = f"S3 {operation} of {key!r} in bucket {bucket!r}" if key else f"S3 {operation}"
    kind: type[StorageError]
    if isinstance(exc, ClientError):
        status, code = _status_and_code(exc)
        if code == "NoSuchBucket":
            # tenantdb never creates buckets: the first start is where a missing one shows.
            kind, why = (
                BucketConfigurationError,
                f"NoSuchBucket (HTTP {status}): there is no bucket {bucket!r} at {url}. "
                "tenantdb does not create buckets: create it first (on Fly.io, `fly storage "
                "create`; elsewhere with your provider's console or CLI), or set BUCKET_NAME "
                "to one that exists",
            )
        elif code in _BUCKET_CODES or status == 301:
            kind, why = BucketConfigurationError, f"{code} (HTTP {status})"
        elif status == 404 or code in _NOT_FOUND_CODES:
            kind, why = ObjectNotFoundError, "no such object (HTTP 404)"
        elif status == 412 or code == "PreconditionFailed":
            kind, why = PreconditionFailedError, "precondition failed (HTTP 412)"
        elif status == 409:
            kind, why = ConditionalConflictError, f"concurrent conflicting write: {code} (HTTP 409)"
        elif status == 403 or code in _ACCESS_CODES:
            kind, why = AccessDeniedError, f"access denied: {code} (HTTP {status})"
        elif status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            kind, why = TransientStorageError, f"server error: {code} (HTTP {status})"
        else:
            kind, why = StorageError, f"refused: {code} (HTTP {status})"
    elif isinstance(exc, SSLError):
        kind, why = BucketConfigurationError, f"TLS handshake with {url} failed"
    elif isinstance(exc, NoCredentialsError | PartialCredentialsError):
        kind, why = (
            AccessDeniedError,
            "no usable S3 credentials were found: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (on Fly.io, `fly storage create` sets them)",
        )
    elif isinstance(exc, ParamValidationError):
        kind, why = BucketConfigurationError, "request rejected by parameter validation"
    elif isinstance(exc, _NETWORK_ERRORS):
        kind, why = TransientStorageError, f"network failure ({type(exc).__name__}) at {url}"
    else:
        kind, why = StorageError, f"failed ({type(exc).__name__})"
    return kind(f"{where}: {why}", key=key, operation=operation)


def _local_error(exc: OSError, *, path: Path, operation: str, key: str) -> LocalDiskError:
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return LocalDiskError(
        f"S3 {operation} of {key!r}: local file {str(path)!r} failed: {reason}",
        key=key,
        operation=operation,
    )


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window onto part of an open file, read with ``os.pread``.

    Upload bodies are passed to botocore as these instead of bytes so that aiohttp streams
    them from disk in small chunks: a part in flight costs kilobytes, not its size. It has
    no ``fileno`` on purpose, so nobody sizes it from the whole file. ``os.pread`` keeps its
    own offset, so many slices share one descriptor safely across threads. A failed read is
    remembered in ``error`` because the SDK may wrap it as a network failure.
    """

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._length = length
        self._pos = 0
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        try:
            data = os.pread(self._fd, size, self._start + self._pos)
        except OSError as exc:
            self.error = exc
            raise
        if not data:
            self.error = OSError(errno.EIO, "file shrank while it was being uploaded")
            raise self.error
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


async def _gather_or_cancel(coros: builtins.list[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines concurrently; on the first failure cancel the rest and re-raise it.

    Unlike ``asyncio.TaskGroup`` this raises the original exception, not an
    ``ExceptionGroup``, so error translation stays a plain ``except``.
    """
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@cache
def _shared_loader() -> Loader:
    """botocore's model loader, shared by every client of the process.

    Parsing the S3 service model and endpoint rules costs tens of milliseconds per new
    session; the loader caches the parsed data and holds no credentials or loop state.
    """
    return create_loader()


def _new_session() -> Any:
    core = AioSession()
    core.register_component("data_loader", _shared_loader())
    return aioboto3.Session(botocore_session=core)


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
    """A bucket on S3 or any S3-compatible store (Tigris, R2, MinIO, moto)."""

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

    def upload_requests(self, size: int, *, conditional: bool) -> tuple[int, int]:
        """The (writes, reads) an ``upload_file`` of ``size`` bytes makes when nothing fails.

        One PUT below the multipart threshold; above it CreateMultipartUpload, one UploadPart
        per part and CompleteMultipartUpload, after a HEAD when it is conditional.
        """
        if size < self._multipart_threshold:
            return 1, 0
        parts = -(-size // max(self._part_size, -(-size // _MAX_PARTS)))
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
        url = _safe_url(self.endpoint_url)
        endpoint = f", endpoint_url={url!r}" if url else ""
        return (
            f"S3Bucket({self.name!r}{endpoint}, region={self.region!r}, "
            f"addressing={self.addressing_style!r})"
        )

    async def __aenter__(self) -> Self:
        if self._client is not None:
            raise StorageError(f"{self!r} is already open", operation="open")
        config = AioConfig(
            region_name=self.region,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            # One attempt per call: with_retries does the retrying, the same on every backend.
            retries={"total_max_attempts": 1, "mode": "standard"},
            # Only send or check checksums the API requires: many S3-compatible stores reject
            # or mangle the newer default CRC trailers. Payloads are still SHA-256 signed.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max(16, 2 * self._concurrency),
            s3={"addressing_style": self.addressing_style},
        )
        stack = AsyncExitStack()
        try:
            session = _new_session()
            self._client = await stack.enter_async_context(
                session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=(
                        self._secret_access_key.reveal() if self._secret_access_key else None
                    ),
                    config=config,
                )
            )
        except (ValueError, BotoCoreError) as exc:
            await stack.aclose()
            self._client = None
            raise BucketConfigurationError(
                f"cannot create an S3 client for bucket {self.name!r} "
                f"(endpoint {_safe_url(self.endpoint_url)!r}, region {self.region!r}): "
                f"{type(exc).__name__}",
                operation="open",
            ) from exc
        # botocore sends "Expect: 100-continue" with every PUT body, and aiohttp arms no
        # read timeout while it waits for the "100 Continue": an endpoint that accepts
        # the connection and never answers (a hung load balancer) would hold a lease write
        # or an upload forever. Without the header the read timeout covers the whole wait.
        self._client.meta.events.unregister("before-call.s3", add_expect_header)
        if self.tigris:
            for operation in _TIGRIS_CONSISTENT_OPERATIONS:
                self._client.meta.events.register(
                    f"before-sign.s3.{operation}", _add_tigris_consistent_header
                )
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
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            # Local-file OSErrors were already turned into LocalDiskError where they
            # happened, so an OSError reaching this point came from the network.
            raise _translate(
                exc, operation=operation, key=key, bucket=self.name, endpoint=self.endpoint_url
            ) from exc

    async def _retrying(self, operation: str, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(
            lambda: self._call(operation, key, fn),
            policy=self._retry,
            what=f"S3 {operation} {key!r}",
        )

    def _info(self, key: str, response: dict[str, Any], size: int) -> ObjectInfo:
        server_date = _server_date(response)
        modified = response.get("LastModified")
        if isinstance(modified, datetime):
            last_modified = _utc(modified)
        else:
            # PutObject and CompleteMultipartUpload answers carry no Last-Modified on S3;
            # the server's Date of the write is within a second of it, on the same clock.
            last_modified = (
                _http_date(_headers(response).get("last-modified"))
                or server_date
                or datetime.now(UTC)
            )
        etag = response.get("ETag")
        if not etag:
            # Every conditional write needs the ETag; a store that omits it cannot work.
            raise StorageError(
                f"S3 answer about {key!r} in bucket {self.name!r} carried no ETag",
                key=key,
            )
        return ObjectInfo(
            key=key,
            etag=str(etag),
            size=size,
            last_modified=last_modified,
            server_date=server_date,
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
            body = await _read_whole(stream, max_size, key)
        finally:
            stream.close()
        return SmallObject(self._info(key, response, len(body)), body)

    async def get(self, key: str, *, max_size: int | None = None) -> SmallObject:
        """Read a small object whole; ObjectTooLargeError, unread, if above ``max_size``."""
        _check_key(key, "get")

        async def get() -> SmallObject:
            response = await self._s3.get_object(Bucket=self.name, Key=key)
            return await self._read_small(key, response, max_size)

        return await self._retrying("get", key, get)

    async def get_if_changed(
        self, key: str, etag: str, *, max_size: int | None = None
    ) -> SmallObject | None:
        """Read a small object whole unless its ETag is still ``etag``: None then, no body."""
        _check_key(key, "get")

        async def get() -> SmallObject | None:
            try:
                response = await self._s3.get_object(Bucket=self.name, Key=key, IfNoneMatch=etag)
            except ClientError as exc:
                # botocore raises the bodiless 304 Not Modified as an error (code "304").
                if _status_and_code(exc)[0] == 304:
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
        _check_key(key, "put")
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
                status, code = _status_and_code(exc)
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
            return self._info(key, response, len(body))

        return await self._retrying("put", key, put)

    async def head(self, key: str) -> ObjectInfo:
        """Describe an object without reading it."""
        _check_key(key, "head")

        async def head() -> ObjectInfo:
            response = await self._s3.head_object(Bucket=self.name, Key=key)
            return self._info(key, response, int(response["ContentLength"]))

        return await self._retrying("head", key, head)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete an object; deleting a missing object is not an error."""
        _check_key(key, "delete")
        conditions = {"IfMatch": if_match} if if_match is not None else {}

        async def delete() -> None:
            try:
                await self._s3.delete_object(Bucket=self.name, Key=key, **conditions)
            except ClientError as exc:
                status, code = _status_and_code(exc)
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
            _check_key(key, "delete")
        batch = {"Objects": [{"Key": key} for key in keys], "Quiet": True}

        async def delete() -> None:
            response = await self._s3.delete_objects(Bucket=self.name, Delete=batch)
            for error in response.get("Errors") or ():
                key, code = str(error.get("Key", "")), str(error.get("Code", ""))
                if code in ("NoSuchKey", "NotFound"):
                    continue
                kind = TransientStorageError if code in _TRANSIENT_CODES else StorageError
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
                server_date = _server_date(page)
                for item in page.get("Contents", ()):
                    found.append(
                        ObjectInfo(
                            key=item["Key"],
                            etag=str(item.get("ETag", "")),
                            size=int(item["Size"]),
                            last_modified=_utc(item["LastModified"]),
                            server_date=server_date,
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
        _check_key(key, "download")
        dest = Path(dest)
        return await self._retrying("download", key, lambda: self._download(key, dest, max_size))

    async def _download(self, key: str, dest: Path, max_size: int | None) -> ObjectInfo:
        first = await self._get_range(key, 0, self._part_size - 1, etag=None)
        if first is None:
            # 416: a zero-byte object has no byte 0 to ask for; fetch it plainly.
            first = await self._s3.get_object(Bucket=self.name, Key=key)
        total = _total_size(first)
        if max_size is not None and total > max_size:
            first["Body"].close()  # unread: drops the connection instead of draining it
            raise ObjectTooLargeError(key=key, size=total, limit=max_size, operation="download")
        info = self._info(key, first, total)
        fd = await self._local(
            "download", key, dest, lambda: os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        )
        try:
            await self._local("download", key, dest, lambda: _preallocate(fd, total))
            written = await self._drain(first, fd, 0, key, dest, min(total, self._part_size))
            ranges = [
                (start, min(start + self._part_size, total) - 1)
                for start in range(written, total, self._part_size)
            ]
            pending = iter(ranges)

            async def worker() -> None:
                for start, end in pending:
                    response = await self._get_range(key, start, end, etag=info.etag)
                    if response is None:
                        raise PreconditionFailedError(
                            f"S3 download of {key!r}: the object shrank during the download",
                            key=key,
                            operation="download",
                        )
                    got = await self._drain(response, fd, start, key, dest, end - start + 1)
                    if got != end - start + 1:
                        raise TransientStorageError(
                            f"S3 download of {key!r}: range {start}-{end} returned {got} bytes",
                            key=key,
                            operation="download",
                        )

            await _gather_or_cancel([worker() for _ in range(min(self._concurrency, len(ranges)))])
        finally:
            await self._local("download", key, dest, lambda: os.close(fd))
        return info

    async def _get_range(
        self, key: str, start: int, end: int, *, etag: str | None
    ) -> dict[str, Any] | None:
        """GET bytes ``start..end``, pinned to ``etag`` if given; None on 416 (no such bytes)."""
        params: dict[str, Any] = {"Bucket": self.name, "Key": key, "Range": f"bytes={start}-{end}"}
        if etag is not None:
            params["IfMatch"] = etag
        try:
            response: dict[str, Any] = await self._s3.get_object(**params)
        except ClientError as exc:
            status, code = _status_and_code(exc)
            if status == 416 or code == "InvalidRange":
                return None
            if status == 412 and etag is not None:
                raise PreconditionFailedError(
                    f"S3 download of {key!r} in bucket {self.name!r}: the object was replaced "
                    "during the download (If-Match failed)",
                    key=key,
                    operation="download",
                ) from exc
            raise
        return response

    async def _drain(
        self, response: dict[str, Any], fd: int, offset: int, key: str, dest: Path, limit: int
    ) -> int:
        """Copy a response body to ``fd`` at ``offset``; return the number of bytes written.

        aiohttp hands out whatever it has buffered (often 64 KiB); gathering up to 1 MiB
        before each write keeps thread hops few while memory stays bounded per stream.
        A body longer than the ``limit`` bytes asked for is cut off there: the caller sees
        a short count, never bytes past the range it asked for.
        """
        stream = response["Body"]
        written = 0
        pending = bytearray()
        try:
            while written + len(pending) < limit and (
                chunk := await stream.read(min(_READ_CHUNK, limit - written - len(pending)))
            ):
                pending += chunk
                if len(pending) >= _READ_CHUNK:
                    data, pending = bytes(pending), bytearray()
                    await self._local(
                        "download", key, dest, partial(_pwrite, fd, data, offset + written)
                    )
                    written += len(data)
            if pending:
                data = bytes(pending)
                await self._local(
                    "download", key, dest, partial(_pwrite, fd, data, offset + written)
                )
                written += len(data)
        finally:
            stream.close()
        return written

    async def _local(self, operation: str, key: str, path: Path, fn: Callable[[], T]) -> T:
        """Run blocking local-file work in a thread; its OSErrors become LocalDiskError."""
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise _local_error(exc, path=path, operation=operation, key=key) from exc

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
        _check_key(key, "upload")
        src = Path(src)
        conditions: dict[str, str] = {}
        if if_none_match is not None:
            conditions["IfNoneMatch"] = if_none_match
        return await self._retrying("upload", key, lambda: self._upload(key, src, conditions))

    async def _upload(self, key: str, src: Path, conditions: dict[str, str]) -> ObjectInfo:
        fd = await self._local("upload", key, src, lambda: os.open(src, os.O_RDONLY))
        try:
            size = await self._local("upload", key, src, lambda: os.fstat(fd).st_size)
            if size < self._multipart_threshold:
                body = _FileSlice(fd, 0, size)
                response = await self._send_slice(
                    key,
                    src,
                    body,
                    self._s3.put_object(
                        Bucket=self.name, Key=key, Body=body, ContentLength=size, **conditions
                    ),
                )
                return self._info(key, response, size)
            if conditions:
                await self._absent(key)
            return await self._multipart(key, src, fd, size)
        finally:
            await self._local("upload", key, src, lambda: os.close(fd))

    async def _send_slice(
        self, key: str, src: Path, body: _FileSlice, call: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        """Await an upload call; blame the local file if reading it is what failed."""
        try:
            return await call
        except Exception as exc:
            if body.error is not None:
                raise _local_error(body.error, path=src, operation="upload", key=key) from exc
            raise

    async def _absent(self, key: str) -> None:
        """Raise PreconditionFailedError, as a refused If-None-Match would, if ``key`` exists."""
        try:
            await self._s3.head_object(Bucket=self.name, Key=key)
        except ClientError as exc:
            if _status_and_code(exc)[0] == 404:
                return
            raise
        raise PreconditionFailedError(
            f"S3 upload of {key!r} in bucket {self.name!r}: the object exists already "
            "(If-None-Match, checked with a HEAD before a multipart upload)",
            key=key,
            operation="upload",
        )

    async def copy(
        self, src: str, dst: str, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """Copy ``src`` to ``dst`` server-side (CopyObject, objects up to 5 GiB).

        ``If-None-Match: *`` is sent (S3 honours it on CopyObject); a HEAD of ``dst`` first
        also refuses an existing object on stores that ignore it. Then a HEAD of ``dst``
        describes the copy (CopyObject's answer carries no size).
        """
        _check_key(src, "copy")
        _check_key(dst, "copy")
        conditions = {"IfNoneMatch": if_none_match} if if_none_match is not None else {}

        async def copy() -> ObjectInfo:
            if if_none_match is not None:
                await self._absent(dst)
            source = {"Bucket": self.name, "Key": src}
            await self._s3.copy_object(Bucket=self.name, Key=dst, CopySource=source, **conditions)
            response = await self._s3.head_object(Bucket=self.name, Key=dst)
            return self._info(dst, response, int(response["ContentLength"]))

        return await self._retrying("copy", dst, copy)

    async def _multipart(self, key: str, src: Path, fd: int, size: int) -> ObjectInfo:
        part_size = max(self._part_size, -(-size // _MAX_PARTS))
        try:
            created = await self._s3.create_multipart_upload(Bucket=self.name, Key=key)
        except BaseException as exc:
            if not _refused(exc):
                # The server may have created the upload and only its answer was lost;
                # without its id nothing would ever abort it, and its parts cost money.
                await asyncio.shield(self._abort_unanswered(key))
            raise
        upload_id: str = created["UploadId"]
        try:
            etags: dict[int, str] = {}
            pending: Iterator[tuple[int, int]] = enumerate(range(0, size, part_size), start=1)

            async def worker() -> None:
                for number, start in pending:
                    length = min(part_size, size - start)
                    body = _FileSlice(fd, start, length)
                    response = await self._send_slice(
                        key,
                        src,
                        body,
                        self._s3.upload_part(
                            Bucket=self.name,
                            Key=key,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=body,
                            ContentLength=length,
                        ),
                    )
                    etags[number] = response["ETag"]

            parts_count = -(-size // part_size)
            await _gather_or_cancel([worker() for _ in range(min(self._concurrency, parts_count))])
            response = await self._s3.complete_multipart_upload(
                Bucket=self.name,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [{"ETag": etags[n], "PartNumber": n} for n in sorted(etags)]
                },
            )
        except BaseException:
            # Shielded so that a cancelled upload still cleans up its parts on the server.
            await asyncio.shield(self._abort(key, upload_id))
            raise
        return self._info(key, response, size)

    async def _abort_unanswered(self, key: str) -> None:
        """Abort every in-progress multipart upload of exactly ``key``, best effort.

        Called when CreateMultipartUpload failed without a refusal: the upload may exist
        but its id never arrived, so this aborts them all. It would also abort a concurrent
        upload of the same key by another writer; tenantdb uploads files only to keys new
        to each upload (snapshots), where no such writer exists.
        """
        params: dict[str, Any] = {"Bucket": self.name, "Prefix": key}
        try:
            while True:
                page = await self._s3.list_multipart_uploads(**params)
                for upload in page.get("Uploads", ()):
                    # Prefix also matches longer keys, which belong to other uploads.
                    if upload.get("Key") == key:
                        await self._abort(key, upload["UploadId"])
                key_marker = page.get("NextKeyMarker")
                if not page.get("IsTruncated") or not key_marker:
                    break
                params["KeyMarker"] = key_marker
                if upload_marker := page.get("NextUploadIdMarker"):
                    params["UploadIdMarker"] = upload_marker
        except Exception as exc:  # the original failure matters more than the cleanup's
            log.warning(
                "could not look for the multipart upload of %r in %r whose creation was "
                "not answered (%s); a lifecycle rule will have to remove its parts",
                key,
                self.name,
                type(exc).__name__,
            )

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._s3.abort_multipart_upload(Bucket=self.name, Key=key, UploadId=upload_id)
        except Exception as exc:  # the original failure matters more than the cleanup's
            log.warning(
                "could not abort multipart upload of %r in %r (%s); a lifecycle rule "
                "will have to remove its parts",
                key,
                self.name,
                type(exc).__name__,
            )


def _refused(exc: BaseException) -> bool:
    """Whether a request surely did nothing: refused with a 4xx, or never sent."""
    if isinstance(exc, ParamValidationError | NoCredentialsError | PartialCredentialsError):
        return True
    if not isinstance(exc, ClientError):
        return False
    status, _code = _status_and_code(exc)
    return 400 <= status < 500


async def _read_whole(stream: Any, limit: int | None, key: str) -> bytes:
    """Read a body to its end, but never more than ``limit`` bytes (one more to see it)."""
    if limit is None:
        body: bytes = await stream.read()
        return body
    received = bytearray()
    # Content-Length was checked already; this bounds a body that declared none.
    while chunk := await stream.read(limit + 1 - len(received)):
        received += chunk
        if len(received) > limit:
            raise ObjectTooLargeError(key=key, size=len(received), limit=limit)
    return bytes(received)


def _add_tigris_consistent_header(request: Any, **_: Any) -> None:
    """botocore ``before-sign`` hook: ask Tigris for read-after-write consistency."""
    request.headers["X-Tigris-Consistent"] = "true"


def _total_size(response: dict[str, Any]) -> int:
    """The whole object's size from a (possibly ranged) GET answer."""
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(response.get("ContentLength") or 0)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front, so a full disk fails before any download."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
