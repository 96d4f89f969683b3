"""lock.json parsed from anything: every field checked, every bound from the reader."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from dataclasses import replace
from typing import Any

import pytest

from tenantdb.errors import LockFileCorruptError
from tenantdb.protocol.carried import BLOCK_MAX_BYTES, CARRIED_MAX_BYTES, encode_block
from tenantdb.protocol.lockfile import MAX_LOG_SINGLES, LockRecord, SchemaVersion, SnapshotName

KEY = "tenants/acme/lock.json"
STATE = "0123456789abcdef"


def lock(**log: Any) -> dict[str, Any]:
    """A valid lock of generation 2 with a one-segment log, ``log`` fields overridden."""
    return {
        "format": 1,
        "tenant": "acme",
        "owner": "m1",
        "region": "ams",
        "last_owner": None,
        "claim": "c1",
        "generation": 2,
        "seq": 5,
        "ttl_seconds": 15,
        "snapshot": None,
        "log": {
            "base": 1,
            "tail": 1,
            "state": STATE,
            "db_pages": 2,
            "runs": [[2, 1]],
            "updated_at": "2026-12-01T10:00:00+00:00",
            "merged": [],
            "inline": [],
            **log,
        },
    }


def parse(data: dict[str, Any]) -> LockRecord:
    return LockRecord.parse(json.dumps(data).encode(), tenant="acme", key=KEY)


def refused(data: dict[str, Any] | bytes) -> LockFileCorruptError:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    with pytest.raises(LockFileCorruptError) as info:
        LockRecord.parse(body, tenant="acme", key=KEY)
    assert info.value.key == KEY
    assert KEY in str(info.value)
    return info.value


def test_a_valid_lock_parses() -> None:
    record = parse(lock())
    assert record.log is not None
    assert [c.first for c in record.log.chunks()] == [1]


def test_inline_segment_with_non_base64_is_a_typed_error_naming_the_key() -> None:
    # "é" is not ASCII: b64decode raises a plain ValueError, not binascii.Error.
    refused(lock(inline=["é"]))
    refused(lock(inline=["not base64!"]))


def block(*bodies: bytes) -> str:
    return base64.b64encode(encode_block(bodies)).decode()


def test_carried_segments_round_trip_as_one_compressed_block() -> None:
    record = parse(lock())
    assert record.log is not None
    similar = [b"segment %d of one page " % i + bytes(4000) for i in range(3)]
    carrying = replace(record, log=replace(record.log, tail=3).with_inline(similar))
    body = carrying.to_json()
    stored = json.loads(body)["log"]
    assert "inline" not in stored
    assert len(body) < len(similar[0])  # one stream: the three share their bytes
    again = LockRecord.parse(body, tenant="acme", key=KEY)
    assert again.log is not None
    assert [again.log.inline_segment(i) for i in (1, 2, 3)] == similar
    assert "carried" not in json.loads(record.to_json())["log"]  # nothing carried: no field


def test_a_lock_written_before_blocks_still_gives_its_inline_segments() -> None:
    items = [base64.b64encode(b"one").decode(), base64.b64encode(b"two").decode()]
    record = parse(lock(tail=2, inline=items))
    assert record.log is not None
    assert [record.log.inline_segment(i) for i in (1, 2)] == [b"one", b"two"]


def test_a_damaged_carried_block_is_a_typed_error_naming_the_key() -> None:
    stream = encode_block([b"one", b"two"])
    frames = struct.pack(">I", 3) + b"one"
    for carried in [
        "not base64!",
        base64.b64encode(b"not zlib").decode(),
        base64.b64encode(stream[:-2]).decode(),  # truncated
        base64.b64encode(stream + b"\0").decode(),  # followed by more
        base64.b64encode(zlib.compress(frames + struct.pack(">I", 9) + b"short")).decode(),
        base64.b64encode(zlib.compress(frames + struct.pack(">I", 0))).decode(),  # empty one
        base64.b64encode(zlib.compress(frames + b"\0\0")).decode(),  # a cut length
        base64.b64encode(zlib.compress(b"")).decode(),  # no segment
        block(b"one", b"two", b"three"),  # more segments than the log's 2 singles
        "A" * (BLOCK_MAX_BYTES * 4 // 3 + 8),  # longer than any block
        7,
    ]:
        data = lock(tail=2, carried=carried)
        del data["log"]["inline"]
        refused(data)
    refused(lock(tail=2, carried=block(b"one", b"two")))  # beside an inline list: which?


def test_a_carried_block_inflating_past_the_carried_bound_is_refused() -> None:
    # Each segment within its frame, the whole past CARRIED_MAX_BYTES: 3 KiB compressed.
    big = [bytes(CARRIED_MAX_BYTES // 2 + 1)] * 2
    data = lock(tail=2, carried=block(*big))
    del data["log"]["inline"]
    assert len(data["log"]["carried"]) < 4096
    refused(data)
    data["log"]["carried"] = block(*[bytes(CARRIED_MAX_BYTES // 2 - 4)] * 2)
    record = parse(data)  # at the bound: read
    assert record.log is not None
    assert record.log.inline_segment(2) == bytes(CARRIED_MAX_BYTES // 2 - 4)


def test_lock_tail_beyond_bound_is_refused() -> None:
    refused(lock(tail=10**9))
    refused(lock(tail=MAX_LOG_SINGLES + 1))
    # At the bound, the chunks are generated without trouble.
    record = parse(lock(tail=MAX_LOG_SINGLES))
    assert record.log is not None
    assert len(record.log.chunks()) == MAX_LOG_SINGLES


@pytest.mark.parametrize(
    "when", ["yesterday", "2026-12-01 10:00", "2026-12-01T10:00:00", "99999-01-01T00:00:00+00:00"]
)
def test_free_form_times_are_refused(when: str) -> None:
    refused(lock(updated_at=when))
    snapshot = {
        "key": "tenants/acme/snapshots/00000002-00000001.sqlite3",
        "sha256": "0" * 64,
        "size": 8192,
        "published_at": when,
    }
    refused({**lock(), "snapshot": snapshot})


@pytest.mark.parametrize("field", ["owner", "region", "last_owner", "claim"])
def test_names_with_control_characters_are_refused(field: str) -> None:
    refused({**lock(), field: "m1\x1b]0;pwned\x07"})
    refused({**lock(), field: "m" * 5000})


def test_huge_numbers_are_refused() -> None:
    refused({**lock(), "generation": 10**400})
    refused(lock(db_pages=2**32))
    refused({**lock(), "ttl_seconds": 1e308})


def test_deep_nesting_is_refused_before_parsing() -> None:
    error = refused(b"[" * 60_000 + b"]" * 60_000)
    assert "nested" in str(error)


def test_a_snapshot_key_with_a_time_past_the_year_9000_is_not_tenantdbs() -> None:
    assert SnapshotName.parse("s/00000001-00000001-000000000001-999999999999999-ab.sqlite3") is None
    name = SnapshotName.parse("s/00000001-00000001-000000000001-1764583200000-ab.sqlite3")
    assert name is not None
    assert name.taken_ms == 1764583200000


def released(reason: object) -> dict[str, Any]:
    return {**lock(), "owner": None, "claim": None, "last_owner": "m1", "released": reason}


def test_an_idle_release_round_trips_and_an_older_lock_without_the_field_says_nothing() -> None:
    record = parse(released("idle"))
    assert (record.owner, record.released) == (None, "idle")
    assert LockRecord.parse(record.to_json(), tenant="acme", key=KEY) == record
    assert parse(lock()).released is None  # written before release reasons existed


@pytest.mark.parametrize("reason", ["sleepy", "", 1, True, ["idle"], {"idle": 1}])
def test_an_unknown_release_reason_is_refused(reason: object) -> None:
    assert "released" in refused(released(reason)).reason


def test_a_release_reason_on_a_held_lease_is_refused() -> None:
    # "idle" with an owner would make standbys stop while a holder serves.
    assert "held lease" in refused({**lock(), "released": "idle"}).reason


SCHEMA = {"version": 3, "hash": "0123456789abcdef"}


def test_a_schema_round_trips_and_an_older_lock_without_it_is_unknown() -> None:
    record = parse({**lock(), "schema": SCHEMA})
    assert record.schema == SchemaVersion(3, "0123456789abcdef")
    assert LockRecord.parse(record.to_json(), tenant="acme", key=KEY) == record
    assert parse(lock()).schema is None  # written before schemas were recorded
    assert parse({**lock(), "schema": None}).schema is None


@pytest.mark.parametrize(
    "schema",
    [
        {"version": -1, "hash": "0123456789abcdef"},
        {"version": True, "hash": "0123456789abcdef"},
        {"version": 2**53, "hash": "0123456789abcdef"},
        {"version": "3", "hash": "0123456789abcdef"},
        {"version": 3, "hash": "0123456789ABCDEF"},
        {"version": 3, "hash": "0123456789abcde"},
        {"version": 3, "hash": "é" * 16},
        {"version": 3},
        {"version": 3, "hash": "0123456789abcdef", "extra": 1},
        [3, "0123456789abcdef"],
        3,
    ],
)
def test_a_damaged_schema_is_a_typed_error_naming_the_field(schema: object) -> None:
    assert "'schema'" in refused({**lock(), "schema": schema}).reason


def test_packs_round_trip_and_name_the_pack_of_each_segment() -> None:
    record = parse(lock(tail=6, runs=[[1, 1], [2, 4]], packs=[[1, 3, 1], [4, 5, 2]]))
    assert record.log is not None
    assert parse(json.loads(record.to_json())) == record
    assert [(c.last, c.generation, c.pack) for c in record.log.chunks()] == [
        (1, 1, (1, 3)),
        (2, 1, (1, 3)),
        (3, 1, (1, 3)),
        (4, 2, (4, 5)),
        (5, 2, (4, 5)),
        (6, 2, None),
    ]
    assert record.log.objects() == 3


def test_an_older_lock_without_packs_reads_every_single_segment_from_its_own_object() -> None:
    data = lock(tail=3)
    del data["log"]["inline"]
    record = parse(data)
    assert record.log is not None
    assert record.log.packs == ()
    assert all(c.pack is None for c in record.log.chunks())


@pytest.mark.parametrize(
    "packs",
    [
        "1-3",
        [[1, 3]],
        [[1, 3, 2, 0]],
        [[0, 3, 2]],
        [[3, 1, 2]],
        [[1, 7, 2]],  # past the tail
        [[1, 3, 1]],  # not the generation that wrote them
        [[1, 3, 3]],  # a generation newer than the lock's
        [[1, 3, 2], [3, 4, 2]],  # overlapping
        [[4, 5, 2], [1, 3, 2]],  # out of order
        [[1, 6, 2]],  # includes a segment carried inline
        [[1, 300, 2]],  # more segments than any pack holds
        [[True, 3, 2]],
        [[1, 3, 2]] * 1001,
    ],
)
def test_a_malformed_packs_list_is_a_typed_error_naming_the_key(packs: object) -> None:
    inline = "AAAA"  # segment 6 carried (the shape is all the lock checks)
    tail = 400 if packs == [[1, 300, 2]] else 6
    refused(lock(tail=tail, runs=[[2, 1]], packs=packs, inline=[inline]))


def test_a_merge_drops_the_packs_it_covers() -> None:
    record = parse(lock(tail=6, runs=[[2, 1]], packs=[[1, 3, 2], [4, 5, 2]]))
    assert record.log is not None
    merged = record.log.with_merged(1, 3, 2)
    assert merged.packs == ((4, 5, 2),)
    again = parse(json.loads(replace(record, log=merged).to_json()))
    assert again.log == merged
