"""Each tenant's data key: stored wrapped in its own small object, unwrapped and cached.

``tenants/<tenant>/key.json`` (see docs/format.md) holds the tenant's random data key,
wrapped by a key-encryption key of the keyring. It is created with ``If-None-Match: *`` by
the first write that needs it; a racing creator's 412 reads the winner's object and uses
that key. Deleting it makes every object sealed with the key unreadable.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, overload

from tenantdb.crypto import DataKey, Keyring, Refused, WrappedKey, unwrap_data_key, wrap_data_key
from tenantdb.errors import (
    DataKeyError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
)
from tenantdb.parsing import Malformed, bounded_text, load_json, parse_iso_time
from tenantdb.storage.base import Bucket, SmallObject

__all__ = ["KEY_OBJECT", "DataKeys", "TenantKey", "key_object_body", "parse_key_object"]

KEY_OBJECT = "key.json"
_KEY_OBJECT_MAX = 4096
_KEY_FORMAT = 1
# Data keys kept unwrapped: a router looks up many tenants; each costs one GET to reload.
_CACHED_KEYS = 4096


@dataclass(frozen=True)
class TenantKey:
    """A tenant's unwrapped data key, and when it was first stored."""

    data_key: DataKey
    # Plaintext objects the bucket stored after this are refused.
    since: datetime


def key_object_body(tenant: str, wrapped: WrappedKey) -> bytes:
    """The JSON of a tenant's key object."""
    return json.dumps(
        {
            "format": _KEY_FORMAT,
            "tenant": tenant,
            "algorithm": "AES-256-GCM",
            "kek": wrapped.kek_id,
            "wrapped": base64.b64encode(wrapped.wrapped).decode(),
            "since": wrapped.since or None,
        },
        sort_keys=True,
    ).encode()


def parse_key_object(body: bytes, *, tenant: str, key: str) -> WrappedKey:
    """The wrapped data key a key object holds; ``DataKeyError`` naming it for anything else."""

    def damaged(reason: str) -> DataKeyError:
        return DataKeyError(
            f"tenant {tenant}: its data key {key} is damaged ({reason}); its data cannot be read",
            tenant=tenant,
            key=key,
        )

    try:
        data = load_json(body, max_depth=2)
    except Malformed as exc:
        raise damaged(exc.reason) from None
    if not isinstance(data, dict) or data.get("format") != _KEY_FORMAT:
        raise damaged("not a key object of format 1")
    if data.get("tenant") != tenant:
        raise damaged("it names another tenant")
    kek, wrapped, since = data.get("kek"), data.get("wrapped"), data.get("since")
    if bounded_text(kek, max_length=32) is None or not isinstance(wrapped, str):
        raise damaged("no key id or wrapped key")
    if since is not None and parse_iso_time(since) is None:
        raise damaged("'since' is not a time")
    try:
        raw = base64.b64decode(wrapped.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise damaged("the wrapped key is not base64") from None
    return WrappedKey(str(kek), raw, since or "")


class DataKeys:
    """The tenants' data keys in ``bucket`` under ``prefix``, unwrapped with ``keyring``."""

    def __init__(self, bucket: Bucket, keyring: Keyring, *, prefix: str) -> None:
        self.bucket = bucket
        self.keyring = keyring
        self.prefix = prefix
        self._keys: OrderedDict[str, TenantKey] = OrderedDict()

    def key_object(self, tenant: str) -> str:
        """The key of ``tenant``'s wrapped data key."""
        return f"{self.prefix}{tenant}/{KEY_OBJECT}"

    @overload
    async def get(self, tenant: str, *, create: Literal[True]) -> TenantKey: ...

    @overload
    async def get(self, tenant: str, *, create: bool) -> TenantKey | None: ...

    async def get(self, tenant: str, *, create: bool) -> TenantKey | None:
        """The tenant's data key: cached, read, or (``create``) made; None if it has none."""
        cached = self._keys.get(tenant)
        if cached is not None:
            self._keys.move_to_end(tenant)
            return cached
        key = self.key_object(tenant)
        try:
            found = await self.bucket.get(key, max_size=_KEY_OBJECT_MAX)
        except ObjectNotFoundError:
            if not create:
                return None
            found = await self._create(tenant, key)
        except ObjectTooLargeError as exc:
            raise DataKeyError(
                f"tenant {tenant}: its data key {key} is {exc.size} bytes, not a key object",
                tenant=tenant,
                key=key,
            ) from None
        wrapped = parse_key_object(found.body, tenant=tenant, key=key)
        try:
            data_key = unwrap_data_key(self.keyring, tenant, key, wrapped)
        except Refused as exc:
            raise DataKeyError(
                f"tenant {tenant}: its data key {key} cannot be unwrapped: {exc.reason} "
                f"(configured key ids: {', '.join(self.keyring.ids)})",
                tenant=tenant,
                key=key,
                key_id=wrapped.kek_id,
            ) from None
        since = parse_iso_time(wrapped.since) if wrapped.since else found.info.last_modified
        loaded = TenantKey(data_key, since or found.info.last_modified)
        self._keys[tenant] = loaded
        if len(self._keys) > _CACHED_KEYS:
            self._keys.popitem(last=False)
        return loaded

    async def _create(self, tenant: str, key: str) -> SmallObject:
        """Store a new wrapped data key; a concurrent creator's wins and is read back."""
        _, wrapped = wrap_data_key(self.keyring, tenant, key)
        body = key_object_body(tenant, wrapped)
        try:
            info = await self.bucket.put(key, body, if_none_match="*")
        except PreconditionFailedError:
            # Another machine created it first, or this very write landed unheard: either
            # way the stored key is the tenant's, and the one made here is dropped.
            return await self.bucket.get(key, max_size=_KEY_OBJECT_MAX)
        return SmallObject(info, body)

    def forget(self, tenant: str) -> None:
        """Drop a cached data key (after its key object was deleted or rewritten)."""
        self._keys.pop(tenant, None)

    async def opening(self, tenant: str, key: str) -> DataKey:
        """The data key to open ``key`` with; ``DataKeyError`` when the tenant has none."""
        found = await self.get(tenant, create=False)
        if found is None:
            raise DataKeyError(
                f"tenant {tenant}: {key} is encrypted but the tenant's data key "
                f"{self.key_object(tenant)} does not exist (deleted: the tenant's encrypted "
                "history is unreadable by anyone)",
                tenant=tenant,
                key=key,
            )
        return found.data_key
