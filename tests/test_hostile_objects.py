"""Crafted objects in a serving tenant's bucket prefix: the holder keeps serving and shipping.

Each object is placed while a machine holds the lease; then its garbage collection (which
LISTs and parses everything under the prefix) runs, and the machine must either collect or
refuse with a typed error naming the key, and go on shipping: the log tail advances and a
restore gives every row. Never another exception, never a hang of the event loop.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tenantdb.errors import TenantDBError
from tenantdb.replication.pitr import restore_at
from tenantdb.storage.base import Bucket
from tests.replication.test_pitr import PREFIX, Recorder, machine, read_rows

ROOT = f"{PREFIX}acme/"


def takeover(generation: int, tail: int) -> bytes:
    return json.dumps(
        {
            "generation": generation,
            "owner": "\x1b]0;forged\x07",
            "region": "ams",
            "at": "2026-12-01T10:00:00.000+00:00",
            "tail": tail,
            "snapshot": None,
            "claim": "forged",
        }
    ).encode()


CRAFTED: dict[str, dict[str, bytes]] = {
    "snapshot key with a 15-digit time": {
        "snapshots/00000001-00000001-000000000001-999999999999999-ab.sqlite3": b"",
    },
    "takeover record of deep nesting": {"history/00000001.json": b"[" * 60_000},
    "takeover record with a huge tail, and a far segment key": {
        "history/00000001.json": takeover(1, 10**12),
        "log/00000001/000999999999.seg": b"",
    },
    "a far segment key alone": {"log/00000001/000999999999.seg": b""},
    "keys with absurd numbers and control characters": {
        "log/00000001/" + "9" * 40 + ".seg": b"",
        "snapshots/\x1b[2J-1.sqlite3": b"",
    },
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
async def test_a_holder_keeps_shipping_past_a_crafted_object(
    bucket: Bucket, tmp_path: Path, name: str
) -> None:
    recorder = Recorder(11)
    async with machine(bucket, tmp_path, "m1") as tdb:
        await recorder.changes(tdb, 2)
        for key, body in CRAFTED[name].items():
            await bucket.put(ROOT + key, body)
        shipper = tdb._shipper
        assert shipper is not None
        refused: TenantDBError | None = None
        try:
            # Bounded: a planning loop over indices from a field would hang here.
            await asyncio.wait_for(shipper.collect_garbage(), timeout=30)
        except TenantDBError as exc:
            refused = exc
        if refused is not None:  # a refusal names the object
            assert any(ROOT + key in str(refused) for key in CRAFTED[name])
        assert tdb.lease.record is not None
        assert tdb.lease.record.log is not None
        tail = tdb.lease.record.log.tail
        await recorder.changes(tdb, 2)
        assert tdb.lease.record.log.tail > tail  # still shipping
    out = tmp_path / "out.sqlite3"
    await restore_at(bucket, "acme", out, prefix=PREFIX)
    assert read_rows(out) == recorder.rows
