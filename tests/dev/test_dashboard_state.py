"""What the dev dashboard's ``/_dev/state`` shows of a lock.json, whatever the file holds."""

from __future__ import annotations

import json
from typing import Any

from tenantdb.dev.dashboard import _read_lock
from tenantdb.storage.base import Bucket

KEY = "tenants/acme/lock.json"


def lock(updated_at: str) -> bytes:
    data: dict[str, Any] = {
        "format": 1,
        "tenant": "acme",
        "owner": "m1",
        "region": "ams",
        "last_owner": None,
        "generation": 1,
        "seq": 2,
        "ttl_seconds": 3,
        "snapshot": None,
        "log": {
            "base": 1,
            "tail": 0,
            "state": "0" * 16,
            "db_pages": 0,
            "runs": [],
            "updated_at": updated_at,
        },
    }
    return json.dumps(data).encode()


async def test_dev_state_shows_a_lock_with_free_form_times_as_an_error(bucket: Bucket) -> None:
    await bucket.put(KEY, lock("last tuesday"))
    state = await _read_lock(bucket, KEY, "acme")  # a ValueError (a 500) before
    assert KEY in state["error"]
    await bucket.put(KEY, lock("2026-12-01T10:00:00+00:00"))
    state = await _read_lock(bucket, KEY, "acme")
    assert state["lock"]["log_age"] > 0
