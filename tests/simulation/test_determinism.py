"""One seed makes one run, bit for bit: the same trace (every bucket attempt and its
answer, every state move, every step's result) in this process, in another process with
another hash seed, and a different trace for a different seed."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.simulation.harness import run_schedule
from tests.simulation.loop import CURRENT, deterministic
from tests.simulation.schedule import make_schedule

SEED, STEPS = 1010, 16
ROOT = Path(__file__).resolve().parents[2]


def trace_of(seed: int, root: Path) -> list[str]:
    return run_schedule(make_schedule(seed, STEPS), root).trace


def test_the_same_seed_makes_the_same_trace(tmp_path: Path) -> None:
    first = trace_of(SEED, tmp_path / "first")
    second = trace_of(SEED, tmp_path / "second")
    assert first == second
    # A full trace: bucket attempts, state moves and steps, at virtual times.
    assert sum(" put tenants/acme/lock.json " in line for line in first) > 3
    assert any(line.endswith(" -> serving") for line in first)
    assert sum(" step " in line for line in first) == len(make_schedule(SEED, STEPS).steps)


def test_another_seed_makes_another_trace(tmp_path: Path) -> None:
    assert trace_of(SEED, tmp_path / "a") != trace_of(SEED + 1, tmp_path / "b")


def _digest_in_a_process(hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.simulation",
            "--seed",
            str(SEED),
            "--steps",
            str(STEPS),
            "--trace",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = re.search(rf"^trace {SEED}: \d+ lines, sha256 (\w+)$", done.stdout, re.M)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    return found.group(1)


def test_the_same_seed_makes_the_same_trace_in_other_processes() -> None:
    """Set iteration orders, task ids and temp paths change from process to process."""
    assert _digest_in_a_process("1") == _digest_in_a_process("2")


def test_the_loop_waits_on_a_virtual_clock_and_runs_blocking_calls_inline() -> None:
    with deterministic("clock") as loop:

        async def main() -> tuple[float, bool]:
            began = loop.time()
            await asyncio.sleep(3600)
            same_thread = await asyncio.to_thread(lambda: True)
            return loop.time() - began, same_thread

        wall = time.monotonic()
        slept, inline = loop.run_until_complete(main())
        assert slept >= 3600
        assert inline
        assert time.monotonic() - wall < 5


def test_a_frozen_machine_runs_nothing_until_thawed() -> None:
    with deterministic("freeze") as loop:
        ticks: list[float] = []

        async def machine() -> None:
            for _ in range(10):
                ticks.append(loop.monotonic())
                await asyncio.sleep(0.1)

        async def main() -> None:
            context = CURRENT.set("m1")
            task = loop.create_task(machine())
            CURRENT.reset(context)
            await asyncio.sleep(0.25)
            loop.freeze("m1", clock_stops=True)
            count = len(ticks)
            await asyncio.sleep(5)
            assert len(ticks) == count  # nothing ran while frozen
            loop.thaw("m1")
            await task

        loop.run_until_complete(main())
        # A suspend stops the machine's monotonic clock: no gap of 5 s in what it saw.
        assert max(b - a for a, b in itertools.pairwise(ticks)) < 1


def _seed_digests(*options: str) -> list[str]:
    """``python -m tests.simulation --trace`` over three seeds: each seed's trace digest."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tests.simulation", "--seeds", "3", "--first", str(SEED)),
            *("--steps", str(STEPS), "--trace", *options),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return re.findall(r"^trace (\d+: \d+ lines, sha256 \w+)$", done.stdout, re.M)


def test_seeds_run_in_worker_processes_give_the_results_of_one_process() -> None:
    alone = _seed_digests("--jobs", "1")
    assert [line.split(":")[0] for line in alone] == [str(SEED + n) for n in range(3)]
    assert _seed_digests("--jobs", "2") == alone
