"""The tenantdb exception hierarchy.

Every error tenantdb raises on purpose is a ``TenantDBError``::

    TenantDBError
    ├── ConfigurationError            settings or arguments that cannot work
    ├── InvalidTenantError            a tenant id that is not a DNS label
    ├── DataDirLockedError            another process holds the data directory
    ├── StorageError                  a bucket operation failed (key, operation)
    │   ├── ObjectNotFoundError       404: the object does not exist
    │   ├── ObjectTooLargeError       bigger than the reader's limit, left unread (size)
    │   ├── PreconditionFailedError   412: If-Match / If-None-Match did not hold
    │   ├── ConditionalConflictError  409: a concurrent conditional write; retry it
    │   ├── TransientStorageError     5xx, timeouts, resets: retried before surfacing
    │   ├── AccessDeniedError         403: credentials or policy
    │   ├── BucketConfigurationError  no such bucket, bad endpoint, bad key name
    │   │   └── ConditionalWritesIgnoredError  the bucket ignores If-Match / If-None-Match
    │   ├── LocalDiskError            the local disk refused a write (full, read-only)
    │   └── EncryptionError           an encrypted tenant's key or object is unusable (tenant)
    │       ├── DataKeyError          its data key is missing, damaged or under an unknown key
    │       └── DecryptionError       an object fails authentication: damaged, moved, forged
    ├── LeaseError                    the tenant lease protocol
    │   ├── LeaseHeldError            a live other machine holds the lease
    │   ├── LeaseLostError            fenced: a newer holder exists, stop writing
    │   ├── CrossRegionLeaseError     taking over from another region on a regional bucket
    │   └── LockFileCorruptError      lock.json is not something tenantdb can trust
    ├── SnapshotError                 a snapshot cannot be made or restored (key)
    ├── IntegrityCheckError           a restored database fails PRAGMA integrity_check (problems)
    ├── ReplicationError              the incremental log cannot be read, written or applied (key)
    │   ├── PointInTimeError          that moment cannot be restored exactly (at, earliest)
    │   └── ListingBehindError        the bucket's LIST lacks an object lock.json names (key)
    ├── DurabilityError               a committed write did not reach the bucket in time (tenant)
    ├── ReplicaRefusedError           this machine's copy may not serve a read (the holder will)
    ├── ConnectionUnavailableError    no database connection for a request (503)
    │   └── PoolBusyError             none came free in time (held)
    └── RoutingError                  finding the machine of another tenant
        ├── DNSLookupError            the DNS server timed out or failed
        ├── MachinesAPIError          the Fly Machines API failed or answered nonsense (status)
        ├── NoMachineError            nothing anywhere serves the tenant
        └── MoveError                 a tenant's move to another region stopped (kept machines)

Messages never contain credentials: tenantdb builds them from keys, tenant ids and
status codes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from starlette.exceptions import HTTPException

__all__ = [
    "AccessDeniedError",
    "BucketConfigurationError",
    "ConditionalConflictError",
    "ConditionalWritesIgnoredError",
    "ConfigurationError",
    "ConnectionUnavailableError",
    "CrossRegionLeaseError",
    "DNSLookupError",
    "DataDirLockedError",
    "DataKeyError",
    "DecryptionError",
    "DurabilityError",
    "EncryptionError",
    "IntegrityCheckError",
    "InvalidTenantError",
    "LeaseError",
    "LeaseHeldError",
    "LeaseLostError",
    "ListingBehindError",
    "LocalDiskError",
    "LockFileCorruptError",
    "MachinesAPIError",
    "MoveError",
    "NoMachineError",
    "ObjectNotFoundError",
    "ObjectTooLargeError",
    "PointInTimeError",
    "PoolBusyError",
    "PreconditionFailedError",
    "ReplicaRefusedError",
    "ReplicationError",
    "RoutingError",
    "SnapshotError",
    "StorageError",
    "TenantDBError",
    "TransientStorageError",
]


class TenantDBError(Exception):
    """Base class of every error tenantdb raises on purpose."""


class ConfigurationError(TenantDBError):
    """Settings, environment variables or arguments that cannot work.

    ``variable`` names the environment variable at fault, when there is one.
    """

    def __init__(self, message: str, *, variable: str = "") -> None:
        self.variable = variable
        super().__init__(message)


class InvalidTenantError(TenantDBError):
    """A tenant id that is not a lowercase DNS label of at most 63 characters."""

    def __init__(self, tenant: str, reason: str) -> None:
        self.tenant = tenant
        self.reason = reason
        super().__init__(f"invalid tenant id {tenant[:80]!r}: {reason}")


class DataDirLockedError(TenantDBError):
    """Another process on this machine already serves from the data directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"data directory {path} is locked by another tenantdb process; "
            "one process per data directory (set TENANTDB_DATA_DIR to run another)"
        )


