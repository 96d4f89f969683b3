"""Buckets: one Protocol, an S3 backend and an embedded local-directory backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantdb.storage.base import Bucket, ObjectInfo, RetryPolicy, SmallObject
from tenantdb.storage.local import LocalBucket

if TYPE_CHECKING:
    from tenantdb.config import Settings

__all__ = ["Bucket", "LocalBucket", "ObjectInfo", "RetryPolicy", "SmallObject", "open_bucket"]


def open_bucket(settings: Settings) -> Bucket:
    """Return the bucket the settings name: S3 when BUCKET_NAME is set, else the local one.

    The bucket is not opened yet: use it with ``async with``.
    """
    if settings.bucket_name:
        # Imported here so that importing tenantdb never imports aioboto3 for local use.
        from tenantdb.storage.s3 import S3Bucket

        return S3Bucket.from_settings(settings)
    return LocalBucket(settings.local_bucket_dir)
