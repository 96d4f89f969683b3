"""Fuzz targets, one per parser of bucket objects: any bytes give a typed value or a typed
error naming the key, within a memory and time bound (``bounded``).

They run in the normal test run with a bounded number of examples (the whole file in a few
seconds); set ``TENANTDB_FUZZ_EXAMPLES`` (120 by default) for a longer search.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tenantdb.errors import LockFileCorruptError, ReplicationError, SnapshotError, TenantDBError
from tenantdb.parsing import time_of_ms
from tenantdb.protocol.carried import encode_block
from tenantdb.protocol.lockfile import LockRecord, SnapshotName
from tenantdb.protocol.snapshot import verify_database
from tenantdb.replication.checksum import PageHashes, database_page_size
from tenantdb.replication.segment import SEGMENT_MAGIC, decode_segment, parse_chunk_key
from tenantdb.replication.takeovers import Takeover, takeover_key

T = TypeVar("T")
MiB = 1 << 20
# Per call: generous for a shared CI machine under tracemalloc, far below any bomb's cost.
MAX_MIB = 16
MAX_MS = 1000

FUZZ = settings(
    max_examples=int(os.environ.get("TENANTDB_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)

LOCK_KEY = "tenants/acme/lock.json"
TAKEOVER_KEY = takeover_key("tenants/", "acme", 2)
SEGMENT_KEY = "tenants/acme/log/00000001/000000000002.seg"


def bounded(call: Callable[[], T]) -> T | TenantDBError:
    """``call()``'s value or its ``TenantDBError``, checked to stay within MAX_MIB and MAX_MS."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result: T | TenantDBError = call()
    except TenantDBError as exc:
        result = exc
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_MIB * MiB, f"{peak / MiB:.1f} MiB"
    assert elapsed_ms < MAX_MS, f"{elapsed_ms:.0f} ms"
    return result


# -- values: non-ASCII, control characters, huge numbers, deep nesting ---------------------

texts = st.text(max_size=30) | st.sampled_from(["é", "\x1b[2J", "", "2026-12-01 10:00", "NaN"])
numbers = st.integers() | st.sampled_from([2**32 - 1, 2**53, 2**64, 10**12, 10**400, -1, 0])
scalars = st.none() | st.booleans() | numbers | st.floats() | texts
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)
deep = st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * (n % 3))

VALID_LOCK: dict[str, Any] = {
    "format": 1,
    "tenant": "acme",
    "owner": "m1",
    "region": "ams",
    "last_owner": None,
    "claim": "c1",
    "generation": 2,
    "seq": 5,
    "ttl_seconds": 15,
    "snapshot": {
        "key": "tenants/acme/snapshots/00000002-00000001-000000000001-1764583200000-ab.sqlite3",
        "sha256": "0" * 64,
        "size": 8192,
        "published_at": "2026-12-01T10:00:00+00:00",
    },
    "log": {
        "base": 1,
        "tail": 2,
        "state": "0123456789abcdef",
        "db_pages": 2,
        "runs": [[1, 1], [2, 2]],
        "updated_at": "2026-12-01T10:00:00+00:00",
        "merged": [],
        "inline": [base64.b64encode(b"x").decode()],
    },
    "schema": {"version": 2, "hash": "0123456789abcdef"},
}


# The log as written since carried blocks: segment 2 in a block.
CARRYING_LOG = {
    **{k: v for k, v in VALID_LOCK["log"].items() if k != "inline"},
    "carried": base64.b64encode(encode_block([b"x"])).decode(),
}
# 20 KiB of a zlib stream that would inflate to 16 MiB of zeros.
BLOCK_BOMB = base64.b64encode(zlib.compress(bytes(16 << 20), 9)).decode()