class StorageError(TenantDBError):
    """A bucket operation failed."""

    def __init__(self, message: str, *, key: str = "", operation: str = "") -> None:
        self.key = key
        self.operation = operation
        super().__init__(message)


class ObjectNotFoundError(StorageError):
    """The object does not exist (HTTP 404)."""


class ObjectTooLargeError(StorageError):
    """The object is larger than the caller's limit, so it was not read (nor retried).

    ``size`` is the size the store declared, or, when it declared none, the bytes received
    before the limit was crossed (a lower bound).
    """

    def __init__(self, *, key: str, size: int, limit: int, operation: str = "get") -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"object {key!r} is {size} bytes, over the {limit}-byte limit of this read",
            key=key,
            operation=operation,
        )


class PreconditionFailedError(StorageError):
    """An If-Match or If-None-Match condition did not hold (HTTP 412)."""


class ConditionalConflictError(StorageError):
    """A concurrent conditional write was in progress (HTTP 409); retry it."""


class TransientStorageError(StorageError):
    """A failure that may pass: 5xx, throttling, timeouts, connection resets."""


class AccessDeniedError(StorageError):
    """The credentials were refused (HTTP 403)."""


class BucketConfigurationError(StorageError):
    """The bucket, endpoint or key cannot work: no such bucket, bad name, bad URL."""


class ConditionalWritesIgnoredError(BucketConfigurationError):
    """The bucket accepted a write whose If-Match or If-None-Match did not hold.

    On such a store two machines can both believe they hold a lease: tenantdb must not
    serve from it.
    """


class LocalDiskError(StorageError):
    """The local file system refused a write: disk full, read-only, permissions."""


class EncryptionError(StorageError):
    """An encrypted tenant's data key or object cannot be used.

    ``tenant`` is the tenant, ``key`` the object at fault, ``key_id`` the key-encryption
    key's id when one is involved. Never retried: the same bytes give the same answer.
    """

    def __init__(
        self, message: str, *, tenant: str, key: str, key_id: str = "", operation: str = ""
    ) -> None:
        self.tenant = tenant
        self.key_id = key_id
        super().__init__(message, key=key, operation=operation)


class DataKeyError(EncryptionError):
    """A tenant's wrapped data key is missing, damaged, or wrapped by a key not configured."""


class DecryptionError(EncryptionError):
    """An object fails authentication: damaged, truncated, moved from another key or tenant."""


class LeaseError(TenantDBError):
    """The tenant lease protocol failed."""

    def __init__(self, message: str, *, tenant: str) -> None:
        self.tenant = tenant
        super().__init__(message)


class LeaseHeldError(LeaseError):
    """A live other machine holds the tenant's lease."""

    def __init__(self, *, tenant: str, owner: str, region: str, expires_in: float) -> None:
        self.owner = owner
        self.region = region
        self.expires_in = expires_in
        super().__init__(
            f"tenant {tenant} is held by machine {owner} ({region or 'unknown region'}), "
            f"lease expires in {expires_in:.1f}s unless renewed",
            tenant=tenant,
        )


class LeaseLostError(LeaseError):
    """The lease was taken by a newer holder: this machine is fenced."""


class CrossRegionLeaseError(LeaseError):
    """The lease was last held in another region, on a bucket not declared strongly consistent.

    On a bucket consistent only within a region (Tigris's default Global location type),
    a machine in another region may read an older lock.json and its conditional writes are
    not checked against the holder's: two machines could hold the lease at once.
    """

    def __init__(self, *, tenant: str, region: str, holder_region: str) -> None:
        self.region = region
        self.holder_region = holder_region
        super().__init__(
            f"tenant {tenant} was last held in region {holder_region}, not {region}: the "
            "bucket is not declared strongly consistent across regions, so taking the lease "
            "here could make two holders. Use a Single-region or Multi-region Tigris bucket "
            "and set TENANTDB_BUCKET_CONSISTENCY=strong, or run the tenant's machines in "
            f"{holder_region}",
            tenant=tenant,
        )


