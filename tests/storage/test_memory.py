"""Transfers stream: a 256 MiB upload or download grows peak memory by < 64 MiB.

Each transfer runs in a fresh process (``tests.support.memory_probe``), which reads its own
``ru_maxrss`` after setup and after the transfer. The buckets use their production
defaults (16 MiB multipart threshold, 8 MiB parts and ranges, 4 in flight).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SIZE_MIB = 256
LIMIT_MIB = 64


def run_probe(direction: str, work: Path, env: dict[str, str], size_mib: int = SIZE_MIB) -> Any:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.memory_probe",
            direction,
            "--key",
            "snapshots/big.sqlite3",
            "--work",
            str(work),
            "--size-mib",
            str(size_mib),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{direction}: {figures}")  # shown with -s / -rA: the figures for the record
    return figures


@pytest.mark.long
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_large_transfers_have_bounded_memory(
    backend: str,
    tmp_path: Path,
    subprocess_env: dict[str, str],
    request: pytest.FixtureRequest,
) -> None:
    env = dict(subprocess_env)
    if backend == "s3":
        env.update(request.getfixturevalue("s3_settings_env"))
    else:
        env["TENANTDB_LOCAL_BUCKET"] = str(tmp_path / "bucket")

    upload = run_probe("upload", tmp_path / "up", env)
    download = run_probe("download", tmp_path / "down", env)

    assert upload["size"] == download["size"] == SIZE_MIB << 20
    assert download["sha256"] == upload["sha256"]
    assert upload["growth_mib"] < LIMIT_MIB, upload
    assert download["growth_mib"] < LIMIT_MIB, download


def test_probe_sees_an_unbounded_transfer(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    # The control: reading the file whole into one put must show up as growth, or the
    # bounded-memory test above could never fail.
    env = dict(subprocess_env, TENANTDB_LOCAL_BUCKET=str(tmp_path / "bucket"))
    control = run_probe("control", tmp_path / "control", env, size_mib=128)
    assert control["growth_mib"] > 100, control
