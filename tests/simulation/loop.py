"""The simulation's scheduler: an event loop on a virtual clock, with no threads.

As in FoundationDB's and TigerBeetle's simulators, nothing here waits for real time or for
another thread, so one seed makes one run, bit for bit:

- ``time()`` is virtual. When no callback is ready, the loop jumps to the next timer
  instead of sleeping; a run of minutes of protocol time takes the CPU time it needs.
- ``run_in_executor`` (under ``asyncio.to_thread``) runs the function on the loop, one
  scheduling step later, and answers a seeded moment after (a thread takes time);
  aiosqlite's per-connection thread is replaced the same way (``_InlineQueue``). SQLite's
  busy wait would block the only thread, so connections get ``busy_timeout=0`` and a
  busy call is tried again a virtual millisecond later, up to the production busy
  timeout.
- Each loop iteration costs ``ITERATION_COST`` of virtual time.
- Each simulated machine's tasks run in a context naming the machine (``CURRENT``). A
  machine can be frozen (SIGSTOP, or Fly's suspend): its callbacks are held until it is
  thawed; a suspend also stops its monotonic clock (``clock_lost``). Each machine's wall
  clock can be jumped (``wall_offset``).
- tenantdb reads its clocks and fresh randomness through ``tenantdb.clock``;
  ``deterministic`` points those at this loop and a seeded generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import random
import selectors
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import aiosqlite.core

from tenantdb import clock
from tenantdb.connections import pool
from tenantdb.machine import migrations
from tenantdb.replication import checkpoint, garbage

__all__ = ["CURRENT", "EPOCH", "Deadlock", "SimLoop", "deterministic"]

# The machine whose code runs now ("" for the harness and the operator's tools).
CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("sim_machine", default="")
EPOCH = 1_800_000_000.0  # the wall clock at virtual time 0 (January 2027)
BUSY_STEP = 0.001  # how long a busy SQLite call waits before it is tried again...
BUSY_TRIES = 5000  # ...and how often: the 5 s busy_timeout of CONNECTION_PRAGMAS
# What one loop iteration costs on the virtual clock: code takes time, so that events of
# one step do not all share one instant (which would blur every point-in-time check).
ITERATION_COST = 50e-6
MIN_WAIT = 1e-6  # the shortest wait of ``call_later`` that is not zero
SIM_CHECKPOINT_WAL_BYTES = 64 << 10  # tenantdb's own WAL checkpoints, every few dozen commits
THREAD_TIME = 0.002  # the longest a blocking call (a thread's work) takes
# Garbage is looked for a second after it is made past the retention, not ten minutes.
SIM_GC_INTERVAL = 1.0
_BUSY_MESSAGES = ("database is locked", "database table is locked")


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is due: the run can never go on."""


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that never sleeps: a wait of ``timeout`` moves the virtual clock."""

    loop: SimLoop

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        ready: list[tuple[Any, int]] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise Deadlock("no callback is ready and no timer is set")
        self.loop.advance(timeout)
        return ready


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and str(exc) in _BUSY_MESSAGES


class SimLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock that runs blocking calls inline (module docstring)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = 0.0
        self.rng = rng or random.Random(0)  # how long each blocking call takes
        self.iterations = 0
        self.busy_retries = 0
        self._watchers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._frozen: dict[str, bool] = {}  # machine -> whether its monotonic clock stops
        self._frozen_at: dict[str, float] = {}
        self._held: dict[str, list[asyncio.Handle]] = {}
        self.clock_lost: dict[str, float] = {}  # monotonic time a machine did not see
        self.wall_offset: dict[str, float] = {}  # a machine's wall clock minus true time
        self._tasks: dict[str, list[asyncio.Task[Any]]] = {}  # by machine, in creation order
        self.set_task_factory(self._new_task)
        # (6) The work of each machine: callbacks run by (machine, simulated second), and
        # the most CPU time one callback held the loop for (a thread's work aside).
        self.callbacks: Counter[tuple[str, int]] = Counter()
        self.longest_callback: tuple[float, str] = (0.0, "")

    # --- the clock --------------------------------------------------------------------------

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the virtual clock on (the selector's wait)."""
        self._now += max(seconds, 0.0)

    def monotonic(self) -> float:
        """The monotonic clock of the machine whose code runs now."""
        return self._now - self.clock_lost.get(CURRENT.get(), 0.0)

    def wall(self) -> float:
        """The wall clock of the machine whose code runs now."""
        return EPOCH + self._now + self.wall_offset.get(CURRENT.get(), 0.0)

    def true_wall(self) -> float:
        """The wall clock as it really is (the model's clock)."""
        return EPOCH + self._now

    # --- scheduling -------------------------------------------------------------------------

    def _run_once(self) -> None:
        super()._run_once()  # type: ignore[misc]
        self.iterations += 1
        self._now += ITERATION_COST
        while self._watchers and self._watchers[0][0] <= self.iterations:
            _, _, waiter = heapq.heappop(self._watchers)
            if not waiter.done():
                waiter.set_result(None)

    def after_iterations(self, count: int) -> asyncio.Future[None]:
        """A future done once ``count`` more loop iterations have run."""
        waiter: asyncio.Future[None] = self.create_future()
        heapq.heappush(self._watchers, (self.iterations + count, id(waiter), waiter))
        return waiter

    def _machine_of(self, context: contextvars.Context | None) -> str:
        return CURRENT.get() if context is None else context.get(CURRENT, "")

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        machine = self._machine_of(context)
        if machine in self._frozen:
            handle = asyncio.Handle(callback, args, self, context)
            self._held[machine].append(handle)
            return handle
        if machine and callback != self._attempt:
            return super().call_soon(self._timed, machine, callback, *args, context=context)
        return super().call_soon(callback, *args, context=context)

    def _timed(self, machine: str, callback: Callable[..., object], *args: Any) -> None:
        """Run one of ``machine``'s callbacks, counted, and timed in CPU time."""
        self.callbacks[machine, int(self._now)] += 1
        # CPU time of this thread: a busy machine that preempts the process is no fault
        # of the callback's.
        began = time.thread_time()
        try:
            callback(*args)
        finally:
            took = time.thread_time() - began
            if took > self.longest_callback[0]:
                self.longest_callback = (took, f"{machine}: {callback!r}"[:200])

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        # A real clock moves while code runs: a wait of a hair past "now" (a deadline less
        # a clock read) ends later. Here it would end at once, again and again.
        if 0 < delay < MIN_WAIT:
            delay = MIN_WAIT
        return super().call_later(delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        machine = self._machine_of(context)
        if not machine:
            return super().call_at(when, callback, *args, context=context)
        return super().call_at(when, self._gated, machine, callback, args, context=context)

    def _gated(self, machine: str, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        if machine in self._frozen:
            self._held[machine].append(asyncio.Handle(callback, args, self))
        else:
            self._timed(machine, callback, *args)

    def _new_task(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        machine = self._machine_of(kwargs.get("context"))
        if machine:
            tasks = self._tasks.setdefault(machine, [])
            tasks[:] = [t for t in tasks if not t.done()]
            tasks.append(task)
        return task

    def tasks_of(self, machine: str) -> list[asyncio.Task[Any]]:
        """The machine's unfinished tasks, oldest first (not ``all_tasks``: a WeakSet's
        order changes from run to run)."""
        return [t for t in self._tasks.get(machine, []) if not t.done()]

    def frozen(self, machine: str) -> bool:
        """Whether ``machine`` is frozen."""
        return machine in self._frozen

    def freeze(self, machine: str, *, clock_stops: bool) -> None:
        """Hold every callback of ``machine`` (SIGSTOP; a suspend if ``clock_stops``)."""
        self._frozen[machine] = clock_stops
        self._frozen_at[machine] = self._now
        self._held.setdefault(machine, [])

    def thaw(self, machine: str) -> None:
        """Let ``machine`` run on, its held callbacks first."""
        clock_stops = self._frozen.pop(machine)
        if clock_stops:
            lost = self._now - self._frozen_at[machine]
            self.clock_lost[machine] = self.clock_lost.get(machine, 0.0) + lost
        for handle in self._held.pop(machine, []):
            if not handle.cancelled():
                self._ready.append(handle)  # type: ignore[attr-defined]

    def forget(self, machine: str) -> None:
        """Drop a dead machine's held callbacks (SIGKILL while stopped)."""
        self._frozen.pop(machine, None)
        for handle in self._held.pop(machine, []):
            handle.cancel()

    # --- blocking calls, inline -------------------------------------------------------------

    def run_in_executor(  # type: ignore[override]
        self, executor: object, func: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.create_future()
        self.call_soon(self._attempt, future, lambda: func(*args), 0)
        return future

    def _attempt(self, future: asyncio.Future[Any], call: Callable[[], Any], tries: int) -> None:
        if future.cancelled():
            return
        try:
            result = call()
        except Exception as exc:
            if _busy(exc) and tries < BUSY_TRIES:
                self.busy_retries += 1
                self.call_later(BUSY_STEP, self._attempt, future, call, tries + 1)
            elif not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            # A thread takes time, and others run meanwhile: the answer comes a seeded
            # moment after the call ran (the window where a commit lands after a read).
            self.call_later(self.rng.uniform(0, THREAD_TIME), _set_result, future, result)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


class _InlineQueue:
    """aiosqlite's queue to its connection thread, run on the loop instead."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        if future is None:  # stop() outside any loop: close at once
            with contextlib.suppress(Exception):
                function()
            return
        loop = future.get_loop()
        assert isinstance(loop, SimLoop), "aiosqlite inline outside the simulation's loop"
        loop.call_soon(loop._attempt, future, function, 0)


class _NoThread:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def start(self) -> None:
        pass


_SIM_PRAGMAS = tuple(
    "PRAGMA busy_timeout=0" if p.startswith("PRAGMA busy_timeout") else p
    for p in checkpoint.CONNECTION_PRAGMAS
)


@contextlib.contextmanager
def deterministic(seed: str) -> Iterator[SimLoop]:
    """A fresh ``SimLoop``, with tenantdb's clocks and randomness and aiosqlite on it."""
    loop = SimLoop(random.Random(f"threads:{seed}"))
    rng = random.Random(f"entropy:{seed}")
    saved_random = random.getstate()
    random.seed(f"random:{seed}")  # retry jitter (storage.base) draws from the module
    patches: list[tuple[object, str, object]] = [
        (clock, "monotonic", loop.monotonic),
        (clock, "wall", loop.wall),
        # Firecracker's snapshot restore stops the guest's boot clock with its monotonic one.
        (clock, "boottime", loop.monotonic),
        (clock, "token_hex", lambda n: rng.randbytes(n).hex()),
        (aiosqlite.core, "SimpleQueue", _InlineQueue),
        (aiosqlite.core, "Thread", _NoThread),
        (checkpoint, "CONNECTION_PRAGMAS", _SIM_PRAGMAS),
        (pool, "CONNECTION_PRAGMAS", _SIM_PRAGMAS),
        (migrations, "CONNECTION_PRAGMAS", _SIM_PRAGMAS),
        # A WAL checkpoint (and restart) every few dozen commits, not every 4 MiB.
        (checkpoint, "CHECKPOINT_WAL_BYTES", SIM_CHECKPOINT_WAL_BYTES),
        (garbage, "GC_INTERVAL", SIM_GC_INTERVAL),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield loop
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        random.setstate(saved_random)
        loop.close()
