"""Encryption at rest: the key-encryption keys, wrapped data keys and the sealed format.

The only module that imports ``cryptography``. Everything is AES-256-GCM:

- a **keyring** of key-encryption keys (KEKs) from ``TENANTDB_ENCRYPTION_KEY``: the first
  wraps, every one unwraps (rotation);
- random **data keys** per tenant, numbered from 1 (a replacement adds the next; the
  newest seals, every one opens), each wrapped by a KEK with associated data naming the
  tenant, the key object, the KEK's id and the data key's number (``wrap_data_key`` /
  ``unwrap_data_key``);
- the **sealed format** of an object's body: a 31-byte header, then the plaintext in
  fixed-size chunks of ``CHUNK_SIZE`` bytes, each followed by its 16-byte tag. A plaintext
  byte range therefore maps to a ciphertext range of whole chunks (``sealed_range``), and a
  file is sealed or opened one chunk at a time with bounded memory.

Every chunk's associated data binds the tenant, the object's key, its generation, the
header (so the length and nonce), the chunk's number and whether it is the last: an object
moved to another key or tenant, cut short, extended or reordered fails authentication.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tenantdb.errors import ConfigurationError

__all__ = [
    "CHUNK_SIZE",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "MAX_KEY_NUMBER",
    "DataKey",
    "Keyring",
    "Kind",
    "ObjectContext",
    "Refused",
    "WrappedKey",
    "is_sealed",
    "open_bytes",
    "open_file_in_place",
    "opened_size",
    "parse_keyring",
    "rewrap_data_key",
    "seal_bytes",
    "seal_file",
    "sealed_key_number",
    "sealed_range",
    "sealed_size",
    "unwrap_data_key",
    "wrap_data_key",
]

KEY_SIZE = 32
MAGIC = b"TDBENC\r\n"
_VERSION = 1
# magic, version, kind, data key number, log2(chunk size), nonce prefix, plaintext length.
# 31 bytes: odd, so a sealed snapshot's size is odd and a SQLite file's (whole pages) even.
_HEADER = struct.Struct(">8sBBIB8sQ")
HEADER_SIZE = _HEADER.size
_TAG = 16
_CHUNK_SHIFT = 18
CHUNK_SIZE = 1 << _CHUNK_SHIFT  # 256 KiB: one AEAD call's cost is noise next to its bytes
# A 4-byte chunk counter in the nonce: 2^32 chunks of 256 KiB (1 PiB) per object at most.
_MAX_PLAINTEXT = (1 << 32) * CHUNK_SIZE
_KINDS = {"segment": 1, "snapshot": 2}
Kind = Literal["segment", "snapshot"]
# A data key's number is 4 bytes of the header: 1 for a tenant's first, each replacement's next.
MAX_KEY_NUMBER = (1 << 32) - 1
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_WRAP_NONCE = 12
_WRAPPED_SIZE = _WRAP_NONCE + KEY_SIZE + _TAG


class Refused(ValueError):
    """Bytes that do not open: damaged, moved or sealed with another key (``reason``)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, repr=False)
class _Kek:
    id: str
    aead: AESGCM = field(compare=False)


class Keyring:
    """The key-encryption keys, newest (the one that wraps) first. Its repr shows ids only."""

    __slots__ = ("_keks",)

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._keks = tuple(_Kek(kid, AESGCM(key)) for kid, key in keys)

    @property
    def ids(self) -> tuple[str, ...]:
        """The key ids, the wrapping one first."""
        return tuple(k.id for k in self._keks)

    @property
    def wrapping_id(self) -> str:
        """The id of the key new data keys are wrapped with."""
        return self._keks[0].id

    def _kek(self, kid: str) -> _Kek | None:
        return next((k for k in self._keks if k.id == kid), None)

    def __repr__(self) -> str:
        return f"Keyring(ids={self.ids!r})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Keyring cannot be pickled: that would write its keys out")

    def __copy__(self) -> Keyring:
        return self  # immutable: copies (dataclasses.asdict, replace) share it

    def __deepcopy__(self, memo: dict[int, object]) -> Keyring:
        return self


