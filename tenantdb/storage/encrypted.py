"""A bucket that seals every tenant's data on the way in and opens it on the way out.

Wrapping the bucket encrypts at one boundary, for the lease, the shipper, restores and
every CLI verb alike. What an object is follows from its key (docs/format.md):

- ``<tenant>/log/<generation>/….seg``: the whole body is sealed (``tenantdb.crypto``);
- ``<tenant>/snapshots/<generation>-….sqlite3``: sealed in 256 KiB chunks, file to file;
  the sizes this bucket reports for sealed snapshots are their plaintext sizes;
- ``<tenant>/lock.json``: only the segments it carries are sealed: its ``log.carried``
  block as one body (for the lock's key and generation), or (written before blocks) each
  item of ``log.inline`` as its own object would be; the lease fields stay readable;
- ``<tenant>/key.json``: the tenant's data keys, wrapped (created with ``If-None-Match: *``
  by the first write that needs it; a racing creator adopts the winner's). The newest
  seals; each sealed object names the number of its key, and any of them opens;
- anything else (takeover records, probes) passes through.

Objects written before encryption was turned on stay readable: a body that is not sealed
is accepted only if the bucket stored it no later than the tenant's data key, so a bucket
writer cannot slip a plaintext object into a tenant that encrypts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import json
import re
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tenantdb.crypto import (
    HEADER_SIZE,
    Keyring,
    Kind,
    ObjectContext,
    Refused,
    is_sealed,
    open_bytes,
    open_file_in_place,
    opened_size,
    seal_bytes,
    seal_file,
    sealed_key_number,
    sealed_size,
)
from tenantdb.errors import (
    DecryptionError,
    LocalDiskError,
    ObjectTooLargeError,
)
from tenantdb.parsing import Malformed, bounded_int, load_json
from tenantdb.storage.base import Bucket, ObjectInfo, SmallObject
from tenantdb.storage.data_keys import Check, DataKeys

__all__ = ["EncryptedBucket"]

_SEGMENT = re.compile(r"log/(\d{1,12})/[0-9-]{1,40}\.(?:seg|pack)")
_SNAPSHOT = re.compile(r"snapshots/(\d{1,12})-[0-9a-f-]{1,200}\.sqlite3")
# Bodies up to this (most segments) are sealed and opened on the event loop: sealing (AES-GCM
# and the nonce's HMAC) takes about 2.5 ms per MiB, so under 1 ms here, less than a hop
# to a worker thread and back costs on a busy machine.
_INLINE_CRYPTO = 256 * 1024
# lock.json carries at most 24 KiB of segments of at least 102 bytes, and 1000 runs.
_MAX_INLINE = 256
_MAX_RUNS = 1000
_Place = Literal["lock", "segment", "snapshot", "other"]


def _place(prefix: str, key: str) -> tuple[str, _Place, int]:
    """(tenant, what the object is, its generation) from its key; ("", "other", 0) if none."""
    if not key.startswith(prefix):
        return "", "other", 0
    tenant, _, rest = key[len(prefix) :].partition("/")
    if not tenant or not rest:
        return "", "other", 0
    if rest == "lock.json":
        return tenant, "lock", 0
    if match := _SEGMENT.fullmatch(rest):
        return tenant, "segment", int(match[1])
    if match := _SNAPSHOT.fullmatch(rest):
        return tenant, "snapshot", int(match[1])
    return tenant, "other", 0


def _disk_error(exc: OSError, key: str, path: Path, operation: str) -> LocalDiskError:
    return LocalDiskError(
        f"could not seal or open {key} in {path.parent}: {exc.strerror or exc}",
        key=key,
        operation=operation,
    )


def _file_context(prefix: str, key: str) -> ObjectContext | None:
    """Where a segment or snapshot file belongs; None for the objects never sealed whole."""
    tenant, place, generation = _place(prefix, key)
    if place == "segment" or place == "snapshot":
        return ObjectContext(tenant, key, generation, place)
    return None


class EncryptedBucket:
    """``bucket`` with each tenant's segments, snapshots and inline segments sealed.

    ``prefix`` is where tenants live (``Settings.prefix``); ``keyring`` wraps and unwraps
    the tenants' data keys. Errors: ``DataKeyError`` and ``DecryptionError`` (one line
    naming the tenant, the key and the key id), never retried.

    Why ~260 lines: it is the whole Bucket protocol, one short method per operation; the
    sealing is in ``tenantdb.crypto`` and the data keys in ``data_keys``.
    """

    def __init__(self, bucket: Bucket, keyring: Keyring, *, prefix: str) -> None:
        self.inner = bucket
        self.prefix = prefix
        self.keys = DataKeys(bucket, keyring, prefix=prefix)

    def __repr__(self) -> str:
        return f"EncryptedBucket({self.inner!r})"

    @property
    def kind(self) -> Literal["s3", "local"]:
        """Which backend the wrapped bucket is."""
        return self.inner.kind

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    async def _check_plaintext(self, tenant: str, key: str, stored: datetime) -> None:
        """Accept an unsealed object only if stored no later than the tenant's data key."""
        found = await self.keys.get(tenant, create=False)
        if found is not None and stored > found.since:
            raise DecryptionError(
                f"tenant {tenant}: {key} is not encrypted, yet was stored after the tenant's "
                "data key: refusing it (not written by tenantdb with encryption on)",
                tenant=tenant,
                key=key,
            )

    def _refused(self, tenant: str, key: str, exc: Refused) -> DecryptionError:
        return DecryptionError(
            f"tenant {tenant}: {key} is refused: {exc.reason}", tenant=tenant, key=key
        )

    # -- small objects ---------------------------------------------------------------------

    async def _seal(
        self, tenant: str, key: str, kind: Kind, generation: int, body: bytes, check: Check
    ) -> bytes:
        data_key = await self.keys.sealing(tenant, check=check)
        ctx = ObjectContext(tenant, key, generation, kind)
        if len(body) <= _INLINE_CRYPTO:
            return seal_bytes(data_key, ctx, body)
        return await asyncio.to_thread(seal_bytes, data_key, ctx, body)

    async def _open(
        self, tenant: str, what: str, key: str, generation: int, body: bytes, stored: datetime
    ) -> bytes:
        """A segment's plaintext; ``what`` names it in errors, ``key`` is the key it is for."""
        if not is_sealed(body):
            await self._check_plaintext(tenant, what, stored)
            return body
        ctx = ObjectContext(tenant, key, generation, "segment")
        try:
            data_key = await self.keys.opening(tenant, what, sealed_key_number(body))
            if len(body) <= _INLINE_CRYPTO:
                return open_bytes(data_key, ctx, body)
            return await asyncio.to_thread(open_bytes, data_key, ctx, body)
        except Refused as exc:
            raise self._refused(tenant, what, exc) from None

    async def _opened(self, key: str, found: SmallObject) -> SmallObject:
        tenant, place, generation = _place(self.prefix, key)
        if place == "segment":
            stored = found.info.last_modified
            body = await self._open(tenant, key, key, generation, found.body, stored)
            return SmallObject(found.info, body)
        if place == "lock":
            stored = found.info.last_modified
            return SmallObject(
                found.info, await self._lock_inline(tenant, key, found.body, stored=stored)
            )
        return found

    async def get(self, key: str, *, max_size: int | None = None) -> SmallObject:
        """See ``Bucket.get``; a segment's limit is on its plaintext."""
        if max_size is not None and _place(self.prefix, key)[1] == "segment":
            max_size = sealed_size(max_size)
        return await self._opened(key, await self.inner.get(key, max_size=max_size))

    async def get_if_changed(
        self, key: str, etag: str, *, max_size: int | None = None
    ) -> SmallObject | None:
        """See ``Bucket.get_if_changed``."""
        changed = await self.inner.get_if_changed(key, etag, max_size=max_size)
        return None if changed is None else await self._opened(key, changed)

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        """See ``Bucket.put``: segments are sealed, lock.json's inline segments too."""
        tenant, place, generation = _place(self.prefix, key)
        if place == "segment":
            body = await self._seal(tenant, key, "segment", generation, body, "due")
        elif place == "lock":
            body = await self._lock_inline(tenant, key, body, stored=None)
        return await self.inner.put(key, body, if_match=if_match, if_none_match=if_none_match)

    async def _lock_inline(
        self, tenant: str, key: str, body: bytes, *, stored: datetime | None
    ) -> bytes:
        """lock.json with its carried segments sealed (``stored`` None) or opened.

        The carried block is sealed for the lock's own key and generation: it opens in no
        other object. Each item of an ``inline`` list (written before blocks) is sealed for
        the key its own object has (the generation comes from the lock's runs). The lease
        fields are left as they are. A lock.json that is not a JSON object with a log is
        returned as it is, for ``LockRecord.parse`` to judge; inline segments that cannot be
        placed in the log are refused, never passed on unopened.
        """
        try:
            data: Any = load_json(body)
        except Malformed:
            return body
        pointer = data.get("log") if isinstance(data, dict) else None
        if isinstance(pointer, dict) and isinstance(pointer.get("carried"), str):
            return await self._lock_block(tenant, key, data, stored=stored)
        items = pointer.get("inline") if isinstance(pointer, dict) else None
        if pointer is None or not items:
            return body
        keys = _inline_keys(self.prefix, tenant, pointer, items)
        if keys is None:
            raise DecryptionError(
                f"tenant {tenant}: {key} carries inline segments its log cannot place; "
                "refusing them",
                tenant=tenant,
                key=key,
            )
        out: list[str] = []
        for (segment_key, generation), segment in keys:
            if stored is None:
                segment = await self._seal(
                    tenant, segment_key, "segment", generation, segment, "never"
                )
            else:
                what = f"{segment_key} (inline in {key})"
                segment = await self._open(tenant, what, segment_key, generation, segment, stored)
            out.append(base64.b64encode(segment).decode())
        pointer["inline"] = out
        return _lock_json(data)

    async def _lock_block(
        self, tenant: str, key: str, data: dict[str, Any], *, stored: datetime | None
    ) -> bytes:
        """lock.json ``data`` with its carried block sealed (``stored`` None) or opened."""
        pointer, generation = data["log"], bounded_int(data.get("generation"), 1)
        try:
            block = base64.b64decode(pointer["carried"].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            block = None
        if block is None or generation is None:
            raise DecryptionError(
                f"tenant {tenant}: {key} carries a block that is not base64 or a generation "
                "that is not one; refusing it",
                tenant=tenant,
                key=key,
            )
        if stored is None:
            block = await self._seal(tenant, key, "segment", generation, block, "never")
        else:
            block = await self._open(
                tenant, f"{key} (carried block)", key, generation, block, stored
            )
        pointer["carried"] = base64.b64encode(block).decode()
        return _lock_json(data)

    async def head(self, key: str) -> ObjectInfo:
        """See ``Bucket.head``."""
        return self._sized(await self.inner.head(key))

    def _sized(self, info: ObjectInfo) -> ObjectInfo:
        """A sealed snapshot's info with its plaintext size.

        A sealed object's size is odd (its header is 31 bytes, its chunks even) and a SQLite
        file's a whole number of pages, so an older plaintext snapshot keeps its own.
        """
        if _place(self.prefix, info.key)[1] != "snapshot" or info.size % 2 == 0:
            return info
        length = opened_size(info.size)
        return info if length is None else replace(info, size=length)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """See ``Bucket.delete``; deleting a key object forgets its cached key."""
        tenant = _place(self.prefix, key)[0]
        if key == self.keys.key_object(tenant):
            self.keys.forget(tenant)
        await self.inner.delete(key, if_match=if_match)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """See ``Bucket.list``."""
        return [self._sized(info) for info in await self.inner.list(prefix)]

    async def download_file(
        self, key: str, dest: Path, *, max_size: int | None = None
    ) -> ObjectInfo:
        """See ``Bucket.download_file``: a sealed object is opened in place, chunk by chunk."""
        ctx = _file_context(self.prefix, key)
        if ctx is None:
            return await self.inner.download_file(key, dest, max_size=max_size)
        tenant = ctx.tenant
        stored_max = None if max_size is None else sealed_size(max_size)
        info = await self.inner.download_file(key, dest, max_size=stored_max)
        with open(dest, "rb") as f:
            head = f.read(HEADER_SIZE)
        if not is_sealed(head):
            await self._check_plaintext(tenant, key, info.last_modified)
            if max_size is not None and info.size > max_size:
                raise ObjectTooLargeError(key=key, size=info.size, limit=max_size)
            return info
        try:
            data_key = await self.keys.opening(tenant, key, sealed_key_number(head))
            length = await asyncio.to_thread(open_file_in_place, data_key, ctx, dest)
        except Refused as exc:
            raise self._refused(tenant, key, exc) from None
        except OSError as exc:
            raise _disk_error(exc, key, dest, "download") from exc
        return replace(info, size=length)

    async def upload_file(
        self, key: str, src: Path, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """See ``Bucket.upload_file``: a sealed copy beside ``src`` is uploaded, then removed."""
        ctx = _file_context(self.prefix, key)
        if ctx is None:
            return await self.inner.upload_file(key, src, if_none_match=if_none_match)
        tenant = ctx.tenant
        # A snapshot is when a machine holding the tenant picks up a replaced data key.
        data_key = await self.keys.sealing(tenant, check="now" if ctx.kind == "snapshot" else "due")
        # A dot name ending .tmp: remove_stray_temp_files takes it if a crash leaves it.
        sealed = src.with_name(f".{src.name}.{uuid.uuid4().hex}.sealed.tmp")
        try:
            await asyncio.to_thread(seal_file, data_key, ctx, src, sealed)
            info = await self.inner.upload_file(key, sealed, if_none_match=if_none_match)
        except Refused as exc:
            raise self._refused(tenant, key, exc) from None
        except OSError as exc:
            raise _disk_error(exc, key, sealed, "upload") from exc
        finally:
            sealed.unlink(missing_ok=True)
        return self._sized(info)

    async def copy(
        self, src: str, dst: str, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """See ``Bucket.copy``: sealed bytes are bound to their key, so they are opened and
        sealed anew for ``dst``; they pass through this machine (a snapshot in a temporary
        file, anything else in memory) instead of staying in the bucket."""
        if _file_context(self.prefix, src) is None and _file_context(self.prefix, dst) is None:
            found = await self.get(src)
            return await self.put(dst, found.body, if_none_match=if_none_match)
        with tempfile.TemporaryDirectory(prefix="tenantdb-copy-") as scratch:
            plain = Path(scratch) / "object"
            await self.download_file(src, plain)
            return await self.upload_file(dst, plain, if_none_match=if_none_match)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """See ``Bucket.delete_many``; deleting a key object forgets its cached key."""
        for key in keys:
            tenant = _place(self.prefix, key)[0]
            if key == self.keys.key_object(tenant):
                self.keys.forget(tenant)
        await self.inner.delete_many(keys)

    # -- what MeteredBucket asks of a bucket that splits transfers -------------------------

    def upload_requests(self, size: int, *, conditional: bool) -> tuple[int, int]:
        """The wrapped bucket's requests for an upload of ``size`` bytes (see MeteredBucket)."""
        split = getattr(self.inner, "upload_requests", None)
        result: tuple[int, int] = split(size, conditional=conditional) if split else (1, 0)
        return result

    def download_requests(self, size: int) -> int:
        """The wrapped bucket's requests for a download of ``size`` bytes (see MeteredBucket)."""
        split = getattr(self.inner, "download_requests", None)
        result: int = split(size) if split else 1
        return result


def _lock_json(data: dict[str, Any]) -> bytes:
    """lock.json's bytes, as LockRecord.to_json writes them."""
    return json.dumps(data, sort_keys=True, indent=1).encode()


def _inline_keys(
    prefix: str, tenant: str, pointer: dict[str, Any], items: object
) -> list[tuple[tuple[str, int], bytes]] | None:
    """Each inline segment's (key, generation) and bytes; None if the pointer cannot say.

    They end at the pointer's ``tail``; each belongs to the last run starting at or before
    it (see ``LogPointer.generation_of``).
    """
    tail, runs = pointer.get("tail"), pointer.get("runs")
    if not (isinstance(items, list) and type(tail) is int and isinstance(runs, list)):
        return None
    if len(items) > _MAX_INLINE or len(runs) > _MAX_RUNS:
        return None
    if not all(
        isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) for r in runs
    ):
        return None
    firsts = [first for _, first in runs]
    if firsts != sorted(firsts):
        return None
    placed = []
    for index, item in enumerate(items, tail - len(items) + 1):
        run = bisect.bisect_right(firsts, index) - 1
        if run < 0 or index < 1 or not isinstance(item, str):
            return None
        try:
            body = base64.b64decode(item.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return None
        generation = runs[run][0]
        key = f"{prefix}{tenant}/log/{generation:08d}/{index:012d}.seg"
        placed.append(((key, generation), body))
    return placed
