"""How a request says it arrived: the ``fly-replay-src`` header Fly adds to a replayed one."""

from __future__ import annotations

from tenantdb.routing.arrival import ReplaySource


def test_replay_src_is_parsed() -> None:
    source = ReplaySource.parse("instance=e784079b449483;region=ams;t=1700000000123456;state=x=y")
    assert source == ReplaySource("e784079b449483", "ams", 1700000000123456, "x=y")
    assert ReplaySource.parse("region=ams; instance=m1") == ReplaySource("m1", "ams")
    assert ReplaySource.parse("instance=m1;t=soon") == ReplaySource("m1")
    assert ReplaySource.parse("instance=M1") is None
    assert ReplaySource.parse("") is None
    # The comma form names the same fields.
    assert ReplaySource.parse("instance=m1,region=ams,t=5") == ReplaySource("m1", "ams", 5)
