"""Running seeds: one seed's schedule in a scratch directory, in this process or in a pool
of worker processes (a module of its own, since spawned workers cannot import a package's
``__main__``)."""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.simulation import tmpfs
from tests.simulation.harness import REAL_DISK_FULL, Outcome, SimulationFailed, run_schedule
from tests.simulation.mutations import MUTATIONS
from tests.simulation.schedule import Schedule, make_schedule
from tests.simulation.shrink import keep_steps

__all__ = ["SCRATCH", "SeedResult", "run_seeds", "schedule_of", "set_up"]

_PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
# A RAM disk if there is one: SQLite's fsyncs cost more wall time than the simulation.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


@dataclass(frozen=True)
class SeedResult:
    """One seed's run, as a worker process hands it back: its outcome, or why it failed."""

    seed: int
    machines: int
    outcome: Outcome | None
    failure: str = ""  # the failure's report, with its replay line
    invariant: str = ""
    step: int = 0


def set_up(mutation: str | None, verbose: bool) -> None:
    """Prepare this process for schedules: the namespace, the mutation, the log level."""
    if REAL_DISK_FULL:
        tmpfs.enter_namespace()  # before anything starts a thread
    if mutation:
        MUTATIONS[mutation](pytest.MonkeyPatch())
    logging.basicConfig(
        level=logging.INFO if verbose else logging.CRITICAL + 1,
        format="%(asctime)s %(name)s %(message)s",
    )


def _set_up_worker(mutation: str | None, verbose: bool) -> None:
    """``set_up`` a pool worker, which leaves Ctrl-C to the process that runs the pool and
    ends with it (Linux), however it ends: a worker whose pool is gone has nothing to do."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    set_up(mutation, verbose)


def schedule_of(seed: int, steps: int, keep: str | None) -> Schedule:
    """Seed's schedule of ``steps`` steps, or only those ``keep`` lists (comma-separated)."""
    schedule = make_schedule(seed, steps)
    if keep is not None:
        schedule = keep_steps(schedule, [int(i) for i in keep.split(",") if i])
    return schedule


def _run_seed(seed: int, steps: int, keep: str | None) -> SeedResult:
    """Run one seed's schedule in a scratch directory of its own."""
    schedule = schedule_of(seed, steps, keep)
    with tempfile.TemporaryDirectory(prefix=f"tenantdb-sim-{seed}-", dir=SCRATCH) as root:
        try:
            return SeedResult(seed, schedule.machines, run_schedule(schedule, Path(root)))
        except SimulationFailed as failed:
            invariant = getattr(failed.cause, "invariant", type(failed.cause).__name__)
            return SeedResult(seed, schedule.machines, None, str(failed), invariant, failed.step)


def run_seeds(
    seeds: Sequence[int],
    *,
    steps: int,
    keep: str | None,
    jobs: int,
    mutation: str | None,
    verbose: bool,
) -> Iterator[SeedResult]:
    """Each seed's result, in seed order, from ``jobs`` workers (each ``set_up`` with the
    mutation and verbosity), or with ``jobs`` 1 from this process, as its caller set it up."""
    run = functools.partial(_run_seed, steps=steps, keep=keep)
    if jobs <= 1:
        yield from map(run, seeds)
        return
    # Spawned, not forked: each worker enters its own namespace before any thread starts.
    with ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_set_up_worker,
        initargs=(mutation, verbose),
    ) as pool:
        try:
            yield from pool.map(run, seeds, chunksize=4)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
