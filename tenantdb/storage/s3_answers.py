"""Reading S3's answers: ETags, sizes and server dates into ObjectInfo, bodies within bounds."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from tenantdb.errors import ObjectTooLargeError, StorageError
from tenantdb.storage.base import ObjectInfo

__all__ = ["object_info", "read_whole", "server_date", "total_size", "utc"]


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


def server_date(response: dict[str, Any]) -> datetime | None:
    """The response's HTTP ``Date``: the server's clock, used for lease expiry."""
    return _http_date(_headers(response).get("date"))


def utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive value is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def object_info(bucket: str, key: str, response: dict[str, Any], size: int) -> ObjectInfo:
    """What an answer about one object says of it; StorageError if it carries no ETag."""
    date = server_date(response)
    modified = response.get("LastModified")
    if isinstance(modified, datetime):
        last_modified = utc(modified)
    else:
        # PutObject and CompleteMultipartUpload answers carry no Last-Modified on S3;
        # the server's Date of the write is within a second of it, on the same clock.
        last_modified = (
            _http_date(_headers(response).get("last-modified")) or date or datetime.now(UTC)
        )
    etag = response.get("ETag")
    if not etag:
        # Every conditional write needs the ETag; a store that omits it cannot work.
        raise StorageError(
            f"S3 answer about {key!r} in bucket {bucket!r} carried no ETag",
            key=key,
        )
    return ObjectInfo(
        key=key,
        etag=str(etag),
        size=size,
        last_modified=last_modified,
        server_date=date,
    )


def total_size(response: dict[str, Any]) -> int:
    """The whole object's size from a (possibly ranged) GET answer."""
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(response.get("ContentLength") or 0)


async def read_whole(stream: Any, limit: int | None, key: str) -> bytes:
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
