"""ObjectInfo.server_age: the age of an object on the server's clock alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tenantdb.storage import ObjectInfo

WRITTEN = datetime(2020, 1, 1, 12, 0, 0, tzinfo=UTC)


def info(server_date: datetime | None) -> ObjectInfo:
    return ObjectInfo(key="k", etag='"e"', size=1, last_modified=WRITTEN, server_date=server_date)


def test_ages_with_a_server_date() -> None:
    dated = info(WRITTEN + timedelta(seconds=7))
    assert dated.server_age == 7.0


def test_server_age_is_none_without_a_server_date() -> None:
    undated = info(None)
    assert undated.server_age is None
