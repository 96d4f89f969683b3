"""Fly Machines as values: which ids tenantdb accepts."""

from __future__ import annotations

import pytest

from tenantdb.routing.machines import validate_machine_id


def test_validate_machine_id() -> None:
    assert validate_machine_id("3d8d413b29d089") == "3d8d413b29d089"
    for bad in ["", "3D8D", "a.b", "a/b", "-ab", "x" * 64]:
        with pytest.raises(ValueError, match="machine id"):
            validate_machine_id(bad)
