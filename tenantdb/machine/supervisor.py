"""Supervision of a machine's long-lived tasks: restart the safe ones, fail stop on the rest.

Every background loop of a ``TenantDB`` (lease renewal, log shipping, garbage collection,
the standby's polling, opening a held tenant, the fenced machine's recovery) runs under one
``Supervisor``, its mover's (mover.py). A loop handles the failures it expects (a bucket
error, a busy database) itself; anything else escaping it (a ``ValueError`` from a parser,
``RecursionError``, ``MemoryError``, a bug) is logged once at CRITICAL with its traceback,
counted in ``tenantdb_task_failures_total{task=...}``, and then, by the task's policy:

- ``restart``: run the loop again after a pause (0.5, 1, 2, 5, 10, 30 s; back to the first
  after a minute without failing). For loops that hold no state a failure could leave half
  changed.
- ``fail_stop``: call ``on_fail_stop``: the machine stops serving, releases its lease and
  the process exits with ``FAIL_STOP_EXIT_CODE``. For loops whose death would leave the
  machine half-alive: serving without renewing, or acknowledging writes nothing ships.

A task that returns, or is cancelled, has simply ended. ``Health`` is what a machine says
about itself to the platform's health check (``TenantDB.health()``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tenantdb import clock

__all__ = [
    "FAIL_STOP_EXIT_CODE",
    "Health",
    "HealthCheck",
    "Loop",
    "Policy",
    "Supervisor",
    "TaskFailures",
]

log = logging.getLogger("tenantdb")

Policy = Literal["restart", "fail_stop"]
Loop = Callable[[], Coroutine[Any, Any, None]]
# A further condition of a machine's health: None while all is well, else why not.
HealthCheck = Callable[[], str | None]

# The exit status of a server process whose machine failed stop (EX_SOFTWARE in
# sysexits.h): non-zero, so Fly's restart policy starts the machine again, and distinct from
# uvicorn's 3 (startup failed) and Python's 1 (an uncaught exception).
FAIL_STOP_EXIT_CODE = 70
# Pauses before restarting a task that failed 1, 2, 3... times in a row.
RESTART_PAUSES = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A task that ran this long before failing starts the pauses over.
_RECOVERED_AFTER = 60.0


@dataclass(frozen=True)
class Health:
    """A machine's health: green with no reasons, red with the reasons why."""

    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.reasons


class TaskFailures(Protocol):
    """Where the failures are counted (``Metrics`` is one)."""

    def task_failed(self, task: str) -> None: ...


class Supervisor:
    """The named tasks of one tenant on this machine, each with its failure policy."""

    def __init__(
        self,
        tenant: str,
        *,
        failures: TaskFailures,
        on_fail_stop: Callable[[str], None],
        pauses: Sequence[float] = RESTART_PAUSES,
    ) -> None:
        """``on_fail_stop(reason)`` is called (on the event loop) when a fail-stop task dies."""
        self.tenant = tenant
        self._failures = failures
        self._on_fail_stop = on_fail_stop
        self._pauses = tuple(pauses)
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._waiting: set[str] = set()  # tasks between a failure and their restart

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        """The tasks not yet finished."""
        return set(self._tasks)

    def spawn(self, name: str, loop: Loop, policy: Policy) -> asyncio.Task[None]:
        """Run ``loop()`` as task ``name`` under ``policy`` (``loop`` is called per restart)."""
        task = asyncio.get_running_loop().create_task(
            self._supervise(name, loop, policy), name=f"tenantdb {self.tenant} {name}"
        )
        self._tasks[task] = name
        task.add_done_callback(self._forget)
        return task

    def running(self, name: str) -> bool:
        """True while task ``name`` runs (not ended, not waiting to restart after a failure)."""
        return name in self._tasks.values() and name not in self._waiting

    async def cancel(self, *, keep: asyncio.Task[Any] | None = None) -> None:
        """Cancel every task but ``keep`` and wait for them to end."""
        others = [task for task in self._tasks if task is not keep]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _supervise(self, name: str, loop: Loop, policy: Policy) -> None:
        failures = 0
        while True:
            started = clock.monotonic()
            try:
                await loop()
                return
            except Exception as exc:  # cancellation, SystemExit, KeyboardInterrupt go on
                self._failures.task_failed(name)
                reason = f"the {name} task died ({type(exc).__name__})"
                if policy == "fail_stop":
                    log.critical(
                        "tenant %s: %s; this machine fails stop", self.tenant, reason, exc_info=exc
                    )
                    self._on_fail_stop(reason)
                    return
                if clock.monotonic() - started >= _RECOVERED_AFTER:
                    failures = 0
                pause = self._pauses[min(failures, len(self._pauses) - 1)]
                failures += 1
                log.critical(
                    "tenant %s: %s; restarting it in %.1fs",
                    self.tenant,
                    reason,
                    pause,
                    exc_info=exc,
                )
            self._waiting.add(name)
            try:
                await asyncio.sleep(pause)
            finally:
                self._waiting.discard(name)