def parse_keyring(text: str, *, variable: str) -> Keyring:
    """Parse ``id:base64,id:base64`` (or one bare base64 key, id ``default``) into a Keyring.

    Commas, spaces and newlines separate keys; the first wraps. Errors name ``variable`` and
    the key's position or id, never a key's bytes.
    """
    items = [item for item in re.split(r"[\s,]+", text.strip()) if item]
    if not items:
        raise ConfigurationError(f"{variable} is empty: no encryption key", variable=variable)
    keys: list[tuple[str, bytes]] = []
    for position, item in enumerate(items, 1):
        kid, sep, encoded = item.partition(":")
        if not sep:
            kid, encoded = "default", item
        if not _KEY_ID.fullmatch(kid):
            raise ConfigurationError(
                f"{variable}: key {position} has an id that is not 1 to 32 letters, digits, "
                "'.', '_' or '-' (expected id:base64,id:base64)",
                variable=variable,
            )
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_SIZE:
            raise ConfigurationError(
                f"{variable}: key {kid!r} is not the base64 of {KEY_SIZE} bytes "
                "(make one with: openssl rand -base64 32)",
                variable=variable,
            )
        if any(kid == known for known, _ in keys):
            raise ConfigurationError(f"{variable}: key id {kid!r} appears twice", variable=variable)
        keys.append((kid, key))
    return Keyring(keys)


# -- data keys ------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class DataKey:
    """A tenant's unwrapped data key number ``number``, ready to seal and open its objects.

    ``nonce_key`` (derived from it) makes a segment's nonce from its content and place, so
    the same segment for the same key seals to the same bytes (see ``seal_bytes``). Sealed
    objects name ``number`` in their header, so a reader knows which key opens them.
    """

    tenant: str
    number: int
    aead: AESGCM = field(compare=False)
    nonce_key: bytes = field(compare=False)

    @classmethod
    def of(cls, tenant: str, raw: bytes, number: int = 1) -> DataKey:
        """The data key ``raw`` (32 bytes) of ``tenant``, its number ``number``."""
        nonce_key = hmac.new(raw, b"tenantdb/nonce/1", "sha256").digest()
        return cls(tenant, number, AESGCM(raw), nonce_key)

    def __repr__(self) -> str:
        return f"DataKey(tenant={self.tenant!r}, number={self.number})"


@dataclass(frozen=True)
class WrappedKey:
    """A data key as its key object stores it: which KEK wrapped it, and the wrapped bytes.

    ``since`` is when the tenant's first data key was first stored (ISO 8601), or "" for the
    key object's own Last-Modified: a rotation rewrites the object and keeps the first time
    here. It and ``number`` are authenticated with the wrapped key.
    """

    kek_id: str
    wrapped: bytes = field(repr=False)
    since: str = ""
    number: int = 1


def _wrap_aad(tenant: str, key: str, kek_id: str, since: str, number: int) -> bytes:
    # Data key 1's associated data is as it was before keys had numbers: its key objects stay.
    numbered = _fields(str(number)) if number != 1 else b""
    return b"tenantdb/data-key/1\0" + _fields(tenant, key, kek_id, since) + numbered


def _wrap(
    keyring: Keyring, tenant: str, key: str, raw: bytes, since: str, number: int
) -> WrappedKey:
    kek = keyring._keks[0]
    nonce = os.urandom(_WRAP_NONCE)
    sealed = kek.aead.encrypt(nonce, raw, _wrap_aad(tenant, key, kek.id, since, number))
    return WrappedKey(kek.id, nonce + sealed, since, number)


def wrap_data_key(
    keyring: Keyring, tenant: str, key: str, *, number: int = 1, since: str = ""
) -> tuple[DataKey, WrappedKey]:
    """A new random data key ``number`` for ``tenant``, and its wrapping under the newest KEK."""
    if not 1 <= number <= MAX_KEY_NUMBER:
        raise ValueError(f"data key number {number} is out of range")
    raw = os.urandom(KEY_SIZE)
    return DataKey.of(tenant, raw, number), _wrap(keyring, tenant, key, raw, since, number)


def _unwrap_raw(keyring: Keyring, tenant: str, key: str, wrapped: WrappedKey) -> bytes:
    kek = keyring._kek(wrapped.kek_id)
    if kek is None:
        raise Refused(f"it is wrapped by key id {wrapped.kek_id!r}, which is not configured")
    if len(wrapped.wrapped) != _WRAPPED_SIZE:
        raise Refused(f"the wrapped key is {len(wrapped.wrapped)} bytes, not {_WRAPPED_SIZE}")
    nonce, sealed = wrapped.wrapped[:_WRAP_NONCE], wrapped.wrapped[_WRAP_NONCE:]
    aad = _wrap_aad(tenant, key, kek.id, wrapped.since, wrapped.number)
    try:
        return kek.aead.decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise Refused(
            f"it does not open with key id {wrapped.kek_id!r}: a wrong key under that id, or "
            "a key object damaged or moved from another tenant"
        ) from None


