"""The harness: real ``TenantDB`` machines of one tenant over the simulated bucket, driven
step by step by a schedule, with the invariants checked after every step.

A crash here is the nearest to SIGKILL that one process allows: the machine's bucket view
is cut (nothing more of it reaches the bucket), every task of the machine is cancelled at
whatever await it stands, its SQLite connections are closed without any publish or lease
release, and its data directory's flock is dropped; the object is abandoned. Unlike a real
SIGKILL, closing the last connection folds the WAL into the local file (SQLite's
checkpoint on close), and code between two awaits always runs to the next await.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tenantdb.config import Settings
from tenantdb.crypto import parse_keyring
from tenantdb.errors import TenantDBError
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.replication import pitr
from tenantdb.replication.history import takeover_key
from tenantdb.replication.segment import segment_key
from tenantdb.replication.shipper import carried_segments
from tenantdb.storage.base import Bucket
from tenantdb.storage.encrypted import EncryptedBucket
from tests.simulation import invariants
from tests.simulation.bucket import BucketView, SimBucket
from tests.simulation.invariants import InvariantViolated
from tests.simulation.schedule import Schedule, Step

__all__ = ["Outcome", "Simulation", "SimulationFailed", "run_schedule"]

TENANT = "acme"
PREFIX = "tenants/"
# Set (id:base64), every machine and restore goes through EncryptedBucket: the invariants
# then hold of sealed objects (`TENANTDB_SIM_ENCRYPTION_KEY=k1:... make simulate`).
_SIM_KEY = os.environ.get("TENANTDB_SIM_ENCRYPTION_KEY")
_KEYRING = parse_keyring(_SIM_KEY, variable="TENANTDB_SIM_ENCRYPTION_KEY") if _SIM_KEY else None


def _through(view: BucketView) -> Bucket:
    """The view as a machine opens it: sealed when the simulation runs encrypted."""
    return view if _KEYRING is None else EncryptedBucket(view, _KEYRING, prefix=PREFIX)


LOCK_KEY = f"{PREFIX}{TENANT}/lock.json"
# Below the 3 s production minimum (set past Settings' check): pauses past the TTL and
# takeovers after a crash then cost about two seconds, not five.
TTL = 1.0
MIGRATIONS = ["CREATE TABLE sim_tokens (token TEXT PRIMARY KEY)"]
WRITE_TIMEOUT = 3.0  # a write (commit + sync) not acknowledged by then counts as unanswered
LIFECYCLE_TIMEOUT = 10.0  # start and stop
SERVING_WAIT = TTL + 2.5  # how long a write step waits for a machine that serves


class SimulationFailed(AssertionError):
    """An invariant failed (or a step broke): the seed, the steps so far, and what broke."""

    def __init__(self, schedule: Schedule, step: int, steps: list[str], cause: BaseException):
        self.schedule = schedule
        self.cause = cause
        lines = "\n".join(f"  {n:>3} {line}" for n, line in enumerate(steps))
        super().__init__(
            f"seed {schedule.seed} failed at step {step}: {cause}\n{lines}\n"
            f"replay: .venv/bin/python -m tests.simulation --seed {schedule.seed}"
        )


@dataclass
class Write:
    """One client write and what its client was told."""

    token: str
    machine: str
    started: float  # wall clock (as segment times): before the commit began
    acked: float | None = None  # when sync() returned


@dataclass
class Outcome:
    """What a run did: steps, faults by kind, invariant checks, writes."""

    seed: int
    steps: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    writes: int = 0
    acked: int = 0


class Machine:
    """One machine: its settings, its view of the bucket, and its TenantDB while it runs."""

    def __init__(self, name: str, root: Path, sim: SimBucket) -> None:
        self.name = name
        self.sim = sim
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
        )
        object.__setattr__(self.settings, "lease_ttl", TTL)
        self.view: BucketView = sim.view(name)
        self.tdb: TenantDB | None = None

    async def start(self) -> str:
        if self.tdb is not None:
            return "already running"
        self.view = self.sim.view(self.name)
        tdb = TenantDB(self.settings, migrations=MIGRATIONS, bucket=_through(self.view))
        try:
            async with asyncio.timeout(LIFECYCLE_TIMEOUT):
                await tdb.start(standby=True)
        except (TenantDBError, TimeoutError) as exc:
            return f"start failed: {type(exc).__name__}: {exc}"
        self.tdb = tdb
        return tdb.state

    async def stop(self) -> str:
        if self.tdb is None:
            return "not running"
        tdb, self.tdb = self.tdb, None
        try:
            async with asyncio.timeout(LIFECYCLE_TIMEOUT):
                await tdb.stop()
        except TimeoutError:
            await self._abandon(tdb)
            return "stop timed out: abandoned"
        return "stopped"

    async def crash(self) -> str:
        if self.tdb is None:
            return "not running"
        tdb, self.tdb = self.tdb, None
        await self._abandon(tdb)
        return "crashed"

    async def _abandon(self, tdb: TenantDB) -> None:
        """SIGKILL, as near as one process gets (see the module's docstring)."""
        self.view.cut()
        tasks = list(tdb._supervisor.tasks)
        if tdb._failing is not None:
            tasks.append(tdb._failing)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await tdb._close_database()
        tdb._dir_lock.release()

    async def tokens(self) -> set[str] | None:
        """The tokens in this machine's database, if it serves."""
        if self.tdb is None or not self.tdb.serving:
            return None
        try:
            async with (
                self.tdb.connection() as db,
                db.execute("SELECT token FROM sim_tokens") as cur,
            ):
                return {row[0] for row in await cur.fetchall()}
        except (TenantDBError, sqlite3.Error):
            return None


def _tokens_in_file(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        try:
            rows = conn.execute("SELECT token FROM sim_tokens").fetchall()
        except sqlite3.OperationalError:  # before the migration: an empty database
            return set()
        return {row[0] for row in rows}
    finally:
        conn.close()


class Simulation:
    """One schedule's run: machines, bucket, model, and the checks after every step."""

    def __init__(self, schedule: Schedule, root: Path) -> None:
        self.schedule = schedule
        self.root = root
        self.sim = SimBucket(rng=random.Random(schedule.fault_seed()), skew=schedule.skew)
        self.machines = [Machine(f"m{n + 1}", root, self.sim) for n in range(schedule.machines)]
        self.writes: list[Write] = []
        self.outcome = Outcome(schedule.seed)
        self.began = time.time()
        self._tokens = itertools.count(1)
        self._restores = itertools.count(1)
        self._seen_landed = 0
        self._carried_segments: dict[str, bytes] = {}

    async def run(self) -> Outcome:
        """Run every step, check after each; SimulationFailed on the first violation."""
        step_number = 0
        try:
            for step_number, step in enumerate(self.schedule.steps):
                result = await self._do(step)
                self.outcome.steps.append(f"{step} -> {result}")
                await self.check(f"after step {step_number}")
            step_number += 1
            self.outcome.steps.append(f"final: {await self._final()}")
        except Exception as exc:  # an invariant, or any error a step should not raise
            raise SimulationFailed(self.schedule, step_number, self.outcome.steps, exc) from exc
        finally:
            for machine in self.machines:
                await machine.crash()
            self.outcome.faults.update(self.sim.faults)
        return self.outcome

    async def _final(self) -> str:
        """Stop every machine, then a full restore must hold every acknowledged write."""
        for machine in self.machines:
            await machine.stop()
        await self.check("after the final stop")
        return await self._restore_now("the final restore")

    # --- steps -----------------------------------------------------------------------------

    async def _do(self, step: Step) -> str:
        self.outcome.events[step.kind] += 1
        match step.kind:
            case "write":
                return await self._write_step(step.count)
            case "checkpoint":
                return await self._checkpoint()
            case "start":
                return await self.machines[step.machine % len(self.machines)].start()
            case "stop":
                return await self.machines[step.machine % len(self.machines)].stop()
            case "crash":
                return await self._crash(self.machines[step.machine % len(self.machines)], step)
            case "pause":
                return await self._pause(self.machines[step.machine % len(self.machines)], step)
            case "restore_at":
                return await self._restore_at(step)
            case "restore_now":
                return await self._restore_now(f"restore {next(self._restores)}")
            case "faults":
                assert step.plan is not None
                self.sim.plan = step.plan
                return "set"
            case "hostile":
                return self._hostile()
        raise AssertionError(step.kind)  # pragma: no cover

    def serving(self) -> list[Machine]:
        """The machines that say they serve now."""
        return [m for m in self.machines if m.tdb is not None and m.tdb.serving]

    async def _write_step(self, count: int) -> str:
        deadline = time.monotonic() + SERVING_WAIT
        while not self.serving() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        serving = self.serving()
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
                    made = await machine.tdb.checkpoint()
            except (TenantDBError, sqlite3.Error, TimeoutError) as exc:
                self.outcome.events[f"checkpoint refused: {type(exc).__name__}"] += 1
                return f"refused on {machine.name}: {type(exc).__name__}: {exc}"
            return f"{'snapshot' if made else 'nothing new'} on {machine.name}"
        return "no machine serves"

    async def write(self, machine: Machine) -> bool:
        """One client write with a unique token: commit, then ``sync()``; True if answered."""
        tdb = machine.tdb
        assert tdb is not None
        write = Write(f"t{self.schedule.seed}-{next(self._tokens)}", machine.name, time.time())
        self.writes.append(write)
        self.outcome.writes += 1
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                async with tdb.connection() as db:
                    await db.execute("INSERT INTO sim_tokens (token) VALUES (?)", (write.token,))
                    await db.commit()
                await tdb.sync()
        except (TenantDBError, sqlite3.Error, TimeoutError) as exc:
            self.outcome.events[f"write refused: {type(exc).__name__}"] += 1
            return False
        write.acked = time.time()
        self.outcome.acked += 1
        return True

    async def _crash(self, machine: Machine, step: Step) -> str:
        """Crash the machine, ``step.seconds`` into ``step.count`` writes on it if it serves."""
        if not step.count or machine.tdb is None or not machine.tdb.serving:
            return await machine.crash()
        writing = asyncio.gather(*(self.write(machine) for _ in range(step.count)))
        await asyncio.sleep(step.seconds)
        crashed = await machine.crash()
        answered = sum(await writing)
        return f"{crashed} with {answered}/{step.count} writes acknowledged"

    async def _pause(self, machine: Machine, step: Step) -> str:
        """Hold the machine's bucket calls (a process stopped mid-request); writes go on."""
        if machine.tdb is None:
            return "not running"
        machine.view.pause()
        try:
            writing = asyncio.gather(*(self.write(m) for m in self.serving()))
            await asyncio.sleep(step.seconds)
        finally:
            machine.view.resume()
        await writing
        return f"resumed as {machine.tdb.state if machine.tdb else 'gone'}"

    def acked_by(self, moment: float) -> set[str]:
        """The tokens whose sync() returned at or before ``moment``."""
        return {w.token for w in self.writes if w.acked is not None and w.acked <= moment}

    async def _restore(self, at: datetime | None, where: str) -> set[str] | str:
        dest = self.root / "restores" / f"{next(self._restores)}.sqlite3"
        dest.parent.mkdir(exist_ok=True)
        self.outcome.checks["published_objects_present"] += 1
        try:
            operator = _through(self.sim.view("operator"))
            await pitr.restore_at(operator, TENANT, dest, prefix=PREFIX, at=at)
        except Exception as exc:
            kind = invariants.restore_failure_is_named(exc, where)
            self.outcome.events[f"restore {kind}"] += 1
            return f"{kind}: {exc}"
        return await asyncio.to_thread(_tokens_in_file, dest)

    async def _restore_now(self, where: str) -> str:
        """A ``tenantdb verify``-style full restore: every write acknowledged so far."""
        required = self.acked_by(time.time())
        found = await self._restore(None, where)
        if isinstance(found, str):
            return found
        self.outcome.checks["acknowledged_writes_survive"] += 1
        invariants.acknowledged_writes_survive(required, found, where)
        return f"{len(found)} tokens, {len(required)} required"

    async def _restore_at(self, step: Step) -> str:
        now = time.time()
        moment = (
            now - step.seconds if step.seconds else self.began + step.fraction * (now - self.began)
        )
        # Segment times are rounded up to the millisecond: allow that much either way.
        required = self.acked_by(moment - 0.002)
        forbidden = {w.token for w in self.writes if w.started > moment + 0.002}
        where = f"restore as of +{moment - self.began:.3f}s"
        found = await self._restore(datetime.fromtimestamp(moment, UTC), where)
        if isinstance(found, str):
            if found.startswith("refused_before_history") and required:
                # No retention passes in a simulation: history that held acknowledged
                # writes at that moment can only have been lost.
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

    async def check(self, where: str) -> None:
        """Every invariant, on the state now."""
        checks = self.outcome.checks
        versions = invariants.lock_versions(self.sim.landed, LOCK_KEY)
        invariants.one_live_lease_at_a_time(versions)
        checks["one_live_lease_at_a_time"] += 1

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
            {m.name: (m.tdb.state, m.tdb.health()) for m in self.machines if m.tdb is not None}
        )
        checks["serving_has_its_loops"] += 1

        for machine in self.serving():
            assert machine.tdb is not None
            held = machine.tdb.lease.record
            if held is None or lock is None or held.generation != _generation(lock.body):
                continue  # a holder that has not noticed its lease is gone yet
            found = await machine.tokens()
            if found is not None:
                acked = self.acked_by(time.time())
                invariants.acknowledged_writes_survive(acked, found, f"{machine.name} {where}")
                checks["acknowledged_writes_survive"] += 1


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


async def run_schedule(schedule: Schedule, root: Path) -> Outcome:
    """Run ``schedule`` with its files under ``root``."""
    return await Simulation(schedule, root).run()
