"""Whether a bucket enforces the conditional writes the lease depends on.

A store that accepts a write whose ``If-None-Match: *`` or ``If-Match`` does not hold lets
two machines both believe they hold a tenant's lease. ``check_conditional_writes`` tries
both on a scratch key under the prefix, never under a tenant's own objects, and removes
the key afterwards. `tenantdb doctor` runs it; a machine runs it at startup and refuses
to serve from a bucket that fails it, once per data directory and store
(``check_conditional_writes_once``): a machine woken on its volume makes no such writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import Awaitable
from pathlib import Path

from tenantdb.errors import ConditionalWritesIgnoredError, PreconditionFailedError, StorageError
from tenantdb.localfiles import write_atomically
from tenantdb.storage.base import Bucket, ObjectInfo

__all__ = [
    "PASSED_FILE",
    "PROBE_DIRECTORY",
    "check_conditional_writes",
    "check_conditional_writes_once",
]

# Not a tenant id (a DNS label has no underscore), so no listing of tenants shows it.
PROBE_DIRECTORY = "_tenantdb_probe"
_NOT_AN_ETAG = '"tenantdb-probe-etag-that-no-object-has"'


async def check_conditional_writes(bucket: Bucket, prefix: str) -> None:
    """Raise ``ConditionalWritesIgnoredError`` unless the bucket enforces conditional writes.

    Four writes to ``<prefix>_tenantdb_probe/<random>``: a create with ``If-None-Match: *``
    (must land), the same again (must get 412), an ``If-Match`` with a wrong ETag (must get
    412), one with the right ETag (must land); then the key is deleted. Any other failure of
    the bucket is raised as the ``StorageError`` it is.
    """
    key = f"{prefix}{PROBE_DIRECTORY}/{secrets.token_hex(8)}"
    try:
        created = await bucket.put(key, b"created", if_none_match="*")
        await _refused(
            bucket.put(key, b"overwritten", if_none_match="*"),
            bucket,
            key,
            "If-None-Match: *",
            "an existing object was overwritten by a create-only write",
        )
        await _refused(
            bucket.put(key, b"overwritten", if_match=_NOT_AN_ETAG),
            bucket,
            key,
            "If-Match",
            "an object was replaced by a write whose If-Match named another ETag",
        )
        try:
            await bucket.put(key, b"replaced", if_match=created.etag)
        except PreconditionFailedError as exc:
            raise ConditionalWritesIgnoredError(
                f"bucket {_name(bucket)}: a write whose If-Match named the object's own ETag "
                f"was refused ({key!r}): compare-and-swap cannot work on this store",
                key=key,
                operation="put",
            ) from exc
    finally:
        # Best effort: the scratch key is tiny, and the check's own outcome matters more.
        with contextlib.suppress(StorageError):
            await bucket.delete(key)


# In the data directory: the stores (hashed) whose probe passed there, one per line.
PASSED_FILE = ".tenantdb.conditional-writes"
# More than any real data directory needs; a larger file is not ours and is ignored.
_PASSED_FILE_LIMIT = 64 << 10


async def check_conditional_writes_once(
    bucket: Bucket, prefix: str, *, store: str, data_dir: Path
) -> bool:
    """``check_conditional_writes``, unless it already passed for ``store`` in ``data_dir``.

    ``store`` names the bucket and where it is (endpoint, bucket name, prefix): whether a
    store enforces conditional writes is a property of the store, which a restart does not
    change. Returns whether the probe ran (and passed).
    """
    record = data_dir / PASSED_FILE
    line = hashlib.sha256(store.encode()).hexdigest().encode()
    if line in await asyncio.to_thread(_passed, record):
        return False
    await check_conditional_writes(bucket, prefix)
    await asyncio.to_thread(_note_passed, record, line)
    return True


def _passed(record: Path) -> list[bytes]:
    """The lines of ``record``; none if it is missing or too large to be ours."""
    try:
        with open(record, "rb") as f:
            data = f.read(_PASSED_FILE_LIMIT + 1)
    except FileNotFoundError:
        return []
    return data.split(b"\n") if len(data) <= _PASSED_FILE_LIMIT else []


def _note_passed(record: Path, line: bytes) -> None:
    """Add ``line`` to ``record`` (starting afresh if it grew large: a cache, not a log)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    lines = [kept for kept in _passed(record) if kept]
    if len(lines) > 100:
        lines = []
    write_atomically(record, b"".join(kept + b"\n" for kept in [*lines, line]))


async def _refused(
    write: Awaitable[ObjectInfo], bucket: Bucket, key: str, header: str, what: str
) -> None:
    """Return when ``write`` is refused with a 412; raise when it lands."""
    try:
        await write
    except PreconditionFailedError:
        return
    raise ConditionalWritesIgnoredError(
        f"bucket {_name(bucket)} ignores {header}: {what} ({key!r}); two machines could "
        "hold one tenant's lease. Use a store that enforces conditional writes (Tigris, S3)",
        key=key,
        operation="put",
    )


def _name(bucket: Bucket) -> str:
    """The bucket's name for a message (its repr carries no credentials)."""
    inner = getattr(bucket, "inner", bucket)  # through a MeteredBucket
    return repr(getattr(inner, "name", None) or inner)