def unwrap_data_key(keyring: Keyring, tenant: str, key: str, wrapped: WrappedKey) -> DataKey:
    """Open a wrapped data key; ``Refused`` if no KEK of the keyring opens it for this place."""
    return DataKey.of(tenant, _unwrap_raw(keyring, tenant, key, wrapped), wrapped.number)


def rewrap_data_key(
    keyring: Keyring, tenant: str, key: str, wrapped: WrappedKey, *, since: str
) -> WrappedKey:
    """The same data key wrapped under the keyring's newest KEK, first stored at ``since``."""
    raw = _unwrap_raw(keyring, tenant, key, wrapped)
    return _wrap(keyring, tenant, key, raw, since, wrapped.number)


# -- the sealed format ----------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectContext:
    """Where a sealed body belongs: bound into every chunk, so it opens nowhere else."""

    tenant: str
    key: str
    generation: int
    kind: Kind


def _fields(*texts: str) -> bytes:
    out = bytearray()
    for text in texts:
        data = text.encode()
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


def _aad_prefix(ctx: ObjectContext, header: bytes) -> bytes:
    return (
        b"tenantdb/object/1\0"
        + _fields(ctx.tenant, ctx.key)
        + struct.pack(">Q", ctx.generation)
        + header
    )


def _chunks(length: int) -> int:
    """Chunks of a plaintext of ``length`` bytes: an empty one still has one (its tag)."""
    return max(1, -(-length // CHUNK_SIZE))


def sealed_size(length: int) -> int:
    """The size of the sealed object of a plaintext of ``length`` bytes."""
    return HEADER_SIZE + length + _TAG * _chunks(length)


def opened_size(size: int) -> int | None:
    """The plaintext length a sealed object of ``size`` bytes has; None if no length fits."""
    body = size - HEADER_SIZE
    if body < _TAG:
        return None
    length = body - _TAG * -(-body // (CHUNK_SIZE + _TAG))
    return length if length >= 0 and sealed_size(length) == size else None


def sealed_range(start: int, end: int) -> tuple[int, int]:
    """The sealed byte range [start, end) that holds plaintext bytes [start, end): whole chunks."""
    first, last = start // CHUNK_SIZE, max(start, end - 1) // CHUNK_SIZE
    return (
        HEADER_SIZE + first * (CHUNK_SIZE + _TAG),
        HEADER_SIZE + (last + 1) * (CHUNK_SIZE + _TAG),
    )


def is_sealed(prefix: bytes) -> bool:
    """Whether bytes starting with ``prefix`` (at least 8 of them) are in the sealed format."""
    return prefix[: len(MAGIC)] == MAGIC


def sealed_key_number(header: bytes) -> int:
    """The number of the data key that sealed an object starting with ``header``.

    ``Refused`` if it is shorter than a header: what opens it must first know which key.
    """
    if len(header) < HEADER_SIZE:
        raise Refused(f"{len(header)} bytes is too short to be sealed")
    number: int = _HEADER.unpack(header[:HEADER_SIZE])[3]
    return number


def _new_header(key: DataKey, ctx: ObjectContext, length: int, nonce_prefix: bytes) -> bytes:
    if length > _MAX_PLAINTEXT:
        raise ValueError(f"{ctx.key}: {length} bytes is more than one object can seal")
    return _HEADER.pack(
        MAGIC, _VERSION, _KINDS[ctx.kind], key.number, _CHUNK_SHIFT, nonce_prefix, length
    )


def _read_header(key: DataKey, ctx: ObjectContext, header: bytes, size: int) -> tuple[bytes, int]:
    """Check a header against the object's size, context and ``key``: (nonce prefix, length)."""
    if size < HEADER_SIZE + _TAG:
        raise Refused(f"{size} bytes is too short to be sealed")
    magic, version, kind, number, shift, prefix, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise Refused("not in the sealed format")
    if version != _VERSION:
        raise Refused(f"sealed format version {version} is unknown")
    if kind != _KINDS[ctx.kind]:
        raise Refused(f"it is not a sealed {ctx.kind}")
    if number != key.number:
        raise Refused(f"it is sealed with data key {number}, not {key.number}")
    if shift != _CHUNK_SHIFT:
        raise Refused(f"chunk size 2^{shift} is not {CHUNK_SIZE}")
    if length > _MAX_PLAINTEXT or sealed_size(length) != size:
        raise Refused(f"{size} bytes do not hold the {length} its header says (truncated?)")
    return prefix, length


def _chunk_aad(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack(">I?", index, final)


def _nonce(nonce_prefix: bytes, index: int) -> bytes:
    return nonce_prefix + struct.pack(">I", index)


def _synthetic_nonce(key: DataKey, ctx: ObjectContext, plaintext: bytes) -> bytes:
    """A keyed hash of the place and the content: a nonce prefix only they repeat.

    The same bytes sealed twice for the same key come out the same (a retried upload, or a
    segment a new holder uploads from lock.json, equals what was carried). Different bytes
    get prefixes as unlikely to collide as random ones (2^-64 a pair).
    """
    # HMAC-SHA256: twice as fast as BLAKE2b where SHA has CPU instructions (x86, ARM).
    mac = hmac.new(key.nonce_key, digestmod="sha256")
    mac.update(_fields(ctx.tenant, ctx.key, ctx.kind) + struct.pack(">Q", ctx.generation))
    mac.update(plaintext)
    return mac.digest()[:8]


def seal_bytes(key: DataKey, ctx: ObjectContext, plaintext: bytes) -> bytes:
    """``plaintext`` sealed for ``ctx``: the same bytes for the same plaintext and place."""
    nonce_prefix = _synthetic_nonce(key, ctx, plaintext)
    header = _new_header(key, ctx, len(plaintext), nonce_prefix)
    prefix = _aad_prefix(ctx, header)
    count = _chunks(len(plaintext))
    view = memoryview(plaintext)
    out = [header]
    for index in range(count):
        chunk = view[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]
        aad = _chunk_aad(prefix, index, index == count - 1)
        out.append(key.aead.encrypt(_nonce(nonce_prefix, index), chunk, aad))
    return b"".join(out)


def _open_chunk(
    key: DataKey, prefix: bytes, nonce_prefix: bytes, index: int, final: bool, sealed: bytes
) -> bytes:
    try:
        return key.aead.decrypt(
            _nonce(nonce_prefix, index), sealed, _chunk_aad(prefix, index, final)
        )
    except InvalidTag:
        raise Refused(
            f"chunk {index} fails authentication: damaged, or sealed for another key, tenant "
            "or data key"
        ) from None


def open_bytes(key: DataKey, ctx: ObjectContext, sealed: bytes) -> bytes:
    """The plaintext of a sealed body; ``Refused`` unless it is whole and was sealed for ``ctx``."""
    nonce_prefix, length = _read_header(key, ctx, sealed[:HEADER_SIZE], len(sealed))
    prefix = _aad_prefix(ctx, sealed[:HEADER_SIZE])
    count = _chunks(length)
    out = []
    for index in range(count):
        start = HEADER_SIZE + index * (CHUNK_SIZE + _TAG)
        chunk = sealed[start : start + CHUNK_SIZE + _TAG]
        out.append(_open_chunk(key, prefix, nonce_prefix, index, index == count - 1, chunk))
    return b"".join(out)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            yield chunk


def seal_file(key: DataKey, ctx: ObjectContext, src: Path, dest: Path) -> None:
    """Seal ``src`` into ``dest`` one chunk at a time (blocking; run it in a thread)."""
    length = src.stat().st_size
    # A file is read once: its nonce prefix is random (a snapshot's key is never reused).
    nonce_prefix = os.urandom(8)
    header = _new_header(key, ctx, length, nonce_prefix)
    prefix = _aad_prefix(ctx, header)
    count = _chunks(length)
    with open(dest, "wb") as out:
        out.write(header)
        chunks = _file_chunks(src)
        for index in range(count):
            chunk = next(chunks, b"")
            aad = _chunk_aad(prefix, index, index == count - 1)
            out.write(key.aead.encrypt(_nonce(nonce_prefix, index), chunk, aad))
    if dest.stat().st_size != sealed_size(length):
        raise Refused(f"{src} changed size while being sealed")


def open_file_in_place(key: DataKey, ctx: ObjectContext, path: Path) -> int:
    """Replace the sealed ``path`` by its plaintext, chunk by chunk; return its length.

    Chunk ``i``'s plaintext goes to ``i * CHUNK_SIZE``, before its sealed bytes at
    ``HEADER_SIZE + i * (CHUNK_SIZE + 16)``: writing never overtakes reading. On ``Refused``
    the file is left half-opened: the caller discards it.
    """
    size = path.stat().st_size
    with open(path, "r+b") as f:
        header = f.read(HEADER_SIZE)
        nonce_prefix, length = _read_header(key, ctx, header, size)
        prefix = _aad_prefix(ctx, header)
        count = _chunks(length)
        for index in range(count):
            f.seek(HEADER_SIZE + index * (CHUNK_SIZE + _TAG))
            sealed = f.read(CHUNK_SIZE + _TAG)
            plain = _open_chunk(key, prefix, nonce_prefix, index, index == count - 1, sealed)
            f.seek(index * CHUNK_SIZE)
            f.write(plain)
        f.truncate(length)
    return length
