"""Buckets: one Protocol (``base``), the S3 backend (``s3`` and its ``s3_*`` parts, the SDK in
``s3_sdk`` alone), the embedded local-directory backend (``local``), and metering.

Modules here may import only the foundation modules (errors, config, metrics, localfiles);
every other package builds on this one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tenantdb.storage.base import Bucket, ObjectInfo, RetryPolicy, SmallObject
from tenantdb.storage.encrypted import EncryptedBucket
from tenantdb.storage.local import LocalBucket

if TYPE_CHECKING:
    from tenantdb.config import Settings

__all__ = [
    "Bucket",
    "LocalBucket",
    "ObjectInfo",
    "RetryPolicy",
    "SmallObject",
    "describe_bucket",
    "open_bucket",
]


def open_bucket(settings: Settings, *, create: bool = True) -> Bucket:
    """Return the bucket the settings name: S3 when BUCKET_NAME is set, else the local one.

    The bucket is not opened yet: use it with ``async with``. With ``create=False`` a
    missing local bucket directory is an error when it opens, not a new empty bucket.
    With encryption keys set, the tenants' data is sealed and opened at this boundary.
    """
    bucket: Bucket
    if settings.bucket_name:
        # Imported here so that importing tenantdb never imports aioboto3 for local use.
        from tenantdb.storage.s3 import S3Bucket

        bucket = S3Bucket.from_settings(settings)
    else:
        bucket = LocalBucket(settings.local_bucket_dir, create=create)
    if settings.encryption_keys is not None:
        return EncryptedBucket(bucket, settings.encryption_keys, prefix=settings.prefix)
    return bucket


def describe_bucket(settings: Settings) -> str:
    """The bucket the settings name, for people: which S3 bucket where, or which directory."""
    if settings.bucket_name:
        # Scheme, host and port only: a URL may carry a user and password.
        url = urlsplit(settings.endpoint_url or "")
        where = f"{url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}"
        return f"S3 bucket {settings.bucket_name} at {where if url.hostname else 'AWS'}"
    return f"local bucket {settings.local_bucket_dir.absolute()}"
