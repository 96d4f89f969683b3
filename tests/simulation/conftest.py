"""The simulation's files live on a RAM disk when there is one: its SQLite files and
restores fsync often, and a disk's fsyncs cost more wall time than the simulation."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.simulation.__main__ import SCRATCH


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A fresh directory for one test, on the RAM disk if there is one."""
    root = Path(tempfile.mkdtemp(prefix="tenantdb-sim-test-", dir=SCRATCH))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
