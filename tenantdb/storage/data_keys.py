"""Each tenant's data keys: stored wrapped in one small object, unwrapped and cached.

``tenants/<tenant>/key.json`` (see docs/format.md) holds the tenant's random data keys,
numbered from 1, each wrapped by a key-encryption key of the keyring: the newest seals, every
one opens (a sealed object names its key's number). It is created with ``If-None-Match: *``
by the first write that needs it (a racing creator's 412 reads the winner's object and uses
that key); a replacement adds the next key with ``If-Match`` on the ETag it read. A machine
picks up a replacement when it seals its next snapshot, or a log object 5 minutes after it
last checked (a conditional GET), and whenever an object names a key newer than it has.
Deleting the object makes every object sealed with any of its keys unreadable.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, overload

from tenantdb.crypto import (
    MAX_KEY_NUMBER,
    DataKey,
    Keyring,
    Refused,
    WrappedKey,
    rewrap_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from tenantdb.errors import (
    ConditionalConflictError,
    DataKeyError,
    DecryptionError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    TenantDBError,
)
from tenantdb.parsing import Malformed, bounded_text, load_json, parse_iso_time
from tenantdb.storage.base import Bucket, SmallObject

__all__ = [
    "KEY_OBJECT",
    "KEY_OBJECT_MAX",
    "Check",
    "MAX_DATA_KEYS",
    "DataKeys",
    "Replaced",
    "TenantKey",
    "key_object_body",
    "parse_key_object",
    "rewrap_all",
]

log = logging.getLogger("tenantdb")

# When a seal asks whether the tenant's data key was replaced (see DataKeys.sealing).
Check = Literal["now", "due", "never"]

KEY_OBJECT = "key.json"
KEY_OBJECT_MAX = 4096
# Each data key takes at most 162 bytes of its key object: 24 of them fit in 4 KiB.
MAX_DATA_KEYS = 24
# Format 1 holds data key 1 alone (as before keys had numbers); format 2 a list of them.
_SINGLE_FORMAT = 1
_LIST_FORMAT = 2
# Data keys kept unwrapped: a router looks up many tenants; each costs one GET to reload.
_CACHED_KEYS = 4096
# A holder writing asks whether its tenant's data key was replaced at most this often (a
# conditional GET, 304 when not), and at every snapshot: a replacement seals within minutes.
_RECHECK_SECONDS = 300.0


@dataclass(frozen=True)
class TenantKey:
    """A tenant's unwrapped data keys (oldest first), when the first was stored, the ETag of
    the key object they were read from, and when (monotonic) that was last checked."""

    keys: tuple[DataKey, ...]
    # Plaintext objects the bucket stored after this are refused.
    since: datetime
    etag: str
    checked: float

    @property
    def sealing(self) -> DataKey:
        """The key new objects are sealed with: the newest."""
        return self.keys[-1]

    def numbered(self, number: int) -> DataKey | None:
        """Data key ``number``, if this holds it."""
        return next((k for k in self.keys if k.number == number), None)


@dataclass(frozen=True)
class Replaced:
    """What a replacement of a tenant's data key did: the newest key before and after it, and
    whether this call added it (False: a concurrent replacement did, or this call's own write
    landed unheard)."""

    old: int
    new: int
    added: bool


def key_object_body(tenant: str, keys: Sequence[WrappedKey]) -> bytes:
    """The JSON of a tenant's key object holding ``keys`` (oldest first, one ``since``)."""
    common: dict[str, Any] = {
        "tenant": tenant,
        "algorithm": "AES-256-GCM",
        "since": keys[0].since or None,
    }
    if len(keys) == 1 and keys[0].number == 1:
        only = keys[0]
        fields = {"kek": only.kek_id, "wrapped": base64.b64encode(only.wrapped).decode()}
        return json.dumps({"format": _SINGLE_FORMAT, **common, **fields}, sort_keys=True).encode()
    listed = [
        {"number": k.number, "kek": k.kek_id, "wrapped": base64.b64encode(k.wrapped).decode()}
        for k in keys
    ]
    return json.dumps({"format": _LIST_FORMAT, **common, "keys": listed}, sort_keys=True).encode()


