"""The HTTP clients of routing and tail hints are made at their first request, not at startup."""

from __future__ import annotations

import pytest

from tenantdb.routing.proxy import LazyClient


async def test_an_opened_client_is_made_only_when_first_used_and_then_kept() -> None:
    lazy = LazyClient("Owner", trust_env=False)
    lazy.open()
    assert lazy._client is None  # opening made nothing (no CA certificates loaded)
    client = lazy.get()
    assert lazy.get() is client
    await lazy.aclose()
    assert client.is_closed
    assert not lazy.is_open


async def test_a_client_is_refused_before_its_owner_opens_or_after_it_closed() -> None:
    lazy = LazyClient("Owner")
    with pytest.raises(RuntimeError, match="use Owner in 'async with'"):
        lazy.get()
    lazy.open()
    with pytest.raises(RuntimeError, match="Owner is already open"):
        lazy.open()
    await lazy.aclose()  # never used: nothing to close
    with pytest.raises(RuntimeError, match="use Owner in 'async with'"):
        lazy.get()
