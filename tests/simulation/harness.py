"""The harness: real ``TenantDB`` machines of one tenant over the simulated bucket, driven
step by step by a schedule, with the invariants checked after every step.

Everything runs on the simulation's loop (loop.py): virtual time, no threads, so one seed
makes one trace (``Outcome.trace``: every bucket attempt and its answer, every state move
of every machine, every step's result), bit for bit.

Each machine's code (its start, its loops, the requests it serves) runs in a context that
names it, so that it can be frozen whole (SIGSTOP; Fly's suspend, which also stops its
monotonic clock) and its wall clock jumped. A crash is the nearest to SIGKILL that one
process allows: it lands after a seeded number of loop iterations, so at any await; the
machine's bucket view is cut (nothing more of it reaches the bucket), every task of the
machine is cancelled where it stands, its SQLite connections are closed without any
publish or lease release, and its data directory's flock is dropped. Unlike a real
SIGKILL, closing the last connection folds the WAL into the local file (SQLite's
checkpoint on close).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fnmatch
import itertools
import os
import random
import re
import socket
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from starlette.types import Message, Receive, Scope, Send

from tenantdb.asgi.in_flight import InFlight
from tenantdb.asgi.middleware import TenantDBMiddleware
from tenantdb.config import RETENTION_FLOOR_LEASES, Settings
from tenantdb.crypto import parse_keyring
from tenantdb.errors import (
    LeaseHeldError,
    LeaseLostError,
    ListingBehindError,
    PointInTimeError,
    TenantDBError,
)
from tenantdb.machine.database import TenantDB
from tenantdb.machine.mover import Role
from tenantdb.machine.standby import Standby
from tenantdb.metrics import Metrics
from tenantdb.protocol.lockfile import LockRecord, SnapshotName
from tenantdb.replication import pitr
from tenantdb.replication.rollback import rollback
from tenantdb.replication.segment import parse_chunk_key, segment_key
from tenantdb.replication.shipper import carried_segments
from tenantdb.replication.takeovers import takeover_key
from tenantdb.storage.base import Bucket
from tenantdb.storage.encrypted import EncryptedBucket
from tests.simulation import invariants, tmpfs
from tests.simulation.bucket import BucketView, SimBucket, _Object
from tests.simulation.invariants import InvariantViolated
from tests.simulation.loop import CURRENT, EPOCH, SimLoop, deterministic
from tests.simulation.schedule import Schedule, Step

__all__ = ["Outcome", "Simulation", "SimulationFailed", "run_schedule", "simulate"]

T = TypeVar("T")
TENANT = "acme"
PREFIX = "tenants/"
# Set (id:base64), every machine and restore goes through EncryptedBucket: the invariants
# then hold of sealed objects (`TENANTDB_SIM_ENCRYPTION_KEY=k1:... make simulate`).
_SIM_KEY = os.environ.get("TENANTDB_SIM_ENCRYPTION_KEY")
_KEYRING = parse_keyring(_SIM_KEY, variable="TENANTDB_SIM_ENCRYPTION_KEY") if _SIM_KEY else None


def _through(view: BucketView) -> Bucket:
    """The view as a machine opens it: sealed when the simulation runs encrypted."""
    return view if _KEYRING is None else EncryptedBucket(view, _KEYRING, prefix=PREFIX)


# Set, each machine's data directory is a small tmpfs that a full disk fills (tmpfs.py;
# the process must have entered its own namespace first, as ``__main__`` does).
REAL_DISK_FULL = os.environ.get("TENANTDB_SIM_REAL_DISK_FULL") == "1"
LOCK_KEY = f"{PREFIX}{TENANT}/lock.json"
# Below the 3 s production minimum (set past Settings' check): fewer loop iterations per
# schedule. Time is virtual: the waits below cost no wall time.
TTL = 1.0
RETENTION = RETENTION_FLOOR_LEASES * TTL
MIGRATIONS = ["CREATE TABLE sim_tokens (token TEXT PRIMARY KEY)"]
WRITE_TIMEOUT = 3.0  # a write (commit + sync) not acknowledged by then counts as unanswered
LIFECYCLE_TIMEOUT = 10.0  # start and stop
SERVING_WAIT = TTL + 2.5  # how long a write step waits for a machine that serves
FULL_DISK_PAGES = 1_073_741_823  # SQLite's default max_page_count: the disk has room again
OPERATOR_CLOCK_ERROR = -3.0  # the rollback's machine: tenantdb must not trust its clock
# How a restore names a segment it did not find: "segment 2 (tenants/a/log/*/...seg)".
_NAMED_MISSING = re.compile(r"segment (\d+) \((\S+\.seg)\) is missing")
LIST_LAGS = (0.05, 0.5, 2.0)  # how far a lagging LIST is behind, in seconds
WATCH_INTERVAL = 0.005  # how often the harness looks for two machines serving at once
# An app's own writes and checkpoints from another process: at most this many large
# writes to grow the WAL to tenantdb's checkpoint size, right after which the app strikes.
APP_WAL_WRITES = 8
WriteMode = Literal["request", "sync", "async", "outside"]


class SimulationFailed(AssertionError):
    """An invariant failed (or a step broke): the seed, the steps so far, and what broke."""

    def __init__(self, schedule: Schedule, step: int, steps: list[str], cause: BaseException):
        self.schedule = schedule
        self.cause = cause
        self.step = step
        lines = "\n".join(f"  {n:>3} {line}" for n, line in enumerate(steps))
        super().__init__(
            f"seed {schedule.seed} failed at step {step}: {cause}\n{lines}\n"
            f"replay: .venv/bin/python -m tests.simulation --seed {schedule.seed} "
            f"--steps {len(schedule.steps) - 3}  (add --shrink for its fewest failing steps)"
        )


@dataclass
class Write:
    """One client write and what its client was told (times on the true wall clock)."""

    token: str
    machine: str  # the machine's incarnation: name#start
    mode: WriteMode
    started: float  # before the commit began
    commit_began: float | None = None  # when COMMIT was called
    committed: float | None = None  # when the commit returned
    commit_order: int | None = None  # the commit's place among the run's events
    acked: float | None = None  # when the client was told it is in the bucket
    holding: str | None = None  # the incarnation and lease generation it committed under


@dataclass(frozen=True)
class RolledBack:
    """A rollback that was published: to which moment, when it ran, and the time its
    snapshot carries (the bucket's clock, after all history: it takes effect then)."""

    to: float
    began: float
    done: float
    stamped: float


@dataclass
class Outcome:
    """What a run did: steps, faults by kind, invariant checks, writes, and its trace."""

    seed: int
    steps: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    writes: int = 0
    acked: int = 0
    trace: list[str] = field(default_factory=list)
    iterations: int = 0  # of the event loop
    virtual_seconds: float = 0.0
    # (6) The most any machine did: bucket attempts and loop callbacks in a simulated
    # second, bytes of one answer in memory, and CPU milliseconds of one callback (the
    # last is CPU time, so not part of the trace).
    peaks: dict[str, float] = field(default_factory=dict)


class SimTenantDB(TenantDB):
    """The real TenantDB, whose state moves also go into the trace."""

    trace: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mover = self._mover
        move = mover.move

        def traced(role: Role) -> None:
            loop = asyncio.get_running_loop()
            machine = self.settings.machine_id
            self.trace.append(f"{loop.time():.6f} {machine} {mover.state} -> {role.state}")
            move(role)

        mover.move = traced  # type: ignore[method-assign]


async def _token_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the middleware: store the body as a token, answer ``ok``."""
    message = await receive()
    db = scope["state"]["db"]
    token = message["body"].decode()
    await db.execute("INSERT INTO sim_tokens (token) VALUES (?)", (token,))
    if token.endswith(("3", "7")):
        # A fifth of the requests undo part of their transaction, as an ORM does, with a
        # comment in the statement: the commit after it still counts.
        await db.execute("SAVEPOINT undo")
        await db.execute("INSERT INTO sim_tokens (token) VALUES (?)", (f"{token}-undone",))
        await db.execute("ROLLBACK /* the ORM's comment */ TO undo")
        await db.execute("RELEASE undo")
    scope["state"]["on_commit_begin"]()
    await db.commit()
    scope["state"]["on_commit"]()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _gateway(settings: Settings) -> TenantDBMiddleware:
    """The middleware's request path alone (``_serve_own``: the lending and the output
    gate); its lifespan (bucket, router, process exit) is not part of a simulated machine."""
    gateway = TenantDBMiddleware.__new__(TenantDBMiddleware)
    gateway.app = _token_app
    gateway.settings = settings
    gateway.metrics = Metrics()
    gateway._running = InFlight()
    gateway._handed_back_holds = 0
    gateway.replica_reads = None  # the simulated machines serve no reads as replicas
    return gateway


class Machine:
    """One machine: its settings, its view of the bucket, and its TenantDB while it runs."""

    def __init__(self, name: str, root: Path, sim: SimBucket, loop: SimLoop) -> None:
        self.name = name
        self.sim = sim
        self.loop = loop
        self.settings = Settings(
            tenant=TENANT,
            machine_id=name,
            data_dir=root / name,
            prefix=PREFIX,
            lease_ttl=3,
            sync_interval=0.05,
            follow_interval=0.05,
            checkpoint_interval=0,
            kill_timeout=4,
            handoff_wait=1,
            durability="bucket",
            durability_timeout=WRITE_TIMEOUT,
        )
        object.__setattr__(self.settings, "lease_ttl", TTL)
        # Garbage collection runs (loop.SIM_GC_INTERVAL): the retention is its floor of
        # four TTLs, and only the newest snapshot is kept past it.
        object.__setattr__(self.settings, "retention", RETENTION)
        object.__setattr__(self.settings, "snapshot_retention", 1)
        self.view: BucketView = sim.view(name)
        self.tdb: SimTenantDB | None = None
        self.gateway = _gateway(self.settings)
        self.incarnation = f"{name}#0"
        self._starts = itertools.count(1)
        self.context = contextvars.copy_context()
        self.context.run(CURRENT.set, name)

    def spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        """Run ``coro`` as this machine's code (frozen and killed with it)."""
        return self.loop.create_task(coro, context=self.context.copy())  # type: ignore[arg-type]

    async def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` as this machine's code and wait for it (CancelledError if killed)."""
        task = self.spawn(coro)
        await asyncio.wait({task})
        return task.result()

    async def start(self) -> str:
        if self.tdb is not None:
            return "already running"
        self.view = self.sim.view(self.name)
        self.incarnation = f"{self.name}#{next(self._starts)}"
        tdb = SimTenantDB(self.settings, migrations=MIGRATIONS, bucket=_through(self.view))
        tdb.trace = self.sim.trace
        self.tdb = tdb
        try:
            async with asyncio.timeout(LIFECYCLE_TIMEOUT):
                await self.run(tdb.start(standby=True))
        except (TenantDBError, TimeoutError) as exc:
            await self.crash()
            return f"start failed: {type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            return "killed while starting"
        return tdb.state

    async def stop(self) -> str:
        if self.tdb is None:
            return "not running"
        if self.loop.frozen(self.name):
            self.loop.thaw(self.name)
        try:
            async with asyncio.timeout(LIFECYCLE_TIMEOUT):
                await self.run(self.tdb.stop())
        except TimeoutError:
            await self.crash()
            return "stop timed out: killed"
        self.tdb = None
        return "stopped"

    async def crash(self) -> str:
        """SIGKILL, as near as one process gets (see the module's docstring)."""
        if self.tdb is None:
            return "not running"
        tdb, self.tdb = self.tdb, None
        self.view.cut()
        if self.loop.frozen(self.name):
            self.loop.thaw(self.name)  # so that its tasks meet their cancellation
        tasks = self.loop.tasks_of(self.name)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await tdb._close_database()
        tdb._dir_lock.release()
        return "crashed"

    def serves(self) -> bool:
        """Whether this machine says it serves, judged in its own context: its clocks (a
        lease read on another machine's wall clock would age, and never grow young again)."""
        tdb = self.tdb
        return tdb is not None and self.context.run(lambda: tdb.serving)

    async def tokens(self) -> set[str] | None:
        """The tokens in this machine's database, if it serves."""
        if self.tdb is None or not self.serves():
            return None
        try:
            async with (
                self.tdb.connection() as db,
                db.execute("SELECT token FROM sim_tokens") as cur,
            ):
                return {row[0] for row in await cur.fetchall()}
        except (TenantDBError, sqlite3.Error, ValueError):
            # (ValueError: aiosqlite's "Connection closed", the pool closed as it stepped down)
            return None


def _tokens_in_file(path: Path, where: str) -> set[str]:
    """The tokens of a restored database, which must be a sound one (2): pages of two
    different states mixed make a file SQLite calls malformed, or one missing rows."""
    conn = sqlite3.connect(path)
    try:
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise InvariantViolated(
                    "restore_matches_model", f"{where} is not a sound database: {problems[:3]}"
                )
            rows = conn.execute("SELECT token FROM sim_tokens").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # before the migration: an empty database
                return set()
            raise
        except sqlite3.DatabaseError as exc:
            raise InvariantViolated(
                "restore_matches_model", f"{where} is not a sound database: {exc}"
            ) from exc
        return {row[0] for row in rows}
    finally:
        conn.close()


def _outside_checkpoint(path: Path) -> str:
    """Another process's connection checkpoints the WAL into the database file."""
    conn = sqlite3.connect(path, timeout=0)
    try:
        busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return f"checkpoint busy={busy} frames={frames} done={done}"
    except sqlite3.Error as exc:
        return f"checkpoint refused: {exc}"
    finally:
        conn.close()


class Simulation:
    """One schedule's run: machines, bucket, model, and the checks after every step."""

    def __init__(self, schedule: Schedule, root: Path, loop: SimLoop) -> None:
        self.schedule = schedule
        self.root = root
        self.loop = loop
        self.sim = SimBucket(
            rng=random.Random(schedule.fault_seed()),
            skew=schedule.skew,
            clock=loop.true_wall,
            epoch=EPOCH,
        )
        self.machines = [
            Machine(f"m{n + 1}", root, self.sim, loop) for n in range(schedule.machines)
        ]
        self._names = {m.name for m in self.machines}  # the bounded: tools are not
        if REAL_DISK_FULL:
            for machine in self.machines:
                tmpfs.mount_disk(machine.settings.data_dir)
        self.writes: list[Write] = []
        self.rollbacks: list[RolledBack] = []
        self.outcome = Outcome(schedule.seed, trace=self.sim.trace)
        self.began = loop.true_wall()
        self._tokens = itertools.count(1)
        self._restores = itertools.count(1)
        self._seen_landed = 0
        self._carried_segments: dict[str, bytes] = {}
        self._rng = random.Random(f"run:{schedule.seed}")
        self._order = itertools.count(1)  # orders events of the same virtual instant
        # The largest error of any machine's wall clock so far: segment times are the
        # holder's clock, so a point-in-time restore is exact only to within it.
        self.clock_error = 0.0
        self.overlap: tuple[float, list[str]] | None = None  # two machines serving at once
        # Answers not checked yet: the bucket's version and objects then, and the tokens.
        self._answers: list[tuple[int, dict[str, _Object], list[str]]] = []

    def now(self) -> float:
        """The true wall clock (the model's)."""
        return self.loop.true_wall()

    def serving_now(self) -> list[str]:
        """The machines that would serve a request now, each judged on its own clock (a
        frozen one serves nothing until it runs again)."""
        return [
            m.name
            for m in self.machines
            if m.tdb is not None and not self.loop.frozen(m.name) and m.serves()
        ]

    async def _watch_holders(self) -> None:
        """(3) At most one machine serves at any simulated moment, checked every
        ``WATCH_INTERVAL`` (a machine that serves a stale read or takes a write while
        another holds the lease is the fencing failure)."""
        while True:
            serving = self.serving_now()
            if len(serving) > 1 and self.overlap is None:
                self.overlap = (self.now() - self.began, serving)
            await asyncio.sleep(WATCH_INTERVAL)

    async def run(self) -> Outcome:
        """Run every step, check after each; SimulationFailed on the first violation."""
        step_number = 0
        watcher = asyncio.create_task(self._watch_holders())
        try:
            for step_number, step in enumerate(self.schedule.steps):
                self._reseed(self.schedule.number(step_number))
                result = await self._do(step)
                line = f"{step} -> {result}"
                self.outcome.steps.append(line)
                self.sim.trace.append(f"{self.loop.time():.6f} step {line}")
                await self.check(f"after step {step_number}")
            step_number += 1
            self.outcome.steps.append(f"final: {await self._final()}")
        except Exception as exc:  # an invariant, or any error a step should not raise
            raise SimulationFailed(self.schedule, step_number, self.outcome.steps, exc) from exc
        finally:
            watcher.cancel()
            for machine in self.machines:
                await machine.crash()
                if REAL_DISK_FULL:
                    tmpfs.unmount_disk(machine.settings.data_dir)
            self.outcome.faults.update(self.sim.faults)
            deleted = [w for w in self.sim.landed if w.operation == "delete"]
            self.outcome.events["objects collected"] += len(deleted)
            self.outcome.iterations = self.loop.iterations
            self.outcome.virtual_seconds = self.loop.time()
            self.outcome.peaks = {
                "bucket attempts/s": max(
                    (n for (c, _), n in self.sim.rates.items() if c in self._names), default=0
                ),
                "loop callbacks/s": max(self.loop.callbacks.values(), default=0),
                "answer bytes": max(
                    (n for c, n in self.sim.largest_body.items() if c in self._names), default=0
                ),
                "callback CPU ms": round(self.loop.longest_callback[0] * 1000, 1),
            }
        return self.outcome

    def _reseed(self, number: int) -> None:
        """Every draw of step ``number`` comes from its own seed (see ``Schedule.numbers``)."""
        seed = self.schedule.seed
        self.sim.rng.seed(f"faults:{seed}:{number}")
        self.loop.rng.seed(f"threads:{seed}:{number}")
        self._rng.seed(f"run:{seed}:{number}")
        random.seed(f"random:{seed}:{number}")

    async def _final(self) -> str:
        """Stop every machine, then a full restore must hold every acknowledged write."""
        for machine in self.machines:
            await machine.stop()
        await self.check("after the final stop")
        return await self._restore_now("the final restore")

    # --- steps -----------------------------------------------------------------------------

    def _machine(self, step: Step) -> Machine:
        return self.machines[step.machine % len(self.machines)]

    async def _do(self, step: Step) -> str:
        self.outcome.events[step.kind] += 1
        match step.kind:
            case "write":
                return await self._write_step(step.count)
            case "checkpoint":
                return await self._checkpoint()
            case "start":
                return await self._machine(step).start()
            case "stop":
                return await self._machine(step).stop()
            case "crash":
                return await self._crash(self._machine(step), step)
            case "pause" | "suspend":
                return await self._pause(self._machine(step), step)
            case "restore_at":
                return await self._restore_at(step)
            case "restore_now":
                return await self._restore_now(f"restore {next(self._restores)}")
            case "faults":
                assert step.plan is not None
                self.sim.plan = step.plan
                # Drawn when the step runs (the schedules stay as they were): rarely, a
                # LIST lags behind the newest keys, as a cross-region LIST may.
                lag = self._rng.choice(LIST_LAGS) if self._rng.random() < 0.2 else 0.0
                self.sim.list_lag = lag
                return f"set, list lag {lag:g}s" if lag else "set"
            case "hostile":
                return self._hostile()
            case "clock_jump":
                offsets = self.loop.wall_offset
                name = self._machine(step).name
                offsets[name] = offsets.get(name, 0.0) + step.seconds
                self.clock_error = max(self.clock_error, abs(offsets[name]))
                return f"{name}'s wall clock is {offsets[name]:+.1f}s off"
            case "outside_checkpoint":
                return await self._outside_checkpoint(self._machine(step))
            case "disk_full":
                return await self._disk_full(self._machine(step), step)
            case "rollback":
                return await self._rollback(step)
        raise AssertionError(step.kind)  # pragma: no cover

    def serving(self) -> list[Machine]:
        """The machines that say they serve now."""
        return [m for m in self.machines if m.serves()]

    async def _wait_serving(self) -> list[Machine]:
        deadline = self.loop.time() + SERVING_WAIT
        while not self.serving() and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.serving()

    async def _write_step(self, count: int) -> str:
        serving = await self._wait_serving()
        if not serving:
            return "no machine serves"
        answers = await asyncio.gather(
            *(self.write(serving[n % len(serving)]) for n in range(count))
        )
        return f"{sum(answers)}/{count} acknowledged on {', '.join(m.name for m in serving)}"

    async def _checkpoint(self) -> str:
        """A full snapshot on a machine that serves: the log's new base."""
        for machine in self.serving():
            assert machine.tdb is not None
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    made = await machine.run(machine.tdb.checkpoint())
            except (TenantDBError, sqlite3.Error, TimeoutError, asyncio.CancelledError) as exc:
                self.outcome.events[f"checkpoint refused: {type(exc).__name__}"] += 1
                return f"refused on {machine.name}: {type(exc).__name__}: {exc}"
            return f"{'snapshot' if made else 'nothing new'} on {machine.name}"
        return "no machine serves"

    async def write(
        self, machine: Machine, mode: WriteMode | None = None, *, large: bool = False
    ) -> bool:
        """One client write with a unique token, in ``mode`` (drawn if None): True if the
        client was told it is in the bucket. A ``large`` token needs new pages."""
        tdb = machine.tdb
        assert tdb is not None
        chosen: WriteMode = mode or self._rng.choice(("request", "request", "sync", "async"))
        token = f"t{self.schedule.seed}-{next(self._tokens)}"
        if large:
            token += "-" + "x" * 3000
        write = Write(token, machine.incarnation, chosen, self.now())
        self.writes.append(write)
        self.outcome.writes += 1
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                if chosen == "request":
                    answered = await machine.run(self._request(machine, tdb, write))
                else:
                    answered = await machine.run(self._commit(tdb, write, sync=chosen == "sync"))
        except (TenantDBError, sqlite3.Error, TimeoutError, asyncio.CancelledError) as exc:
            self.outcome.events[f"write refused: {type(exc).__name__}"] += 1
            return False
        if answered:
            self.outcome.acked += 1
        return answered

    def _answered(self, write: Write) -> None:
        """The client is told ``write`` is in the bucket: keep the bucket as it is now, to
        check that it is (``check``)."""
        write.acked = self.now()
        version = len(self.sim.landed)
        if not self._answers or self._answers[-1][0] != version:
            self._answers.append((version, self.sim.copy_objects(), []))
        self._answers[-1][2].append(write.token)

    def _commit_begins(self, write: Write) -> None:
        write.commit_began = self.now()

    def _committed(self, write: Write) -> None:
        write.committed = self.now()
        write.commit_order = next(self._order)
        self.outcome.events[f"{write.mode} write committed"] += 1

    async def _commit(self, tdb: TenantDB, write: Write, *, sync: bool) -> bool:
        async with tdb.connection() as db:
            await db.execute("INSERT INTO sim_tokens (token) VALUES (?)", (write.token,))
            self._commit_begins(write)
            await db.commit()
        self._committed(write)
        write.holding = _holding(write.machine, tdb)
        if not sync:
            return False  # async durability: the client is told nothing about the bucket
        await self._sync(tdb, write.holding)
        return True

    async def _sync(self, tdb: TenantDB, holding: str) -> None:
        """``tdb.sync()``: it vouches for every commit of ``holding`` before it began (not
        for those of an earlier one that was fenced: the machine then follows the new
        holder), whoever committed them."""
        began = next(self._order)
        await tdb.sync()
        for other in self.writes:
            if (
                other.holding == holding
                and other.acked is None
                and other.commit_order is not None
                and other.commit_order < began
            ):
                self._answered(other)

    async def _request(self, machine: Machine, tdb: TenantDB, write: Write) -> bool:
        """A POST through the middleware's request path and its output gate."""
        sent: list[Message] = []
        scope: Scope = {
            "type": "http",
            "method": "POST",
            "path": f"/customers/{TENANT}/tokens",
            "headers": [],
            "query_string": b"",
            "state": {
                "on_commit_begin": lambda: self._commit_begins(write),
                "on_commit": lambda: self._committed(write),
            },
        }

        async def receive() -> Message:
            return {"type": "http.request", "body": write.token.encode(), "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        if not tdb.serving:
            return False
        try:
            await machine.gateway._serve_own(scope, receive, send, tdb)
        except (TenantDBError, sqlite3.Error) as exc:
            self.outcome.events[f"request failed: {type(exc).__name__}"] += 1
            return False
        status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
        self.outcome.events[f"request answered {status}"] += 1
        if status != 200 or sent[-1].get("body") != b"ok":
            return False
        self._answered(write)
        return True

    async def _crash(self, machine: Machine, step: Step) -> str:
        """Crash the machine ``step.count`` loop iterations into ``step.count`` writes on it
        (or at once): SIGKILL at whichever await each of its tasks stands."""
        if not step.count or not machine.serves():
            return await machine.crash()
        writing = asyncio.gather(*(self.write(machine) for _ in range(step.count)))
        await self.loop.after_iterations(step.iterations)
        crashed = await machine.crash()
        answered = sum(await writing)
        return (
            f"{crashed} {step.iterations} iterations in, with {answered}/{step.count} writes "
            "acknowledged"
        )

    async def _pause(self, machine: Machine, step: Step) -> str:
        """Freeze the whole machine (SIGSTOP; a suspend also stops its monotonic clock);
        the other machines and their clients go on."""
        if machine.tdb is None:
            return "not running"
        when = "at once"
        if step.count:
            # Stopped right after its next lease write landed, before the answer came.
            landed = asyncio.Event()
            machine.view.after_landing = landed.set
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TTL):
                    await landed.wait()
            machine.view.after_landing = None
            if machine.tdb is None:
                return "gone meanwhile"
            when = "after a lease write landed" if landed.is_set() else "at once (no write)"
        self.loop.freeze(machine.name, clock_stops=step.kind == "suspend")
        others = [m for m in self.serving() if m is not machine]
        writing = asyncio.gather(*(self.write(m) for m in others))
        await asyncio.sleep(step.seconds)
        self.loop.thaw(machine.name)
        await writing
        await asyncio.sleep(0.01)  # let it notice
        return f"stopped {when}; resumed as {machine.tdb.state if machine.tdb else 'gone'}"

    async def _outside_checkpoint(self, machine: Machine) -> str:
        if machine.tdb is None or not machine.tdb.path.exists():
            return "no database"
        if self._rng.random() < 0.5:
            return await self._app_restarts_the_wal(machine)
        return _outside_checkpoint(machine.tdb.path)

    async def _app_restarts_the_wal(self, machine: Machine) -> str:
        """Right after tenantdb's own checkpoint (its next WAL restart expected), another
        process commits, checkpoints and commits again before the shipper reads: two
        restarts, the first WAL never read. Large writes grow the WAL to the checkpoint's
        size first; a ``tdb.sync()`` after vouches for the app's commits too."""
        tdb = machine.tdb
        shipper = tdb._shipper if tdb is not None and machine.serves() else None
        if tdb is None or shipper is None:
            return "not serving"
        struck: list[str] = []
        checkpoint = shipper._checkpoint

        def then_the_app() -> None:
            checkpoint()
            if not struck and shipper._restart_expected:
                struck.append(self._app_commits_around_a_checkpoint(machine, tdb))

        shipper._checkpoint = then_the_app  # type: ignore[method-assign]
        try:
            for _ in range(APP_WAL_WRITES):
                if struck or machine.tdb is not tdb:
                    break
                await self.write(machine, "sync", large=True)
                await asyncio.sleep(2 * machine.settings.sync_interval)  # its loop checkpoints
        finally:
            del shipper._checkpoint
        if not struck:
            return "tenantdb did not checkpoint"
        if machine.tdb is not tdb or not machine.serves():
            return f"{struck[0]}; then it stopped serving"
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await machine.run(self._sync(tdb, _holding(machine.incarnation, tdb)))
        except (TenantDBError, TimeoutError, asyncio.CancelledError) as exc:
            return f"{struck[0]}; a sync after: {type(exc).__name__}"
        return f"{struck[0]}; a sync after returned"

    def _app_commits_around_a_checkpoint(self, machine: Machine, tdb: TenantDB) -> str:
        """Another process's connection: a token, ``wal_checkpoint(RESTART)``, then a commit
        of page 1 alone (``application_id``), blocking, so no shipper reads in between.
        Only the first WAL holds the token's pages."""
        self.outcome.faults["app_wal_restarts"] += 1
        conn = sqlite3.connect(tdb.path, timeout=0, isolation_level=None)
        write = Write(
            f"t{self.schedule.seed}-{next(self._tokens)}-app",
            machine.incarnation,
            "outside",
            self.now(),
        )
        write.commit_began = write.started
        try:
            conn.execute("INSERT INTO sim_tokens (token) VALUES (?)", (write.token,))
            self.writes.append(write)
            self._committed(write)
            write.holding = _holding(write.machine, tdb)
            busy, frames, moved = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            conn.execute(f"PRAGMA application_id = {len(self.writes)}")
        except sqlite3.Error as exc:
            return f"the app after tenantdb's checkpoint: refused: {exc}"
        finally:
            conn.close()
        return (
            f"the app after tenantdb's checkpoint: a commit, checkpoint busy={busy} "
            f"frames={frames} done={moved}, a commit"
        )

    async def _disk_full(self, machine: Machine, step: Step) -> str:
        """The machine's disk is full for ``step.seconds``: its connections cannot grow the
        database (SQLite's ``database or disk is full``) while clients write."""
        tdb = machine.tdb
        if tdb is None or not machine.serves():
            return "not serving"
        pool = tdb.pool

        async def limit(pages: int | None) -> None:
            for conn in list(pool._opened):
                with contextlib.suppress(sqlite3.Error, ValueError):
                    if pages is None:
                        async with conn.execute("PRAGMA page_count") as cur:
                            row = await cur.fetchone()
                        assert row is not None
                        await conn.execute(f"PRAGMA max_page_count = {row[0]}")
                    else:
                        await conn.execute(f"PRAGMA max_page_count = {pages}")

        if REAL_DISK_FULL:
            ballast = tmpfs.fill(machine.settings.data_dir)  # ENOSPC from the filesystem
            self.outcome.faults["real_disk_full"] += 1
        else:
            await machine.run(limit(None))
        writes = (self.write(machine, large=True) for _ in range(step.count))
        answers = await asyncio.gather(*writes)
        await asyncio.sleep(step.seconds)
        if REAL_DISK_FULL:
            ballast.unlink()
        elif machine.tdb is tdb:
            await machine.run(limit(FULL_DISK_PAGES))
        return f"{sum(answers)}/{step.count} acknowledged while full; now {tdb.state}"

    async def _rollback(self, step: Step) -> str:
        """The operator's rollback to a moment of the run, as the docs say to run it: the
        machines stopped first, started again after."""
        running = [m for m in self.machines if m.tdb is not None]
        for machine in running:
            await machine.stop()
        began = self.now()
        moment = self.began + step.fraction * (began - self.began)
        work_dir = self.root / "rollback"
        work_dir.mkdir(exist_ok=True)
        # The operator's laptop, whose clock is OPERATOR_CLOCK_ERROR behind.
        operator = contextvars.copy_context()
        operator.run(CURRENT.set, "operator")
        self.loop.wall_offset["operator"] = OPERATOR_CLOCK_ERROR
        # Named as its lease names it: its release is the holder's own write.
        client = f"rollback@{socket.gethostname()}"
        landed_before = len(self.sim.landed)
        call = rollback(
            self.machines[0].settings,
            self.sim.view(client),
            datetime.fromtimestamp(moment, UTC),
            work_dir=work_dir,
        )
        result = None
        try:
            result = await self.loop.create_task(call, context=operator)
        except LeaseHeldError:
            outcome = "refused: the lease is held"
        except LeaseLostError as exc:
            # Its renewals failed under the faults (a 1 s TTL): it stops without publishing.
            self.outcome.events["rollback lost its lease"] += 1
            outcome = f"lost its lease: {exc}"
        except TenantDBError as exc:
            kind = self._failure_kind(exc, "rollback", moment, began)
            self.outcome.events[f"rollback {kind}"] += 1
            outcome = f"{kind}: {exc}"
        else:
            outcome = f"to +{moment - self.began:.3f}s as generation {result.generation}"
        # What the bucket says, not the command: a rollback whose last answer was lost
        # may have been published all the same (the model must know it took effect).
        stamped = self._published_rollback(client, landed_before)
        if stamped is not None:
            self.rollbacks.append(RolledBack(moment, began, self.now(), stamped))
            self.outcome.events["rollback published"] += 1
            if result is None:
                self.outcome.events["rollback published, reported failed"] += 1
                outcome += " (yet published)"
        elif result is not None:
            raise InvariantViolated(
                "restore_matches_model",
                f"the rollback reported {result.snapshot} published; no lock.json names it",
            )
        started = [await machine.start() for machine in running]
        return f"{outcome}; restarted: {', '.join(started) or 'none'}"

    def _published_rollback(self, client: str, since: int) -> float | None:
        """The stamp of the snapshot a rollback by ``client`` published (a landed write of
        lock.json, from the ``since``-th landed write on, naming a snapshot of its own
        generation), if it did."""
        for write in self.sim.landed[since:]:
            if write.client != client or write.key != LOCK_KEY or write.body is None:
                continue
            record = LockRecord.parse(write.body, tenant=TENANT, key=LOCK_KEY)
            name = SnapshotName.parse(record.snapshot.key) if record.snapshot else None
            if name is not None and name.generation == record.generation:
                assert name.taken_ms is not None, record.snapshot
                return name.taken_ms / 1000
        return None

    # --- the model -------------------------------------------------------------------------

    def _in_state(
        self, write: Write, moment: float, rollbacks: list[RolledBack], *, exact: bool
    ) -> bool | None:
        """Whether ``write`` is in the state at ``moment`` (None: either is right).

        The latest rollback that took effect by then decides for the writes before it: the
        state it published is the state at its ``to``, by the same rule with the rollbacks
        before it. A rollback's time is the bucket's clock and a segment's the holder's,
        so near a rollback (within the skew and the clocks' error) both outcomes are
        right unless they agree. ``exact``: ``moment`` is now, not a time in the history.
        """
        margin = 0.002 + self.clock_error + abs(self.schedule.skew.total_seconds())
        for position in range(len(rollbacks) - 1, -1, -1):
            rolled, before = rollbacks[position], rollbacks[:position]
            if moment < rolled.began - margin:
                continue  # certainly not in effect yet
            if write.started >= rolled.began:
                after = self._plain(write, moment, exact=exact)
            else:
                after = self._in_state(write, rolled.to, before, exact=False)
            if exact or moment > rolled.done + margin:
                return after
            without = self._in_state(write, moment, before, exact=exact)
            return after if after == without else None
        return self._plain(write, moment, exact=exact)

    def _plain(self, write: Write, moment: float, *, exact: bool) -> bool | None:
        """Whether ``write`` is in the state at ``moment`` with no rollback in the way."""
        # A segment's time is taken after its commits and before their answers, rounded
        # up to the millisecond (never before a commit), on the holder's clock.
        slack = 0.0 if exact else 0.001 + self.clock_error
        if write.acked is not None and write.acked <= moment - slack:
            # A write on top of a rollback is in the history from the rollback's stamp on,
            # which may come after the write (up to the bucket's skew): either is right.
            under = [r.stamped for r in self.rollbacks if r.began <= write.started]
            return True if exact or max(under, default=0.0) <= moment - slack else None
        if not exact and (write.commit_began or write.started) > moment + self.clock_error:
            return False
        return None

    def required_at(self, moment: float, *, exact: bool = False) -> set[str]:
        """The tokens the state at ``moment`` must hold."""
        return {
            w.token
            for w in self.writes
            if self._in_state(w, moment, self.rollbacks, exact=exact) is True
        }

    def forbidden_at(self, moment: float) -> set[str]:
        """The tokens the state at ``moment`` must not hold."""
        return {
            w.token
            for w in self.writes
            if self._in_state(w, moment, self.rollbacks, exact=False) is False
        }

    def collectable(self, moment: float) -> bool:
        """Whether garbage collection may have taken what a restore as of ``moment`` needs:
        the moment is older than the retention, give or take the clocks' errors (the
        collector's cutoff is the holder's clock; Last-Modified is the bucket's, to the
        second)."""
        margin = 1.0 + self.clock_error + abs(self.schedule.skew.total_seconds())
        return moment < self.now() - RETENTION + margin

    def _failure_kind(
        self, exc: BaseException, where: str, moment: float | None, began: float
    ) -> str:
        """What a failed restore (or rollback) as of ``moment`` begun at ``began`` was:
        a named failure, a refusal, or (raised) a broken invariant."""
        if self._listed_late(exc, began):
            return "refused_list_lag"
        collectable = moment is not None and self.collectable(moment)
        return invariants.restore_failure_is_named(exc, where, collectable=collectable)

    def _listed_late(self, exc: BaseException, began: float) -> bool:
        """Whether a restore begun at ``began`` failed because a lagging LIST hid keys
        created too recently: the segment it names as missing is such a key, or it found
        no history before its moment while such keys exist. It failed, as it should on a
        bucket that lags (never older)."""
        if not self.sim.list_lag:
            return False
        named = _NAMED_MISSING.search(str(exc))
        if isinstance(exc, ListingBehindError):
            pattern, index = exc.key, 0
        elif named is not None:
            pattern, index = named[2], int(named[1])
        elif isinstance(exc, PointInTimeError) and "future" not in str(exc):
            pattern, index = f"{PREFIX}{TENANT}/*", 0
        else:
            return False

        def hides(key: str) -> bool:
            if fnmatch.fnmatchcase(key, pattern):
                return True
            # A segment a pack (or a merge) holds is under the range's key.
            chunk = parse_chunk_key(key)
            return chunk is not None and chunk.first <= index <= chunk.last

        hidden_since = began - self.sim.list_lag
        return any(
            hides(key) and obj.created >= hidden_since for key, obj in self.sim.objects.items()
        )

    async def _restore(self, at: datetime | None, where: str) -> set[str] | str:
        dest = self.root / "restores" / f"{next(self._restores)}.sqlite3"
        dest.parent.mkdir(exist_ok=True)
        self.outcome.checks["published_objects_present"] += 1
        began = self.now()
        try:
            operator = _through(self.sim.view("operator"))
            await pitr.restore_at(operator, TENANT, dest, prefix=PREFIX, at=at)
        except Exception as exc:
            moment = at.timestamp() if at is not None else None
            kind = self._failure_kind(exc, where, moment, began)
            self.outcome.events[f"restore {kind}"] += 1
            return f"{kind}: {exc}"
        return _tokens_in_file(dest, where)

    async def _restore_now(self, where: str) -> str:
        """A ``tenantdb verify``-style full restore: every write acknowledged so far."""
        required = self.required_at(self.now(), exact=True)
        found = await self._restore(None, where)
        if isinstance(found, str):
            return found
        self.outcome.checks["acknowledged_writes_survive"] += 1
        invariants.acknowledged_writes_survive(required, found, where)
        return f"{len(found)} tokens, {len(required)} required"

    async def _restore_at(self, step: Step) -> str:
        now = self.now()
        moment = (
            now - step.seconds if step.seconds else self.began + step.fraction * (now - self.began)
        )
        began = [w.commit_began for w in self.writes if w.commit_began is not None]
        if step.count and began:
            # Just before a commit: where a segment time a hair early would show it.
            position = step.fraction * len(began)
            # (a fraction drawn as 1.000 means the last commit, not one past it)
            moment = began[min(int(position), len(began) - 1)] - (position % 1) * 0.0005
        # A rollback is stamped on the bucket's clock (past all history): a skewed bucket
        # puts it up to the skew away from when it ran.
        margin = 0.002 + self.clock_error + abs(self.schedule.skew.total_seconds())
        if any(r.began - margin <= moment <= r.done + margin for r in self.rollbacks):
            return "skipped: a moment while a rollback ran"
        # A segment's time is taken after its commits and before their answers, rounded up
        # to the millisecond (so never before a commit), on the holder's clock.
        required = self.required_at(moment)
        forbidden = self.forbidden_at(moment)
        where = f"restore as of +{moment - self.began:.3f}s"
        found = await self._restore(datetime.fromtimestamp(moment, UTC), where)
        if isinstance(found, str):
            if found.startswith("refused_before_history") and required:
                if self.collectable(moment):
                    return found  # older than the retention: collected, as it may be
                # History within the retention that held acknowledged writes at that
                # moment can only have been lost.
                raise InvariantViolated(
                    "published_objects_present",
                    f"{where} is refused, though {len(required)} write(s) were acknowledged "
                    f"by then: {found}",
                )
            return found
        self.outcome.checks["restore_matches_model"] += 1
        invariants.restore_matches_model(required, forbidden, found, where)
        return f"{len(found)} tokens, {len(required)} required, {len(forbidden)} forbidden"

    def _hostile(self) -> str:
        """Plant a hostile object where the protocol will look, or damage a segment."""
        rng = random.Random(f"hostile:{self.schedule.seed}:{len(self.outcome.steps)}")
        lock = self.sim.objects.get(LOCK_KEY)
        if lock is None:
            return "no lock.json yet"
        record = LockRecord.parse(lock.body, tenant=TENANT, key=LOCK_KEY)
        tail = record.log.tail if record.log is not None else 0
        choice = rng.randrange(4)
        uploaded = sorted(k for k, w in self._last_writers().items() if k.endswith(".seg"))
        if choice == 3 and uploaded:
            # Rot at rest: restores and takeovers that need it must fail naming it.
            key = rng.choice(uploaded)
            self.sim.damage(key)
            return f"damaged {key}"
        if choice == 0:
            key = takeover_key(PREFIX, TENANT, record.generation + 1)
            self.sim.plant(key, b'{"generation": "not a number"}')
        elif choice == 1:
            # The size of the newest segment: the next ones of a steady workload match it.
            segments = [k for k in self.sim.objects if k.endswith(".seg")]
            size = len(self.sim.objects[max(segments)].body) if segments else 64
            key = segment_key(PREFIX, TENANT, record.generation, tail + 3)
            self.sim.plant(key, rng.randbytes(size))
        else:
            key = f"{PREFIX}{TENANT}/log/{record.generation:08d}/junk"
            self.sim.plant(key, b"\xff" * 32)
        return f"planted {key}"

    # --- invariants ------------------------------------------------------------------------

    def _last_writers(self) -> dict[str, str]:
        """The machine (or "hostile") whose write of each stored key landed last."""
        stored = self.sim.objects
        return {w.key: w.client for w in self.sim.landed if w.key in stored}

    def _carried(self) -> dict[str, bytes]:
        """Every segment any landed lock.json carried inline, by key (parsed once each)."""
        for write in self.sim.landed[self._seen_landed :]:
            if write.key == LOCK_KEY and write.body is not None:
                self._carried_segments.update(_carried_by(write.body))
        self._seen_landed = len(self.sim.landed)
        return self._carried_segments

    async def _check_answers(self, where: str) -> None:
        """(1) Every write was in the bucket when its client was told so: a full restore of
        the bucket as it was then holds it."""
        answers, self._answers = self._answers, []
        for version, objects, tokens in answers:
            dest = self.root / "restores" / f"answer-{version}.sqlite3"
            dest.parent.mkdir(exist_ok=True)
            found = await _restored_tokens(objects, dest, where)
            if found is None:
                continue
            invariants.acknowledged_writes_survive(
                tokens, found, f"the bucket when they were answered ({where})"
            )
            self.outcome.checks["acknowledged_writes_survive"] += 1

    async def check(self, where: str) -> None:
        """Every invariant, on the state now."""
        checks = self.outcome.checks
        invariants.one_machine_serves_at_a_time(self.overlap)
        checks["one_machine_serves_at_a_time"] += 1
        versions = invariants.lock_versions(self.sim.landed, LOCK_KEY)
        invariants.one_live_lease_at_a_time(versions)
        checks["one_live_lease_at_a_time"] += 1
        copies = {
            m.name: position
            for m in self.machines
            if (position := _standby_position(m.tdb)) is not None
        }
        invariants.standby_copies_are_published_states(copies, versions)
        checks["standby_copies_are_published_states"] += len(copies)

        lock = self.sim.objects.get(LOCK_KEY)
        if lock is not None:
            with contextlib.suppress(TenantDBError):  # a planted lock.json is not published
                record = LockRecord.parse(lock.body, tenant=TENANT, key=LOCK_KEY)
                holders: dict[int, str] = {}
                for version in versions:
                    if version.owner is not None:
                        holders.setdefault(version.generation, version.owner)
                writers = {w.key: w for w in self.sim.landed if w.body is not None}
                invariants.only_holders_publish(record, writers, holders, self._carried(), PREFIX)
                checks["only_holders_publish"] += 1

        invariants.serving_has_its_loops(
            {
                m.name: m.context.run(lambda tdb=m.tdb: (tdb.state, tdb.health()))
                for m in self.machines
                if m.tdb is not None
            }
        )
        checks["serving_has_its_loops"] += 1

        invariants.nothing_overwritten(self.sim.overwrites)  # machines and tools alike
        checks["published_objects_present"] += 1

        invariants.work_stays_bounded(
            {k: n for k, n in self.sim.rates.items() if k[0] in self._names},
            self.loop.callbacks,
            {c: n for c, n in self.sim.largest_body.items() if c in self._names},
            {c: k for c, k in self.sim.uncapped.items() if c in self._names},
            self.loop.longest_callback,
        )
        checks["work_stays_bounded"] += 1

        await self._check_answers(where)
        for machine in self.serving():
            assert machine.tdb is not None
            held = machine.tdb.lease.record
            if held is None or lock is None or held.generation != _generation(lock.body):
                continue  # a holder that has not noticed its lease is gone yet
            found = await machine.tokens()
            if found is not None:
                required = self.required_at(self.now(), exact=True)
                invariants.acknowledged_writes_survive(required, found, f"{machine.name} {where}")
                checks["acknowledged_writes_survive"] += 1


def _standby_position(tdb: TenantDB | None) -> tuple[int, str] | None:
    """Where a standby's (or replica's) copy stands, if its follower vouches for it."""
    role = tdb._mover.role if tdb is not None else None
    return role.follower.position if isinstance(role, Standby) else None


async def _restored_tokens(objects: dict[str, _Object], dest: Path, where: str) -> set[str] | None:
    """The tokens of a full restore from a bucket holding ``objects`` (None if it fails)."""
    auditor = SimBucket(objects=objects).view("auditor")
    try:
        await pitr.restore_at(auditor, TENANT, dest, prefix=PREFIX, at=None)
    except TenantDBError:
        return None  # damaged or hostile objects: the restores of the steps judge those
    return _tokens_in_file(dest, f"a full restore of the bucket as of an answer ({where})")


def _holding(incarnation: str, tdb: TenantDB) -> str:
    """Which holding of the tenant a commit on ``tdb`` belongs to."""
    record = tdb.lease.record
    return f"{incarnation}@{record.generation if record else None}"


def _carried_by(body: bytes) -> dict[str, bytes]:
    """The segments one landed lock.json carried inline, by key."""
    try:
        record = LockRecord.parse(body, tenant=TENANT, key=LOCK_KEY)
    except TenantDBError:
        return {}
    return dict(carried_segments(record, prefix=PREFIX))


def _generation(body: bytes) -> int | None:
    try:
        return LockRecord.parse(body, tenant=TENANT, key=LOCK_KEY).generation
    except TenantDBError:
        return None


def simulate(
    schedule: Schedule, root: Path, body: Callable[[Simulation], Awaitable[T]] | None = None
) -> T | Outcome:
    """Run ``body`` (the schedule's steps if None) on a fresh simulation's loop."""
    with deterministic(str(schedule.seed)) as loop:
        simulation = Simulation(schedule, root, loop)
        work = body(simulation) if body is not None else simulation.run()
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            return runner.run(work)  # type: ignore[arg-type]


def run_schedule(schedule: Schedule, root: Path) -> Outcome:
    """Run ``schedule`` with its files under ``root``: its outcome, or SimulationFailed."""
    outcome = simulate(schedule, root)
    assert isinstance(outcome, Outcome)
    return outcome
