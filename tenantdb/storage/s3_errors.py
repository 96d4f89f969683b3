"""S3 failures as tenantdb errors: which StorageError a failure is, in a message without secrets.

Works on the plain ``Failure`` values of ``s3_sdk``, never on an SDK type, so the rules can be
read (and tested) without the SDK in mind.
"""

from __future__ import annotations

import errno
from pathlib import Path
from urllib.parse import urlsplit

from tenantdb.errors import (
    AccessDeniedError,
    BucketConfigurationError,
    ConditionalConflictError,
    LocalDiskError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    TransientStorageError,
)
from tenantdb.storage.s3_sdk import Failure

__all__ = ["check_key", "local_error", "refused", "safe_url", "translate"]

_MAX_KEY_BYTES = 1024

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
TRANSIENT_CODES = frozenset(
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


def check_key(key: str, operation: str) -> None:
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


def safe_url(url: str | None) -> str | None:
    """The URL without any user:password part, fit for messages and reprs."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def translate(
    failure: Failure, *, operation: str, key: str, bucket: str, endpoint: str | None
) -> StorageError:
    """Map one SDK or network failure to the tenantdb error a caller can act on.

    Messages are built from the operation, bucket, key, endpoint (without credentials),
    status and error code only: never from the SDK's own text, which may carry URLs or
    request details.
    """
    # The S3 endpoint comes from AWS_ENDPOINT_URL_S3; unset, botocore asks AWS itself.
    url = safe_url(endpoint) or "AWS S3 (AWS_ENDPOINT_URL_S3 is not set)"
    where = f"S3 {operation} of {key!r} in bucket {bucket!r}" if key else f"S3 {operation}"
    kind: type[StorageError]
    if failure.kind == "answer":
        status, code = failure.status, failure.code
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
        elif status >= 500 or status == 429 or code in TRANSIENT_CODES:
            kind, why = TransientStorageError, f"server error: {code} (HTTP {status})"
        else:
            kind, why = StorageError, f"refused: {code} (HTTP {status})"
    elif failure.kind == "tls":
        kind, why = BucketConfigurationError, f"TLS handshake with {url} failed"
    elif failure.kind == "credentials":
        kind, why = (
            AccessDeniedError,
            "no usable S3 credentials were found: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (on Fly.io, `fly storage create` sets them)",
        )
    elif failure.kind == "parameters":
        kind, why = BucketConfigurationError, "request rejected by parameter validation"
    elif failure.kind == "network":
        kind, why = TransientStorageError, f"network failure ({failure.name}) at {url}"
    else:
        kind, why = StorageError, f"failed ({failure.name})"
    return kind(f"{where}: {why}", key=key, operation=operation)


def refused(failure: Failure) -> bool:
    """Whether a request surely did nothing: refused with a 4xx, or never sent."""
    if failure.kind in ("parameters", "credentials"):
        return True
    return failure.kind == "answer" and 400 <= failure.status < 500


def local_error(exc: OSError, *, path: Path, operation: str, key: str) -> LocalDiskError:
    """A local file's failure during an S3 transfer, blamed on the file."""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return LocalDiskError(
        f"S3 {operation} of {key!r}: local file {str(path)!r} failed: {reason}",
        key=key,
        operation=operation,
    )