def parse_key_object(body: bytes, *, tenant: str, key: str) -> tuple[WrappedKey, ...]:
    """The wrapped data keys a key object holds, oldest first; ``DataKeyError`` naming it for
    anything else."""

    def damaged(reason: str) -> DataKeyError:
        return DataKeyError(
            f"tenant {tenant}: its data key {key} is damaged ({reason}); its data cannot be read",
            tenant=tenant,
            key=key,
        )

    try:
        data = load_json(body, max_depth=3)
    except Malformed as exc:
        raise damaged(exc.reason) from None
    form = data.get("format") if isinstance(data, dict) else None
    if type(form) is not int or form not in (_SINGLE_FORMAT, _LIST_FORMAT):
        raise damaged("not a key object of format 1 or 2")
    if data.get("tenant") != tenant:
        raise damaged("it names another tenant")
    since = data.get("since")
    if since is not None and parse_iso_time(since) is None:
        raise damaged("'since' is not a time")
    if form == _SINGLE_FORMAT:
        entries: object = [{**data, "number": 1}]
    else:
        entries = data.get("keys")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_DATA_KEYS:
        raise damaged(f"not a list of 1 to {MAX_DATA_KEYS} data keys")
    out: list[WrappedKey] = []
    for entry in entries:
        wrapped = _entry(entry, since or "")
        if isinstance(wrapped, str):
            raise damaged(wrapped)
        if out and wrapped.number <= out[-1].number:
            raise damaged("its data keys are not numbered in increasing order")
        out.append(wrapped)
    return tuple(out)


