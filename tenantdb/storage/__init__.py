"""Buckets: one Protocol, an S3 backend and an embedded local-directory backend."""

from tenantdb.storage.base import Bucket, ObjectInfo, RetryPolicy, SmallObject

__all__ = ["Bucket", "ObjectInfo", "RetryPolicy", "SmallObject"]
