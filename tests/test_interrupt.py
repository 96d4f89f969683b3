"""Ctrl-C stops the test run (``make test``) at once, even inside a test that absorbs a
cancellation, and leaves no server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.interrupt import RUN_GRACE, WORKER_GRACE
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


STUCK_WORKER_TEST = """
import os
import signal
import time
from pathlib import Path


def test_stuck() -> None:
    # As a worker stuck where no signal reaches its Python code, or one whose exit hangs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Path(os.environ["SERVER_PIDS"]).write_text(str(os.getpid()))
    time.sleep(60)
"""


@dataclass(frozen=True)
class InterruptedRun:
    """What a parallel run did after one Ctrl-C: its exit code and output, how long it took to
    end, and the processes the inner test named that still ran after it ended."""

    returncode: int
    output: str
    took: float
    leftover: list[int]


def interrupt_parallel_run(
    tmp_path: Path, subprocess_env: dict[str, str], test_source: str
) -> InterruptedRun:
    """Start ``pytest -n 1`` on ``test_source``, Ctrl-C it once the test has written the pids
    of its processes to ``$SERVER_PIDS``, and wait for the run to end."""
    (tmp_path / "test_inner.py").write_text(test_source)
    pids_file = tmp_path / "pids"
    argv = [
        *(sys.executable, "-m", "pytest", "-n", "1"),
        *("-p", "tests.conftest", "-p", "no:cacheprovider"),
        *("-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"),
        *("--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")),
    ]
    run = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**subprocess_env, "SERVER_PIDS": str(pids_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    named: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (pids_file.exists() and pids_file.read_text()):
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline, "the inner run's test did not start"
            time.sleep(0.05)
        named = [int(pid) for pid in pids_file.read_text().split()]
        # To the controller alone (``kill -INT``): it must reach the worker too.
        run.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        output, _ = run.communicate(timeout=45)
        took = time.monotonic() - interrupted
    finally:
        if run.poll() is None:
            for pid in descendants(run.pid):
                os.kill(pid, signal.SIGKILL)
            run.kill()
            run.wait()
    leftover = [pid for pid in named if alive(pid)]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    return InterruptedRun(run.returncode, output, took, leftover)


@pytest.mark.long
def test_ctrl_c_to_a_parallel_run_ends_it_at_once_and_kills_its_servers(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    run = interrupt_parallel_run(tmp_path, subprocess_env, SERVING_TEST)
    assert run.returncode == 2, run.output  # pytest's exit code for an interrupted run
    assert run.leftover == [], f"servers left running after Ctrl-C:\n{run.output}"
    # A run that ignored Ctrl-C would serve on forever: a bound well above what ending
    # costs on a loaded CI machine (pytest's summary, a few seconds of CPU) tells them apart.
    assert run.took < 20, f"the run took {run.took:.1f}s to end after Ctrl-C:\n{run.output}"


@pytest.mark.long
def test_ctrl_c_to_a_parallel_run_kills_a_worker_that_does_not_end_within_seconds(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    run = interrupt_parallel_run(tmp_path, subprocess_env, STUCK_WORKER_TEST)
    assert run.returncode == 2, run.output
    assert run.leftover == [], f"the stuck worker outlived the run:\n{run.output}"
    # xdist alone waits 10 s for a worker to come down before it kills it.
    assert run.took < WORKER_GRACE + 5, f"the run took {run.took:.1f}s to end:\n{run.output}"


HANGING_CONTROLLER_PLUGIN = """
import time


def pytest_sessionfinish(session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller alone
        time.sleep(60)  # as a teardown that never returns
"""


@pytest.mark.long
def test_ctrl_c_ends_a_run_whose_own_ending_hangs_and_says_where_it_was(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    (tmp_path / "conftest.py").write_text(HANGING_CONTROLLER_PLUGIN)
    run = interrupt_parallel_run(tmp_path, subprocess_env, SERVING_TEST)
    assert run.returncode == 2, run.output
    assert run.leftover == [], f"servers left running after Ctrl-C:\n{run.output}"
    assert RUN_GRACE - 1 < run.took < RUN_GRACE + 5, run.output
    assert "this test process had not ended; where it was" in run.output
    assert "in pytest_sessionfinish" in run.output, run.output  # the stack of the hang