def _entry(entry: object, since: str) -> WrappedKey | str:
    """One data key of a key object, or why it is not one."""
    if not isinstance(entry, dict):
        return "a data key that is not an object"
    number, kek, wrapped = entry.get("number"), entry.get("kek"), entry.get("wrapped")
    if type(number) is not int or not 1 <= number <= MAX_KEY_NUMBER:
        return f"a data key number that is not 1 to {MAX_KEY_NUMBER}"
    if bounded_text(kek, max_length=32) is None or not isinstance(wrapped, str):
        return "no key id or wrapped key"
    try:
        raw = base64.b64decode(wrapped.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return "the wrapped key is not base64"
    return WrappedKey(str(kek), raw, since, number)


def rewrap_all(
    keyring: Keyring, tenant: str, key: str, keys: Sequence[WrappedKey], *, since: str
) -> list[WrappedKey]:
    """Every data key of a key object wrapped anew under the keyring's newest KEK, first
    stored at ``since``; ``DataKeyError`` naming the KEK id of one that does not unwrap."""
    out = []
    for wrapped in keys:
        try:
            out.append(rewrap_data_key(keyring, tenant, key, wrapped, since=since))
        except Refused as exc:
            raise _unwrap_error(keyring, tenant, key, wrapped, exc) from None
    return out


def _unwrap_error(
    keyring: Keyring, tenant: str, key: str, wrapped: WrappedKey, exc: Refused
) -> DataKeyError:
    which = f" (data key {wrapped.number})" if wrapped.number != 1 else ""
    return DataKeyError(
        f"tenant {tenant}: its data key {key}{which} cannot be unwrapped: {exc.reason} "
        f"(configured key ids: {', '.join(keyring.ids)})",
        tenant=tenant,
        key=key,
        key_id=wrapped.kek_id,
    )


@contextmanager
def _not_too_large(tenant: str, key: str) -> Iterator[None]:
    """A key object over the size limit as a ``DataKeyError`` naming it."""
    try:
        yield
    except ObjectTooLargeError as exc:
        raise DataKeyError(
            f"tenant {tenant}: its data key {key} is {exc.size} bytes, not a key object",
            tenant=tenant,
            key=key,
        ) from None


class DataKeys:
    """The tenants' data keys in ``bucket`` under ``prefix``, unwrapped with ``keyring``."""

    def __init__(self, bucket: Bucket, keyring: Keyring, *, prefix: str) -> None:
        self.bucket = bucket
        self.keyring = keyring
        self.prefix = prefix
        self._keys: OrderedDict[str, TenantKey] = OrderedDict()

    def key_object(self, tenant: str) -> str:
        """The key of ``tenant``'s wrapped data keys."""
        return f"{self.prefix}{tenant}/{KEY_OBJECT}"

    @overload
    async def get(self, tenant: str, *, create: Literal[True]) -> TenantKey: ...

    @overload
    async def get(self, tenant: str, *, create: bool) -> TenantKey | None: ...

    async def get(self, tenant: str, *, create: bool) -> TenantKey | None:
        """The tenant's data keys: cached, read, or (``create``) made; None if it has none."""
        cached = self._keys.get(tenant)
        if cached is not None:
            self._keys.move_to_end(tenant)
            return cached
        key = self.key_object(tenant)
        try:
            found = await self._read(tenant, key)
        except ObjectNotFoundError:
            if not create:
                return None
            found = await self._create(tenant, key)
        return self._cache(tenant, self._unwrapped(tenant, key, found))

    async def _read(self, tenant: str, key: str) -> SmallObject:
        """The key object; a too large one is refused."""
        with _not_too_large(tenant, key):
            return await self.bucket.get(key, max_size=KEY_OBJECT_MAX)

    def _unwrapped(self, tenant: str, key: str, found: SmallObject) -> TenantKey:
        """The data keys ``found`` holds, unwrapped."""
        wrapped = parse_key_object(found.body, tenant=tenant, key=key)
        opened = []
        for one in wrapped:
            try:
                opened.append(unwrap_data_key(self.keyring, tenant, key, one))
            except Refused as exc:
                raise _unwrap_error(self.keyring, tenant, key, one, exc) from None
        first = wrapped[0].since
        since = (parse_iso_time(first) if first else None) or found.info.last_modified
        return TenantKey(tuple(opened), since, found.info.etag, time.monotonic())

    def _cache(self, tenant: str, loaded: TenantKey) -> TenantKey:
        self._keys[tenant] = loaded
        self._keys.move_to_end(tenant)
        if len(self._keys) > _CACHED_KEYS:
            self._keys.popitem(last=False)
        return loaded

    async def _create(self, tenant: str, key: str) -> SmallObject:
        """Store a new wrapped data key; a concurrent creator's wins and is read back."""
        _, wrapped = wrap_data_key(self.keyring, tenant, key)
        body = key_object_body(tenant, [wrapped])
        try:
            info = await self.bucket.put(key, body, if_none_match="*")
        except PreconditionFailedError:
            # Another machine created it first, or this very write landed unheard: either
            # way the stored key is the tenant's, and the one made here is dropped.
            return await self.bucket.get(key, max_size=KEY_OBJECT_MAX)
        return SmallObject(info, body)

    async def sealing(self, tenant: str, *, check: Check) -> DataKey:
        """The data key to seal ``tenant``'s next object with (made if it has none).

        ``check`` "now" (a snapshot's seal), or "due" once the key object was last checked
        ``_RECHECK_SECONDS`` ago (a log object's), first asks the bucket whether it changed
        (a conditional GET): a replacement is picked up then. Any failure of that keeps the
        key already known, which stays valid, until the next check: a write never fails for
        it. "never" is for lock.json's inline segments: no request may delay a lease's
        renewal or a commit's publication.
        """
        known = await self.get(tenant, create=True)
        if check == "never" or (
            check == "due" and time.monotonic() - known.checked < _RECHECK_SECONDS
        ):
            return known.sealing
        # Checked now, whatever the answer: an outage costs one request per interval.
        known = self._cache(tenant, replace(known, checked=time.monotonic()))
        key = self.key_object(tenant)
        try:
            with _not_too_large(tenant, key):
                changed = await self.bucket.get_if_changed(key, known.etag, max_size=KEY_OBJECT_MAX)
            fresh = None if changed is None else self._unwrapped(tenant, key, changed)
        except TenantDBError as exc:
            log.warning(
                "tenant %s: could not check %s for a new data key (sealing with data key %d "
                "still): %s",
                tenant,
                key,
                known.sealing.number,
                exc,
            )
            return known.sealing
        if fresh is None:
            return known.sealing
        if fresh.sealing.number < known.sealing.number:
            # Keys are only ever added: an older key object is a replay by a bucket writer.
            log.warning(
                "tenant %s: %s holds no data key %d any more (an older copy put back?): "
                "sealing with data key %d still",
                tenant,
                key,
                known.sealing.number,
                known.sealing.number,
            )
            return known.sealing
        return self._cache(tenant, fresh).sealing

    def forget(self, tenant: str) -> None:
        """Drop a cached data key (after its key object was deleted or rewritten)."""
        self._keys.pop(tenant, None)

    async def opening(self, tenant: str, key: str, number: int) -> DataKey:
        """Data key ``number`` of ``tenant``, to open ``key`` with: ``DataKeyError`` when the
        tenant has no key object, ``DecryptionError`` when it does not hold that key.

        A number newer than the cached keys reloads the key object once: another machine
        may have replaced the key since it was read. Keys are only ever added, so an older
        number missing stays missing.
        """
        found = await self.get(tenant, create=False)
        if found is not None and number > found.sealing.number:
            self.forget(tenant)
            found = await self.get(tenant, create=False)
        if found is None:
            raise DataKeyError(
                f"tenant {tenant}: {key} is encrypted but the tenant's data key "
                f"{self.key_object(tenant)} does not exist (deleted: the tenant's encrypted "
                "history is unreadable by anyone)",
                tenant=tenant,
                key=key,
            )
        data_key = found.numbered(number)
        if data_key is None:
            held = ", ".join(str(k.number) for k in found.keys)
            raise DecryptionError(
                f"tenant {tenant}: {key} is refused: it is sealed with data key {number}, "
                f"which {self.key_object(tenant)} does not hold (it holds {held}): damaged, "
                "or an older copy of the key object was put back",
                tenant=tenant,
                key=key,
            )
        return data_key

    async def replace(self, tenant: str) -> Replaced:
        """Add a new data key to ``tenant``'s key object, which seals from then on.

        The key object is rewritten with ``If-Match`` on the ETag read, every older key
        kept (and re-wrapped under the newest KEK). A 412 reads it again: if a key newer
        than the one first read is there now, a concurrent replacement (or this call's
        write, landed unheard) did the work and none is added. ``DataKeyError`` if the
        tenant has no data key yet or already has ``MAX_DATA_KEYS``.
        """
        key = self.key_object(tenant)
        first: int | None = None
        for _ in range(3):
            try:
                found = await self._read(tenant, key)
            except ObjectNotFoundError:
                raise DataKeyError(
                    f"tenant {tenant}: it has no data key {key} yet (its first write with "
                    "encryption on makes one): nothing to replace",
                    tenant=tenant,
                    key=key,
                ) from None
            wrapped = parse_key_object(found.body, tenant=tenant, key=key)
            newest = wrapped[-1].number
            if first is None:
                first = newest
            elif newest > first:
                self.forget(tenant)
                return Replaced(first, newest, added=False)
            if len(wrapped) >= MAX_DATA_KEYS or newest >= MAX_KEY_NUMBER:
                raise DataKeyError(
                    f"tenant {tenant}: {key} already holds {len(wrapped)} data keys (data key "
                    f"{newest} the newest): no more can be added",
                    tenant=tenant,
                    key=key,
                )
            since = wrapped[0].since or found.info.last_modified.isoformat()
            kept = rewrap_all(self.keyring, tenant, key, wrapped, since=since)
            _, added = wrap_data_key(self.keyring, tenant, key, number=newest + 1, since=since)
            body = key_object_body(tenant, [*kept, added])
            try:
                await self.bucket.put(key, body, if_match=found.info.etag)
            except (PreconditionFailedError, ConditionalConflictError):
                continue
            self.forget(tenant)
            return Replaced(newest, newest + 1, added=True)
        raise DataKeyError(
            f"tenant {tenant}: its data key {key} kept changing during the replacement; run "
            "it again",
            tenant=tenant,
            key=key,
        )
