"""The table of a machine's states and the mover that takes it from role to role by it.

A ``Role`` is what a machine does for its tenant in one state (standby.py, restoring.py,
holder.py, fenced.py, failed.py, stopping.py, starting.py): its loops, its health, what it
may be asked for. The ``Mover`` holds the current role, allows only the moves in ``MOVES``,
stops the loops of the role it leaves, and supervises every loop (supervisor.py): a loop
that must not die takes the machine to its failed role.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar, Literal

from tenantdb.connections.pool import ConnectionPool
from tenantdb.errors import LeaseLostError, ReplicaRefusedError, TenantDBError
from tenantdb.machine.supervisor import Loop, Policy, Supervisor, TaskFailures
from tenantdb.replication.shipper import Shipper

if TYPE_CHECKING:  # replica.py's role imports this module
    from tenantdb.machine.replica import Bookmark, ReadCopy

__all__ = [
    "MOVES",
    "Failing",
    "MoveRefusedError",
    "Mover",
    "Role",
    "Stopped",
    "TenantState",
]

TenantState = Literal[
    "stopped",
    "starting",
    "standby",
    "replica",
    "restoring",
    "serving",
    "fenced",
    "failed",
    "stopping",
]

# The lifecycle in one place: every state and the states it may move to (straight to
# "stopped" only when start() fails).
#   starting   the data directory is locked, the lease is being acquired
#   standby    another machine holds the lease: follow its log (a warm copy), replay
#              requests to it, take over when it releases the lease or the lease expires
#   replica    a standby (TENANTDB_REPLICA_READS) that also serves reads from its copy
#              while the copy is current (replica.py)
#   restoring  this machine holds the lease (renewed from the moment it was taken) and
#              makes the local file the newest data; retried while the lease holds
#   serving    the database is open to requests
#   fenced     the lease was lost: the database is closed, nothing more is written
#   failed     a task the machine cannot run without died (``failure`` says which): the
#              database is closed, the lease released if it can be; the server exits
#   stopping   final publish and release
MOVES: dict[TenantState, frozenset[TenantState]] = {
    "stopped": frozenset({"starting"}),
    "starting": frozenset({"standby", "replica", "restoring", "stopping", "stopped"}),
    "standby": frozenset({"restoring", "stopping"}),
    "replica": frozenset({"restoring", "stopping"}),
    "restoring": frozenset({"serving", "fenced", "failed", "stopping", "stopped"}),
    "serving": frozenset({"fenced", "failed", "stopping"}),
    "fenced": frozenset({"standby", "replica", "restoring", "failed", "stopping", "stopped"}),
    "failed": frozenset({"stopping"}),
    "stopping": frozenset({"stopped"}),
}


class MoveRefusedError(TenantDBError):
    """A move the table does not allow (a bug in tenantdb, never the app's doing)."""


class Role:
    """What a machine does for its tenant in one state; the base does nothing.

    A role starts its loops in ``enter`` with ``spawn``; the mover cancels them when the
    machine leaves the role, except those the next role ``inherits``.
    """

    state: ClassVar[TenantState]
    # The loops a machine in this role is not healthy without (see supervisor.py). Not
    # garbage collection: a red check would take a tenant that serves and ships off the proxy.
    required: ClassVar[tuple[str, ...]] = ()
    # The machine does not do its part in this role, yet or any more: its health says so.
    down: ClassVar[bool] = False

    def __init__(self, mover: Mover) -> None:
        self.mover = mover
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mover.tenant!r})"

    def enter(self) -> None:
        """Start this role's loops (the mover calls it once the role is current)."""

    def inherits(self, task: str) -> bool:
        """True if the loop named ``task`` of the role before this one keeps running."""
        return False

    def spawn(self, name: str, loop: Loop, policy: Policy) -> asyncio.Task[None]:
        """Run ``loop`` as this role's task ``name`` under the mover's supervision."""
        return self.mover.spawn(self, name, loop, policy)

    def reasons(self) -> Iterator[str]:
        """Why this machine cannot do its part in this role (its loops aside), if it cannot."""
        if self.down:
            yield f"the tenant's database is {self.state}"

    def handoff_expected(self) -> bool:
        """True when the lease is coming to this machine (see ``TenantDB.handoff_expected``)."""
        return False

    def pool(self) -> ConnectionPool:
        """The connection pool, in a role that serves requests."""
        raise self.not_served()

    def shipper(self) -> Shipper:
        """The log shipper, in a role that may still ship."""
        raise self.not_served()

    def read_copy(self, bookmark: Bookmark | None) -> ReadCopy:
        """A read-only view of the tenant's data, in a role that serves reads from a copy."""
        raise ReplicaRefusedError(f"this machine is {self.state}", tenant=self.mover.tenant)

    async def wind_down(self, deadline: float) -> None:
        """Finish this role's work as the machine stops (by the monotonic ``deadline``)."""

    def not_served(self) -> LeaseLostError:
        """The error for asking this role what only a holder has."""
        tenant = self.mover.tenant
        return LeaseLostError(f"tenant {tenant} is not served here ({self.state})", tenant=tenant)