@st.composite
def documents(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """``valid`` with one field (at any depth) replaced, removed or added; or raw bytes."""
    kind = draw(st.sampled_from(["set", "drop", "nested", "raw", "deep"]))
    data = json.loads(json.dumps(valid))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    if kind == "deep":
        return draw(deep)
    target = data
    if kind == "nested":
        nested = [k for k, v in data.items() if isinstance(v, dict)]
        if nested:
            target = data[draw(st.sampled_from(nested))]
    name = draw(st.sampled_from(sorted(target)))
    if kind == "drop":
        del target[name]
    else:
        target[name] = draw(values)
    return json.dumps(data).encode()


@FUZZ
@given(body=documents(VALID_LOCK))
@example(body=b"[" * 60_000)
@example(body=json.dumps({**VALID_LOCK, "log": {**VALID_LOCK["log"], "inline": ["é"]}}).encode())
@example(body=json.dumps({**VALID_LOCK, "log": {**VALID_LOCK["log"], "tail": 10**9}}).encode())
@example(body=json.dumps({**VALID_LOCK, "log": CARRYING_LOG}).encode())
@example(body=json.dumps({**VALID_LOCK, "log": {**CARRYING_LOG, "carried": BLOCK_BOMB}}).encode())
@example(body=json.dumps({**VALID_LOCK, "schema": {"version": 10**400, "hash": "0" * 16}}).encode())
@example(body=json.dumps({**VALID_LOCK, "schema": {"version": 1, "hash": "0" * 10**5}}).encode())
def test_lock_record(body: bytes) -> None:
    result = bounded(lambda: LockRecord.parse(body, tenant="acme", key=LOCK_KEY))
    if isinstance(result, TenantDBError):
        assert isinstance(result, LockFileCorruptError)
        assert result.key == LOCK_KEY
        return
    # Everything a reader then does with it is total as well.
    log = result.log
    if log is not None:
        chunks = bounded(log.chunks)
        assert not isinstance(chunks, TenantDBError)
        for index in range(log.inline_from, log.tail + 1):
            assert log.inline_segment(index) is not None
    assert LockRecord.parse(result.to_json(), tenant="acme", key=LOCK_KEY) == result


VALID_TAKEOVER: dict[str, Any] = {
    "generation": 2,
    "owner": "m2",
    "region": "ams",
    "at": "2026-12-01T10:00:00.000+00:00",
    "tail": 4,
    "snapshot": None,
    "claim": "c2",
}


@FUZZ
@given(body=documents(VALID_TAKEOVER))
@example(body=b"[" * 60_000)
@example(body=json.dumps({**VALID_TAKEOVER, "tail": 10**12}).encode())
def test_takeover_record(body: bytes) -> None:
    result = bounded(lambda: Takeover.parse(body, key=TAKEOVER_KEY))
    if isinstance(result, TenantDBError):
        assert isinstance(result, ReplicationError)
        assert result.key == TAKEOVER_KEY
        return
    assert result.generation == 2
    assert result.at.tzinfo is not None
    assert Takeover.parse(result.to_json(), key=TAKEOVER_KEY) == result


_HEADER = struct.Struct(">8sHHQQIIQQQIIH")


@st.composite
def segments(draw: st.DrawFn) -> bytes:
    """Segment bytes with any header field, a page area of any kind, and a valid trailer."""
    page_size = draw(st.sampled_from([512, 4096, 65536]) | st.integers(0, 2**32 - 1))
    db_pages = draw(st.integers(0, 2**32 - 1) | st.integers(0, 8))
    page_count = draw(st.integers(0, 2**32 - 1) | st.integers(0, 8))
    compressed = draw(st.booleans())
    area_kind = draw(st.sampled_from(["pages", "bytes", "zeros"]))
    if area_kind == "pages":
        size = page_size if page_size <= 65536 else 512
        numbers = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 8), max_size=4))
        area = b"".join(n.to_bytes(4, "big") + bytes(size) for n in numbers)
    elif area_kind == "zeros":
        area = bytes(draw(st.integers(0, 8 * MiB)))  # a bomb once compressed
    else:
        area = draw(st.binary(max_size=200))
    if compressed and draw(st.booleans()):
        area = zlib.compress(area, 9)
    tenant = draw(st.sampled_from([b"acme", "é".encode(), b"\xff", b""]))
    head = _HEADER.pack(
        SEGMENT_MAGIC,
        draw(st.sampled_from([1, 1, 2])),
        draw(st.sampled_from([0, 1, 2])) if compressed else 0,
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        page_size,
        db_pages,
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        page_count,
        draw(st.integers(0, 2**16 - 1)) if draw(st.booleans()) else len(tenant),
    )
    body = head + tenant + area
    trailer = hashlib.sha256(body).digest() if draw(st.booleans()) else draw(st.binary(max_size=32))
    return body + trailer


@FUZZ
@given(data=segments() | st.binary(max_size=300))
def test_segment_header_and_body(data: bytes) -> None:
    result = bounded(lambda: decode_segment(data, key=SEGMENT_KEY))
    if isinstance(result, TenantDBError):
        assert isinstance(result, ReplicationError)
        assert result.key == SEGMENT_KEY
        return
    # Applied to an empty database: applied or refused, never more memory than its pages.
    header = result.header
    hashes = PageHashes(header.page_size)
    applied = bounded(lambda: hashes.apply(dict(result.pages), header.db_pages))
    assert applied is None or isinstance(applied, ReplicationError)


@st.composite
def database_headers(draw: st.DrawFn) -> bytes:
    """The first bytes of a downloaded snapshot: a SQLite header with any page size field."""
    head = b"SQLite format 3\x00" + draw(st.integers(0, 2**16 - 1)).to_bytes(2, "big")
    return head + draw(st.binary(max_size=200))


@FUZZ
@given(data=database_headers() | st.binary(max_size=120))
def test_snapshot_header(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("snap") / "snapshot.sqlite3"
    path.write_bytes(data)
    size = bounded(lambda: database_page_size(path))
    assert isinstance(size, int | ReplicationError)
    checked = bounded(lambda: verify_database(path, key="tenants/acme/snapshots/x.sqlite3"))
    assert checked is None or isinstance(checked, SnapshotError)


digits = st.integers(0, 10**16).map(str) | st.text("0123456789", max_size=20)
key_names = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda g, s, b, t, r: f"tenants/acme/snapshots/{g}-{s}-{b}-{t}-{r}.sqlite3",
        digits,
        digits,
        digits,
        digits,
        st.text("0123456789abcdef", max_size=70),
    ),
    st.builds(
        lambda g, f, last: f"tenants/acme/log/{g}/{f}{last}.seg",
        digits,
        st.just("") | digits.map(lambda d: f"{d}-"),
        digits,
    ),
)


@FUZZ
@given(key=key_names)
@example(key="tenants/acme/snapshots/00000001-00000001-000000000001-999999999999999-ab.sqlite3")
@example(key="tenants/acme/log/00000001/000999999999.seg")
def test_key_names(key: str) -> None:
    name = bounded(lambda: SnapshotName.parse(key))
    if name is not None:
        assert isinstance(name, SnapshotName)
        assert name.generation >= 1
        if name.taken_ms is not None:
            time_of_ms(name.taken_ms)  # within datetime's range
    chunk = bounded(lambda: parse_chunk_key(key))
    if chunk is not None:
        assert not isinstance(chunk, TenantDBError)
        assert 1 <= chunk.first <= chunk.last
        assert chunk.generation >= 1


def test_the_bounds_catch_a_bomb(tmp_path: Path) -> None:
    """The harness can fail: an allocation past MAX_MIB is caught."""
    with pytest.raises(AssertionError, match="MiB"):
        bounded(lambda: bytearray(2 * MAX_MIB * MiB))
