"""What another machine would get from the bucket, for tests to compare with."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

from tenantdb.protocol.lease import Lease
from tenantdb.replication.restore import restore_database
from tenantdb.storage import Bucket


async def query_restored(
    bucket: Bucket, work_dir: Path, sql: str, *, tenant: str = "acme"
) -> list[tuple[Any, ...]]:
    """Restore the tenant from the bucket (snapshot + log, verified) and run ``sql`` on it."""
    observed = await Lease(bucket, tenant, machine_id="reader", region="x", ttl=3).read()
    if observed is None:
        raise AssertionError(f"the bucket has no lock.json for {tenant}")
    target = work_dir / f"restored-{uuid.uuid4().hex[:8]}" / f"{tenant}.sqlite3"
    target.parent.mkdir(parents=True)
    await restore_database(bucket, observed.record, target, prefix="tenants/")
    conn = sqlite3.connect(target)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()