class Stopped(Role):
    """Nothing runs: before ``start()`` and after ``stop()``."""

    state = "stopped"
    down = True


class Failing(Role):
    """The role a machine fails stop into (failed.py has the one in use)."""

    async def finish(self) -> None:
        """Stop what the failure left running; the mover's ``failed()`` returns after it."""


class Mover:
    """Holds the current role and moves between roles by ``MOVES``; supervises their loops.

    ``failed(reason)`` makes the role a machine fails stop into when a loop with the
    ``fail_stop`` policy dies in a state that may move to "failed".
    """

    def __init__(
        self,
        tenant: str,
        *,
        failures: TaskFailures,
        failed: Callable[[str], Failing],
    ) -> None:
        self.tenant = tenant
        self.supervisor = Supervisor(tenant, failures=failures, on_fail_stop=self.fail_stop)
        self._make_failed = failed
        self.role: Role = Stopped(self)
        self.failure: str | None = None  # why the machine failed stop, once it has
        self.failing: asyncio.Task[None] | None = None  # the failed role winding down
        self._failed = asyncio.Event()  # set once the failed role has wound down
        self.serving_now = asyncio.Event()  # set exactly while the state is "serving"

    @property
    def state(self) -> TenantState:
        """The current role's state."""
        return self.role.state

    def may_move(self, to: TenantState) -> bool:
        """True if the table allows a move from the current state to ``to``."""
        return to in MOVES[self.state]

    def move(self, role: Role) -> None:
        """Make ``role`` current: cancel the old role's loops it does not inherit, enter it.

        The task making the move (a loop of the old role handing over) is left to end itself.
        """
        if not self.may_move(role.state):
            raise MoveRefusedError(
                f"tenant {self.tenant}: no move from {self.state} to {role.state}"
            )
        old, self.role = self.role, role
        current = asyncio.current_task() if old.tasks else None
        for name, task in old.tasks.items():
            if role.inherits(name):
                role.tasks[name] = task
            elif task is not current:
                task.cancel()
        old.tasks = {}
        if role.state == "serving":
            self.serving_now.set()
        else:
            self.serving_now.clear()
        role.enter()

    def spawn(self, role: Role, name: str, loop: Loop, policy: Policy) -> asyncio.Task[None]:
        """Run ``loop`` as task ``name`` of ``role``, which must be the current role."""
        if role is not self.role:
            raise MoveRefusedError(
                f"tenant {self.tenant}: {role!r} is not the current role ({self.state})"
            )
        task = self.supervisor.spawn(name, loop, policy)
        role.tasks[name] = task
        return task

    def reasons(self) -> list[str]:
        """Why the machine cannot do its part: loops its role needs that do not run, and the
        role's own reasons."""
        role = self.role
        missing = (n for n in role.required if not self.supervisor.running(n))
        return [*(f"the {name} task is not running" for name in missing), *role.reasons()]

    def reset(self) -> None:
        """Forget an earlier failure (a machine started again)."""
        self.failure = None
        self._failed.clear()

    def fail_stop(self, reason: str) -> None:
        """A loop this machine cannot run without died: move to the failed role now and let
        it wind down (cancel the rest, close, release) in a task of its own."""
        if not self.may_move("failed"):
            return  # already failed, or stopping anyway
        self.failure = reason
        role = self._make_failed(reason)
        self.move(role)
        self.failing = asyncio.get_running_loop().create_task(self._fail(role))

    async def _fail(self, role: Failing) -> None:
        try:
            await role.finish()
        finally:
            self._failed.set()

    async def failed(self) -> str:
        """Wait until the machine has failed stop and its failed role has wound down."""
        await self._failed.wait()
        return self.failure or "failed"
