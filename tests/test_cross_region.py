"""A machine in another region than the lease's last holder, on a bucket consistent only
per region, refuses to start instead of risking two holders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenantdb.config import BucketConsistency, Settings
from tenantdb.errors import CrossRegionLeaseError
from tenantdb.machine.database import TenantDB


def machine(
    tmp_path: Path, machine_id: str, region: str, consistency: BucketConsistency
) -> Settings:
    return Settings(
        tenant="acme",
        machine_id=machine_id,
        fly_region=region,
        data_dir=tmp_path / machine_id,
        local_bucket_dir=tmp_path / "bucket",
        bucket_consistency=consistency,
        metrics_port=0,
    )


async def test_a_machine_in_another_region_refuses_a_regional_buckets_lease(
    tmp_path: Path,
) -> None:
    async with TenantDB(machine(tmp_path, "m-ams", "ams", "regional")):
        pass  # takes the lease in ams, then releases it
    with pytest.raises(CrossRegionLeaseError, match="last held in region ams, not iad"):
        async with TenantDB(machine(tmp_path, "m-iad", "iad", "regional")):
            pass
    # Declared strongly consistent, the lease may move.
    async with TenantDB(machine(tmp_path, "m-iad", "iad", "strong")) as db:
        assert db.lease.record is not None
        assert db.lease.record.region == "iad"
