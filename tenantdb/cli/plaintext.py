"""Which objects of a tenant's current history are still plaintext, from before its data key.

Once a tenant has a data key, everything written for it is sealed, and an unsealed object
stored after the key is refused by every reader (storage/encrypted.py). So the bucket's clock
sorts the objects lock.json names without reading them: stored in an earlier second than the
data key, plaintext; in a later one, sealed. Only an object of the key's own second (S3's
Last-Modified has one-second resolution) is looked at: a snapshot's stored size tells (a
sealed one's is odd, a SQLite file's whole pages), a segment's first bytes do, and inline
segments are read from the stored lock.json. The work is bounded by what lock.json names.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

from tenantdb.crypto import is_sealed, opened_size, sealed_size
from tenantdb.parsing import Malformed, load_json
from tenantdb.protocol.lockfile import LOCK_MAX_BYTES, LockRecord
from tenantdb.replication.history import History
from tenantdb.replication.segment import SEGMENT_MAX_BYTES
from tenantdb.storage.encrypted import EncryptedBucket

__all__ = ["Plaintext", "plaintext_in_history"]


@dataclass(frozen=True)
class Plaintext:
    """A tenant's history as encryption sees it: whether it has a data key, and the keys of
    the objects lock.json names that are plaintext (inline segments as ``<key> (inline)``)."""

    data_key: bool
    keys: tuple[str, ...]


def _second(moment: datetime) -> int:
    return int(moment.timestamp())


async def plaintext_in_history(bucket: EncryptedBucket, history: History) -> Plaintext | None:
    """The plaintext objects of ``history`` (read through ``bucket``); None without lock.json."""
    observed = history.lock
    if observed is None:
        return None
    record = observed.record
    key = await bucket.keys.get(history.tenant, create=False)
    stored = {s.key: s.last_modified for s in history.snapshots}
    stored |= {s.key: s.last_modified for s in history.segments}
    named = sorted(k for k in history.named() if k in stored)
    if key is None:
        return Plaintext(False, (*named, *_inline_keys(record, history)))
    since = _second(key.since)
    found: list[str] = []
    for name in named:
        second = _second(stored[name])
        if second < since or (second == since and not await _sealed(bucket, name, record)):
            found.append(name)
    if record.log is not None and record.log.inline:
        second = _second(observed.info.last_modified)
        if second < since or (second == since and not await _inline_sealed(bucket, history)):
            found.extend(_inline_keys(record, history))
    return Plaintext(True, tuple(found))


async def _sealed(bucket: EncryptedBucket, key: str, record: LockRecord) -> bool:
    """Whether the stored object ``key`` is sealed: a snapshot by its size, a segment by its
    first bytes (read whole, within the segment limit: a Bucket has no ranged read)."""
    if record.snapshot is not None and key == record.snapshot.key:
        size = (await bucket.inner.head(key)).size
        return size % 2 == 1 and opened_size(size) is not None
    found = await bucket.inner.get(key, max_size=sealed_size(SEGMENT_MAX_BYTES))
    return is_sealed(found.body)


async def _inline_sealed(bucket: EncryptedBucket, history: History) -> bool:
    """Whether the segments the stored lock.json carries are sealed: its carried block, or
    each item of its inline list (written before blocks). Anything unreadable is not."""
    lock_key = f"{history.prefix}{history.tenant}/lock.json"
    try:
        data = load_json((await bucket.inner.get(lock_key, max_size=LOCK_MAX_BYTES)).body)
    except Malformed:
        return False
    pointer = data.get("log") if isinstance(data, dict) else None
    if not isinstance(pointer, dict):
        return False
    carried = pointer.get("carried")
    items = [carried] if carried is not None else pointer.get("inline")
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        return False
    try:
        return all(is_sealed(base64.b64decode(item, validate=True)) for item in items)
    except ValueError:
        return False


def _inline_keys(record: LockRecord, history: History) -> list[str]:
    log = record.log
    if log is None or not log.inline:
        return []
    root = f"{history.prefix}{history.tenant}/lock.json"
    return [f"{root} (inline segment {i})" for i in range(log.inline_from, log.tail + 1)]