class LockFileCorruptError(LeaseError):
    """lock.json exists but is not a lock tenantdb wrote or can trust."""

    def __init__(self, *, tenant: str, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(
            f"{key} is damaged ({reason}); refusing to guess, fix or remove it by hand",
            tenant=tenant,
        )


class SnapshotError(TenantDBError):
    """A snapshot could not be made, verified or restored."""

    def __init__(self, message: str, *, key: str = "") -> None:
        self.key = key
        super().__init__(message)


class IntegrityCheckError(TenantDBError):
    """A tenant's restored database fails SQLite's ``PRAGMA integrity_check``.

    ``problems`` are the check's own lines (the first five are in the message).
    """

    def __init__(self, *, tenant: str, problems: Sequence[str]) -> None:
        self.tenant = tenant
        self.problems = tuple(problems)
        super().__init__(
            f"tenant {tenant}: integrity_check found {len(self.problems)} problem(s): "
            + "; ".join(self.problems[:5])
        )


class ReplicationError(TenantDBError):
    """The incremental log cannot be read, written or applied."""

    def __init__(self, message: str, *, key: str = "") -> None:
        self.key = key
        super().__init__(message)


class PointInTimeError(ReplicationError):
    """The database as it was at ``at`` cannot be restored exactly.

    ``earliest`` is the oldest moment the bucket's history can restore (None: none).
    """

    def __init__(
        self, message: str, *, at: datetime, earliest: datetime | None, key: str = ""
    ) -> None:
        self.at = at
        self.earliest = earliest
        super().__init__(message, key=key)


class ListingBehindError(ReplicationError):
    """The bucket's LIST lacks ``key``, which lock.json names: a listing that lags behind
    writes (as a Tigris bucket's may across regions), or a lost object. Try again."""


class DurabilityError(TenantDBError):
    """A committed write could not be made durable in the bucket: its answer is withheld.

    The write may still reach the bucket later (its upload may have landed unheard), as a
    database's interrupted commit may or may not have happened.
    """

    def __init__(self, message: str, *, tenant: str) -> None:
        self.tenant = tenant
        super().__init__(message)


class ReplicaRefusedError(TenantDBError):
    """This machine may not serve a read from its copy (``reason`` says why): the request
    goes to the holder instead. Never an answer a client sees."""

    def __init__(self, reason: str, *, tenant: str) -> None:
        self.reason = reason
        self.tenant = tenant
        super().__init__(f"tenant {tenant}: not read here: {reason}")


class ConnectionUnavailableError(TenantDBError, HTTPException):
    """The tenant's database lends no connection to a request: it is answered 503.

    Also a Starlette ``HTTPException``, so that Starlette and FastAPI answer a handler that
    raises it with its short ``detail`` (and ``Retry-After``) instead of a 500; ``str()``
    is the whole reason, for the log.
    """

    def __init__(self, message: str, *, detail: str) -> None:
        HTTPException.__init__(self, 503, f"{detail}; retry shortly", {"Retry-After": "2"})
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


class PoolBusyError(ConnectionUnavailableError):
    """No connection of the pool came free within its bound: every one is held.

    ``held`` is how many connections were lent, none of them for a short turn.
    """

    def __init__(self, message: str, *, held: int) -> None:
        self.held = held
        super().__init__(message, detail="the tenant's database is busy")


class RoutingError(TenantDBError):
    """The machine serving another tenant could not be found."""

    def __init__(self, message: str, *, tenant: str) -> None:
        self.tenant = tenant
        super().__init__(message)


class DNSLookupError(RoutingError):
    """The DNS server timed out or answered with an error."""


class MachinesAPIError(RoutingError):
    """The Fly Machines API refused a call, failed, or answered something unusable.

    ``status`` is the HTTP status, or None when no usable response arrived (connection
    error, timeout). ``tenant`` is empty for calls that are not about one tenant.
    ``retry_after`` is the seconds a 429 asked to wait (its ``Retry-After``), else None.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        tenant: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message, tenant=tenant)


class NoMachineError(RoutingError):
    """No machine serves the tenant, running or stopped."""


class MoveError(RoutingError):
    """Moving a tenant to another machine stopped part way; no machine was destroyed.

    ``kept`` lists the ids of the tenant's machines left in place, ``step`` the step that
    failed, and the message what to do next.
    """

    def __init__(self, message: str, *, tenant: str, step: str, kept: tuple[str, ...]) -> None:
        self.step = step
        self.kept = kept
        super().__init__(message, tenant=tenant)
