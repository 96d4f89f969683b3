"""Ctrl-C stops the test run (``make test``), even inside a test that absorbs a cancellation."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.support.servers import ROOT

ABSORBING_TESTS = """
import asyncio


async def test_absorbs_a_cancellation() -> None:
    print("started", flush=True)
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        pass  # as a shutdown that finishes what it started does


async def test_after_it() -> None:
    await asyncio.sleep(30)
"""


def test_ctrl_c_stops_the_run_even_in_a_test_that_absorbs_the_cancellation(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    (tmp_path / "test_absorbing.py").write_text(ABSORBING_TESTS)
    # The suite's own conftest as a plugin, on a test file of its own.
    argv = [
        *(sys.executable, "-m", "pytest", "-p", "tests.conftest", "-s", "-p", "no:cacheprovider"),
        *("-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"),
        *("--rootdir", str(tmp_path), str(tmp_path / "test_absorbing.py")),
    ]
    run = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=subprocess_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert run.stdout is not None
        for line in run.stdout:
            if "started" in line:
                break
        run.send_signal(signal.SIGINT)  # what Ctrl-C sends
        output = run.stdout.read()
        code = run.wait(20)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert code == 2, output  # pytest's exit code for an interrupted run
    assert "KeyboardInterrupt" in output
    assert "passed" not in output
