"""Ctrl-C stops the test run (``make test``) at once, even inside a test that absorbs a
cancellation, and leaves no server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.process_tree import descendants
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


SERVING_TEST = """
import os
from pathlib import Path

from tests.support.process_tree import descendants
from tests.support.servers import UvicornProcess


def test_serves(s3_endpoint: str, tmp_path: Path) -> None:
    server = UvicornProcess("tests.support.apps:starlette_app", {}, tmp_path / "machine.log")
    server.wait_ready()
    # The moto server (its own session) and the uvicorn machine, with their children.
    Path(os.environ["SERVER_PIDS"]).write_text(" ".join(map(str, descendants(os.getpid()))))
    server.proc.wait()  # serves until the run is interrupted
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.long
def test_ctrl_c_to_a_parallel_run_ends_it_at_once_and_kills_its_servers(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    (tmp_path / "test_serving.py").write_text(SERVING_TEST)
    pids_file = tmp_path / "pids"
    argv = [
        *(
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "1",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
        ),
        *("-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"),
        *("--rootdir", str(tmp_path), str(tmp_path / "test_serving.py")),
    ]
    run = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**subprocess_env, "SERVER_PIDS": str(pids_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (pids_file.exists() and pids_file.read_text()):
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline, "the inner run's servers did not start"
            time.sleep(0.05)
        servers = [int(pid) for pid in pids_file.read_text().split()]
        assert len(servers) >= 2  # moto and uvicorn
        # To the controller alone (``kill -INT``): it must reach the worker too.
        run.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        output, _ = run.communicate(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        if run.poll() is None:
            for pid in descendants(run.pid):
                os.kill(pid, signal.SIGKILL)
            run.kill()
            run.wait()
    leftover = [pid for pid in servers if alive(pid)]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert run.returncode == 2, output  # pytest's exit code for an interrupted run
    assert leftover == [], f"servers left running after Ctrl-C:\n{output}"
    # A run that ignored Ctrl-C would serve on forever: a bound well above what ending
    # costs on a loaded CI machine (pytest's summary, a few seconds of CPU) tells them apart.
    assert took < 20, f"the run took {took:.1f}s to end after Ctrl-C:\n{output}"
