"""The tenant's live SQLite database, from lease to final publish.

``TenantDB`` runs one machine's side of the lease protocol: lock the data
directory, acquire the lease (or wait as a standby), restore or create the database,
migrate, serve, checkpoint while running, and publish then release at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, get_args

import aiosqlite

from tenantdb import clock, logs
from tenantdb.config import Settings
from tenantdb.connections.pool import ConnectionPool
from tenantdb.errors import (
    ConfigurationError,
    DataDirLockedError,
    LeaseHeldError,
    LeaseLostError,
    LocalDiskError,
    LockFileCorruptError,
    TenantDBError,
)
from tenantdb.localfiles import remove_database, write_atomically
from tenantdb.machine.supervisor import Health, HealthCheck, Supervisor
from tenantdb.metrics import Metrics
from tenantdb.protocol.lease import CLOCK_GRANULARITY, Lease, ObservedLock
from tenantdb.protocol.lockfile import LockRecord, ReleaseReason
from tenantdb.protocol.snapshot import file_sha256, remove_stray_temp_files
from tenantdb.replication.checksum import PageHashes, database_page_size, format_state
from tenantdb.replication.follower import Follower
from tenantdb.replication.history import record_takeover
from tenantdb.replication.restore import restore_database
from tenantdb.replication.shipper import CONNECTION_PRAGMAS, Shipper
from tenantdb.storage import Bucket, open_bucket

__all__ = ["Health", "Migration", "TenantDB", "TenantState", "apply_migrations"]

log = logging.getLogger("tenantdb")

Migration = str | Callable[[sqlite3.Connection], None]
TenantState = Literal[
    "stopped", "starting", "standby", "restoring", "serving", "fenced", "failed", "stopping"
]

# The lifecycle in one place: every state and the states it may move to (straight to
# "stopped" only when start() fails).
#   starting   the data directory is locked, the lease is being acquired
#   standby    another machine holds the lease: follow its log (a warm copy), replay
#              requests to it, take over when it releases the lease or the lease expires
#   restoring  this machine holds the lease (renewed from the moment it was taken) and
#              makes the local file the newest data; retried while the lease holds
#   serving    the database is open to requests
#   fenced     the lease was lost: the database is closed, nothing more is written
#   failed     a task the machine cannot run without died (``failure`` says which): the
#              database is closed, the lease released if it can be; the server exits
#   stopping   final publish and release
_MOVES: dict[TenantState, frozenset[TenantState]] = {
    "stopped": frozenset({"starting"}),
    "starting": frozenset({"standby", "restoring", "stopping", "stopped"}),
    "standby": frozenset({"restoring", "stopping"}),
    "restoring": frozenset({"serving", "fenced", "failed", "stopping", "stopped"}),
    "serving": frozenset({"fenced", "failed", "stopping"}),
    "fenced": frozenset({"standby", "restoring", "failed", "stopping", "stopped"}),
    "failed": frozenset({"stopping"}),
    "stopping": frozenset({"stopped"}),
}
# The tasks a machine cannot be healthy without, in each state (see supervisor.py). Not
# garbage collection: a red check would take a tenant that serves and ships off the proxy.
_REQUIRED_TASKS: dict[TenantState, tuple[str, ...]] = {
    "standby": ("standby",),
    "restoring": ("renewal",),
    "serving": ("renewal", "shipper"),
    "fenced": ("fenced",),
}
# SQLite's default page size, for a database that has no page yet.
DEFAULT_PAGE_SIZE = 4096
# Pauses between attempts to open the tenant after a failed restore, while holding the lease.
_RECOVERY_PAUSES = (1.0, 2.0, 5.0, 10.0, 30.0)
# The longest wait for the release of the lease of a machine that cannot go on.
_RELEASE_TIMEOUT = 5.0


def apply_migrations(path: Path, migrations: Sequence[Migration]) -> int:
    """Bring ``path`` up to ``len(migrations)`` by ``PRAGMA user_version``; return how many ran.

    Each migration runs in its own transaction together with the version bump.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # In WAL mode a migration cut short by a crash leaves no hot rollback journal, and
        # only the log shipper may checkpoint its frames.
        for pragma in CONNECTION_PRAGMAS:
            conn.execute(pragma)
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            advice = (
                "no migrations were given: pass the app's list, as in "
                "TenantDBMiddleware(app, migrations=MIGRATIONS) or "
                "TenantDB.from_env(migrations=MIGRATIONS)"
                if not migrations
                else f"only {len(migrations)} migrations were given: pass the app's whole "
                "list (an older release of the app cannot open a newer database)"
            )
            raise ConfigurationError(f"{path} is at schema version {version}, but {advice}")
        for number, migration in enumerate(migrations[version:], start=version + 1):
            try:
                if isinstance(migration, str):
                    # One script, so executescript() cannot commit half of it.
                    conn.executescript(
                        f"BEGIN IMMEDIATE;\n{migration}\n;PRAGMA user_version = {number:d};COMMIT;"
                    )
                else:
                    conn.execute("BEGIN IMMEDIATE")
                    migration(conn)
                    conn.execute(f"PRAGMA user_version = {number:d}")
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return len(migrations) - version
    finally:
        conn.close()


_CLAIM = re.compile(r"[0-9a-f]{32}")


class _DataDirLock:
    """An exclusive flock on the data directory: one tenantdb process per directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.directory / ".tenantdb.lock", "ab")  # noqa: SIM115
        except OSError as exc:
            raise LocalDiskError(
                f"data directory {str(self.directory.absolute())!r} cannot be used: "
                f"{exc.filename}: {exc.strerror or exc}; set TENANTDB_DATA_DIR to a "
                "writable directory",
                operation="open",
            ) from exc
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise DataDirLockedError(str(self.directory.resolve())) from None
        self._file = lock_file

    def claim(self) -> str:
        """This directory's id, the lease claim of whichever process holds its lock.

        Holding the lock proves every earlier process of this directory is gone, so a lease
        held under this claim may be taken back at once after a crash.
        """
        path = self.directory / ".tenantdb.id"
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text().strip()
            if _CLAIM.fullmatch(text):
                return text
        value = clock.token_hex(16)
        write_atomically(path, value.encode())
        return value

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TenantDB:
    """One tenant's database on this machine, kept in the bucket under a lease.

    Use ``async with TenantDB(settings) as tdb:`` in scripts (fails if another machine
    holds the lease), or ``start(standby=True)`` / ``stop()`` from a server lifespan.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        migrations: Sequence[Migration] = (),
        bucket: Bucket | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics`` receives the tenant's figures (a registry of its own if omitted)."""
        if settings.tenant is None:
            raise ConfigurationError("no tenant to serve: set TENANT_ID (or CUSTOMER_ID)")
        self.settings = settings
        self.tenant: str = settings.tenant
        self.migrations = tuple(migrations)
        self.path = settings.data_dir / f"{self.tenant}.sqlite3"
        self.state: TenantState = "stopped"
        self.holder: LeaseHeldError | None = None
        self.problem: str | None = None  # why a held tenant could not be opened, if it failed
        self.failure: str | None = None  # why the machine failed stop (state "failed")
        # A standby's last read of lock.json found it damaged: it can neither follow nor take
        # over until someone repairs it, so it must not look like a healthy standby.
        self.lock_damaged = False
        self._bucket = bucket
        self._dir_lock = _DataDirLock(settings.data_dir)
        self._stack = AsyncExitStack()
        self._lease: Lease | None = None
        self._pool: ConnectionPool | None = None
        self._shipper: Shipper | None = None
        # A standby's warm copy of the tenant and its last view of lock.json.
        self._follower: Follower | None = None
        self._observed: ObservedLock | None = None
        self._confirmed_at = 0.0  # monotonic time lock.json was last seen (changed or not)
        self._serving_now = asyncio.Event()  # set exactly while the state is "serving"
        self.draining = False
        self._draining_since: float | None = None
        self.metrics = metrics or Metrics()
        self.metrics.watch(self, get_args(TenantState))
        self._supervisor = Supervisor(
            self.tenant, failures=self.metrics, on_fail_stop=self._fail_stop
        )
        self._health_checks: list[HealthCheck] = [self._pool_stalled, self._shipping_stuck]
        self._failing: asyncio.Task[None] | None = None  # stopping what a failure left running
        self._failed = asyncio.Event()  # set once the failed machine has stopped everything
        # Requests for the tenant, for the idle stop (TENANTDB_IDLE_STOP).
        self._requests = 0
        self._last_request = clock.monotonic()
        self._idle = asyncio.Event()  # set when this machine should stop for idleness

    @classmethod
    def from_env(cls, *, migrations: Sequence[Migration] = (), **overrides: Any) -> TenantDB:
        """Build from the environment (see the README), with keyword overrides."""
        return cls(Settings.from_env(**overrides), migrations=migrations)

    def __repr__(self) -> str:
        return f"TenantDB(tenant={self.tenant!r}, state={self.state!r})"

    async def __aenter__(self) -> Self:
        await self.start(standby=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def pool(self) -> ConnectionPool:
        """The connection pool; only while this machine serves the tenant."""
        if self.state != "serving" or self._pool is None:
            raise LeaseLostError(
                f"tenant {self.tenant} is not served here ({self.state})", tenant=self.tenant
            )
        return self._pool

    def connection(self) -> contextlib.AbstractAsyncContextManager[aiosqlite.Connection]:
        """``async with tdb.connection() as db:`` borrows a connection to the database."""
        return self.pool.connection()

    @property
    def lease(self) -> Lease:
        """The lease object (for inspection and tests)."""
        if self._lease is None:
            raise TenantDBError("TenantDB has not been started")
        return self._lease

    @property
    def serving(self) -> bool:
        """True while this machine holds a live lease and the database is open."""
        return self.state == "serving" and not self.draining and self.lease.valid_for > 0

    def drain(self) -> None:
        """Stop taking new requests (``serving`` turns False) ahead of ``stop()``.

        The kill timeout counts from here: ``stop()`` fits its final publish in what is left.
        """
        self.draining = True
        self._draining_since = clock.monotonic()

    def _move(self, to: TenantState) -> None:
        if to not in _MOVES[self.state]:
            raise TenantDBError(f"tenant {self.tenant}: no move from {self.state} to {to}")
        self.state = to
        if to == "serving":
            self._serving_now.set()
        else:
            self._serving_now.clear()

    def handoff_expected(self) -> bool:
        """True when the lease is coming to this machine: it has taken the lease and is
        opening the tenant, or, as last seen, the holder released it or let it expire."""
        if self.state == "restoring":
            return True
        observed = self._observed
        if self.state != "standby" or observed is None or self._lease is None:
            return False
        if clock.monotonic() - self._confirmed_at > 2 * self.settings.follow_interval + 1:
            return False  # not polled lately (restoring the copy): nothing is known
        # Not "expires within handoff_wait": a live holder's lease always looks that close
        # when the TTL is short, since it is renewed only every TTL/3.
        return observed.record.owner is None or self._lease.expires_in(observed) <= 0

    def _pool_stalled(self) -> str | None:
        """Why requests could not be lent a connection in time lately (the pool is new for
        each holding, so it is looked up on each check)."""
        pool = self._pool
        return pool.stalled() if pool is not None and self.state == "serving" else None

    def _shipping_stuck(self) -> str | None:
        """Why the holder is red although its shipper runs: for longer than the durability
        timeout, a commit has waited or a log object's upload has failed (a failure it
        retries but cannot get past, such as a foreign object at the key)."""
        shipper = self._shipper
        if self.state != "serving" or shipper is None:
            return None
        stuck = max(shipper.lag(), shipper.upload_failing_for())
        if stuck <= self.settings.durability_timeout:
            return None
        return f"log shipping has been stuck for {stuck:.0f}s (see the log)"

    def add_health_check(self, check: HealthCheck) -> None:
        """Make ``health()`` red whenever ``check()`` returns a reason (None: all is well)."""
        self._health_checks.append(check)

    def health(self) -> Health:
        """Red while this machine cannot do its part: a task its state needs is not running
        (ended, or waiting to restart), it failed, it cannot open a held tenant, or an added
        check says so. A standby that follows the holder is healthy."""
        reasons: list[str] = []
        if self.state == "failed":
            reasons.append(f"this machine failed: {self.failure}")
        elif self.state in ("stopped", "starting", "stopping"):
            reasons.append(f"the tenant's database is {self.state}")
        reasons.extend(
            f"the {name} task is not running"
            for name in _REQUIRED_TASKS.get(self.state, ())
            if not self._supervisor.running(name)
        )
        if self.state == "restoring" and self.problem:
            reasons.append("the tenant's database cannot be opened (retrying)")
        if self.state == "standby" and self.lock_damaged:
            reasons.append("the tenant's lock.json is damaged: no machine can hold the tenant")
        reasons.extend(reason for check in self._health_checks if (reason := check()))
        return Health(tuple(reasons))

    async def failed(self) -> str:
        """Wait until this machine has failed stop and released what it could; the reason."""
        await self._failed.wait()
        return self.failure or "failed"

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Mark a request for the tenant as running (the idle stop counts from the last)."""
        self._requests += 1
        try:
            yield
        finally:
            self._requests -= 1
            self._last_request = clock.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last request for the tenant ended; 0 while one runs."""
        return 0.0 if self._requests else clock.monotonic() - self._last_request

    async def idle(self) -> None:
        """Wait until this machine should stop for idleness (``TENANTDB_IDLE_STOP``).

        A holder: no request for ``idle_stop`` seconds. A standby: its holder released the
        lease for idleness and no request is running here. Stopping is the caller's to do
        (the middleware ends the server, exit code 0); ``stop()`` then releases the lease
        saying "idle" if the tenant is still idle by then.
        """
        await self._idle.wait()

    async def wait_serving(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for this machine to serve; whether it does."""
        if not self.serving:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._serving_now.wait(), timeout)
        return self.serving

    async def start(self, *, standby: bool = True) -> None:
        """Lock the data dir, acquire the lease (or stand by), restore, migrate, open."""
        if self.state != "stopped":
            raise TenantDBError(f"TenantDB already started ({self.state})")
        logs.follow(self)  # this machine's log lines are about this tenant
        self.failure = None
        self._failed.clear()
        self._move("starting")
        try:
            self._dir_lock.acquire()
            claim = await asyncio.to_thread(self._dir_lock.claim)
            for path in await asyncio.to_thread(remove_stray_temp_files, self.settings.data_dir):
                log.info("tenant %s: removed %s left by a killed process", self.tenant, path)
            bucket = self._bucket or open_bucket(self.settings)
            if self._bucket is None:
                await self._stack.enter_async_context(bucket)
            self._lease = Lease(
                bucket,
                self.tenant,
                machine_id=self.settings.machine_id,
                region=self.settings.fly_region,
                ttl=self.settings.lease_ttl,
                prefix=self.settings.prefix,
                claim=claim,
                on_lost=self._on_lease_lost,
                cross_region=self.settings.consistent_across_regions,
            )
            try:
                await self._lease.acquire()
            except LeaseHeldError as held:
                if not standby:
                    raise
                self._enter_standby(held)
                return
            self._move("restoring")
            self._supervisor.spawn("renewal", self._lease.keep_renewed, "fail_stop")
            try:
                await self._become_holder()
            except ConfigurationError:
                raise  # the app's own mistake (a migration): trying again cannot help
            except Exception as exc:
                if not standby or self.lease.status != "held":
                    raise  # a script, or fenced meanwhile
                # One behaviour for a tenant that cannot be opened, at startup as after a
                # takeover: keep the lease, answer 503, red health, retry with backoff.
                await self._opening_failed(exc, 0)
                self._supervisor.spawn(
                    "recovery", functools.partial(self._keep_opening, 1), "restart"
                )
        except BaseException:
            # A startup that fails gives the lease it took back at once, not at its expiry.
            await self._supervisor.cancel()
            await self._close_database()
            await self._release_now()
            await self._close_resources()
            self._move("stopped")
            raise

    def _enter_standby(self, held: LeaseHeldError | None) -> None:
        self._move("standby")
        self.holder = held
        self._observed = None
        self._follower = Follower(
            self.lease.bucket, self.tenant, self.path, prefix=self.settings.prefix
        )
        log.warning("tenant %s: standing by, %s", self.tenant, held or "lock.json unreadable")
        # Restarted when it dies: it only reads, and follows into a copy it vouches for.
        self._supervisor.spawn("standby", self._standby_loop, "restart")

    async def _standby_loop(self) -> None:
        """Poll lock.json (conditional GETs), keep the warm copy current, take over in time."""
        interval = self.settings.follow_interval
        local_generation = await asyncio.to_thread(self._local_generation)
        failures, retry_at = 0, 0.0
        # Polled every interval: each problem is logged once, not at every poll.
        unread, unacquired = logs.RecurringProblem(log), logs.RecurringProblem(log)
        while self.state == "standby":
            # In the last second before the expiry the standby estimates, every poll reads
            # the lock whole, for a fresh server Date: the takeover is not late by S3's
            # one-second Last-Modified.
            since = self._observed
            if since is not None and self.lease.expires_in(since) <= CLOCK_GRANULARITY:
                since = None
            try:
                observed = await self.lease.read(since=since)
            except TenantDBError as exc:
                self.lock_damaged = isinstance(exc, LockFileCorruptError)
                unread.warn("tenant %s: standby could not read lock.json: %s", self.tenant, exc)
                await asyncio.sleep(interval)
                continue
            if unread.clear():
                log.info("tenant %s: standby reads lock.json again", self.tenant)
            self.lock_damaged = False
            self._observed, self._confirmed_at = observed, clock.monotonic()
            if observed is not None and self._still_held(observed):
                # While lock.json is still at the generation the local file was written in,
                # that file may hold this machine's unpublished writes: the takeover's rules
                # decide about it, the follower leaves it alone.
                follow = observed.record.generation != local_generation
                if follow and clock.monotonic() >= retry_at and not self._copy_current(observed):
                    try:
                        if local_generation != 0:
                            # The follower writes the file from here: never again "the
                            # newest data" of a holding of this machine.
                            await asyncio.to_thread(
                                write_atomically, self._state_file, b'{"generation": 0}'
                            )
                            local_generation = 0
                        await self._follow(observed.record)
                        failures = 0
                    except (TenantDBError, OSError, sqlite3.Error) as exc:
                        pause = _RECOVERY_PAUSES[min(failures, len(_RECOVERY_PAUSES) - 1)]
                        failures, retry_at = failures + 1, clock.monotonic() + pause
                        log.error(
                            "tenant %s: the standby could not follow the log (%s); retrying "
                            "in %.0fs",
                            self.tenant,
                            exc,
                            pause,
                        )
                await asyncio.sleep(interval)
                continue
            if observed is not None and self._holder_stopped_idle(observed.record):
                # Taking over would keep a tenant nobody uses awake: stop too, unless a
                # request waits here (then this machine serves it).
                await asyncio.sleep(interval)
                continue
            # Released, expired or gone: take the lease now (acquire judges it afresh).
            try:
                await self.lease.acquire()
            except LeaseHeldError as held:
                self.holder = held
                self._observed = None
                unacquired.clear()
                await asyncio.sleep(interval)
                continue
            except TenantDBError as exc:
                unacquired.warn("tenant %s: standby could not acquire yet: %s", self.tenant, exc)
                await asyncio.sleep(interval)
                continue
            self._take_hold()
            return

    def _holder_stopped_idle(self, record: LockRecord) -> bool:
        """True (and ``idle()`` returns) when the holder released the lease for idleness,
        no request for the tenant runs here and this machine stops when idle at all."""
        if record.owner is not None or record.released != "idle" or self._requests:
            return False
        if not self.settings.idle_stop:
            return False  # TENANTDB_IDLE_STOP=0 here: never stop, so take the tenant over
        if not self._idle.is_set():
            log.info(
                "tenant %s: the holder stopped for idleness; this standby stops too",
                self.tenant,
            )
            self._idle.set()
        return True

    def _still_held(self, observed: ObservedLock) -> bool:
        record = observed.record
        if record.owner is None or self.lease.expires_in(observed) <= 0:
            return False
        if (record.owner, record.claim) == (self.settings.machine_id, self.lease.claim):
            return False  # this very process's holding (it was fenced): acquire() takes it back
        if self.holder is None or self.holder.owner != record.owner:
            self.holder = LeaseHeldError(
                tenant=self.tenant,
                owner=record.owner,
                region=record.region or "",
                expires_in=self.lease.expires_in(observed),
            )
        return True

    def _copy_current(self, observed: ObservedLock) -> bool:
        return self._follower is None or self._follower.hashes(observed.record) is not None

    async def _follow(self, record: LockRecord) -> None:
        if self._follower is not None:
            await self._follower.catch_up(record)

    def _take_hold(self) -> None:
        """With the lease just taken in the background: renew it, open the tenant."""
        self._move("restoring")
        self._supervisor.spawn("renewal", self.lease.keep_renewed, "fail_stop")
        self._supervisor.spawn("recovery", self._keep_opening, "restart")

    async def _keep_opening(self, failed: int = 0) -> None:
        """Open the held tenant, retrying failures with backoff (``failed`` so far).

        The lease is renewed meanwhile; if it is lost, ``_on_lease_lost`` cancels this.
        """
        for attempt in itertools.count(failed):
            if attempt:
                await asyncio.sleep(_RECOVERY_PAUSES[min(attempt - 1, len(_RECOVERY_PAUSES) - 1)])
            try:
                await self._become_holder()
            except Exception as exc:
                await self._opening_failed(exc, attempt)
                continue
            self.problem = None
            return

    async def _opening_failed(self, exc: Exception, attempt: int) -> None:
        """Note why the held tenant could not be opened (attempt ``attempt``) and close it."""
        self.problem = f"{type(exc).__name__}: {exc}"
        pause = _RECOVERY_PAUSES[min(attempt, len(_RECOVERY_PAUSES) - 1)]
        expected = isinstance(exc, (TenantDBError, OSError, sqlite3.Error))
        if not expected:
            self.metrics.task_failed("recovery")
        log.log(
            logging.ERROR if expected else logging.CRITICAL,
            "tenant %s: holds the lease but could not open the database (%s); retrying in %.0fs",
            self.tenant,
            self.problem,
            pause,
            exc_info=None if expected else exc,
        )
        await self._close_database()

    async def _become_holder(self) -> None:
        lease = self.lease
        # Before anything of this generation is uploaded (preparing the file uploads
        # nothing): it tells point-in-time restores which earlier uploads were published.
        recording = asyncio.ensure_future(record_takeover(lease))
        try:
            hashes = await self._prepare_local_file(lease.previous)
        except BaseException:
            recording.cancel()
            await asyncio.gather(recording, return_exceptions=True)
            raise
        await recording
        self._shipper = Shipper(
            lease,
            self.path,
            hashes=hashes,
            prefix=self.settings.prefix,
            work_dir=self.settings.data_dir,
            snapshot_retention=self.settings.snapshot_retention,
            retention=self.settings.retention,
            metrics=self.metrics,
        )
        # Open before migrating: the shipper's connections keep the WAL (and its unshipped
        # frames) in place when the migration's connection closes.
        await self._shipper.open()
        try:
            ran = await asyncio.to_thread(apply_migrations, self.path, self.migrations)
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(
                f"tenant {self.tenant}: a migration failed: {type(exc).__name__}: {exc}"
            ) from exc
        if ran:
            log.info("tenant %s: applied %d migration(s)", self.tenant, ran)
        self._pool = ConnectionPool(
            self.path,
            self.settings.pool_size,
            track_commits=self.settings.durability == "bucket",
        )
        if self.state != "restoring":
            raise LeaseLostError(
                f"tenant {self.tenant}: the lease was lost while restoring", tenant=self.tenant
            )
        self._move("serving")
        self.holder = None
        shipper = self._shipper
        # Fail stop in both durabilities: after an unexpected exception its position and
        # page hashes cannot be trusted, and a segment built on them could be wrong.
        self._supervisor.spawn(
            "shipper",
            functools.partial(
                shipper.run, self.settings.sync_interval, self.settings.checkpoint_interval
            ),
            "fail_stop",
        )
        self._supervisor.spawn(
            "gc",
            functools.partial(shipper.collect_garbage_when_due, self.settings.sync_interval),
            "restart",
        )
        if self.settings.idle_stop > 0:
            # Restarted if it dies: it holds no state, and without it the tenant stays awake.
            self._last_request = clock.monotonic()  # the idle time counts from here
            self._supervisor.spawn("idle", self._watch_idle, "restart")
        log.info(
            "tenant %s: serving (generation %s)",
            self.tenant,
            lease.record.generation if lease.record else "?",
        )

    async def _watch_idle(self) -> None:
        """Set ``_idle`` once no request has come for ``idle_stop`` seconds."""
        limit = self.settings.idle_stop
        while (idle_for := self.idle_for()) < limit:
            # While requests run, look again after a whole period: one may end meanwhile.
            await asyncio.sleep(limit - idle_for)
        log.info(
            "tenant %s: no request for %gs; stopping this machine (TENANTDB_IDLE_STOP)",
            self.tenant,
            limit,
        )
        self._idle.set()

    @property
    def _state_file(self) -> Path:
        return self.path.with_name(f"{self.path.name}.tenantdb.json")

    def _local_generation(self) -> int | None:
        """The lease generation the local file's data belongs to, if known for certain."""
        try:
            generation = json.loads(self._state_file.read_bytes())["generation"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("tenant %s: ignoring unreadable %s: %s", self.tenant, self._state_file, exc)
            return None
        return generation if type(generation) is int else None

    async def _prepare_local_file(self, previous: LockRecord | None) -> PageHashes | None:
        """Make ``self.path`` hold the tenant's newest data before it is opened.

        Returns the page hashes of the file when it is what the bucket has, or None when it
        is newer (writes a failed final publish never shipped): a snapshot is due then.
        """
        local_generation = await asyncio.to_thread(self._local_generation)
        # The warm copy of a standby that just took over; the file is the holder's after this.
        follower, self._follower = self._follower, None
        exists = self.path.exists()
        hashes: PageHashes | None
        if previous is None:
            if exists:
                aside = self.path.with_name(f"{self.path.name}.orphaned-{int(clock.wall())}")
                log.warning(
                    "tenant %s: the bucket has no lock.json but %s exists; moved it to %s",
                    self.tenant,
                    self.path,
                    aside,
                )
                for suffix in ("", "-wal", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            await asyncio.to_thread(remove_database, self.path)
            hashes = PageHashes(DEFAULT_PAGE_SIZE)
            log.info("tenant %s: new tenant, creating its database", self.tenant)
        elif (
            exists
            and local_generation in (previous.generation, self._held_generation)
            and self.settings.machine_id in (previous.owner, previous.last_owner)
        ):
            # Nobody acquired since this machine last held the lease (or the file was already
            # taken over in this holding, by an attempt that failed later): the local file is
            # the newest data, including writes a failed final publish never uploaded.
            log.info("tenant %s: continuing from the local file %s", self.tenant, self.path)
            hashes = None
            if previous.released == "idle":
                # An idle stop published everything before it released: the file should be
                # exactly what the bucket has. Checked page by page (a local read), so that
                # waking does not upload the whole database as a new snapshot every time.
                hashes = await asyncio.to_thread(self._matching_local, previous)
        elif previous.snapshot is None and previous.log is None:
            await asyncio.to_thread(remove_database, self.path)
            hashes = PageHashes(DEFAULT_PAGE_SIZE)
            log.info("tenant %s: nothing published yet, starting empty", self.tenant)
        elif follower is not None and (hashes := await self._caught_up(follower, previous)):
            log.info(
                "tenant %s: took over with the standby's copy (%d log objects applied while "
                "following, %d restore(s))",
                self.tenant,
                follower.applied,
                follower.restores,
            )
        elif exists and (hashes := await asyncio.to_thread(self._matching_local, previous)):
            log.info("tenant %s: the local file is what the bucket has", self.tenant)
        else:
            started = clock.monotonic()
            with self.metrics.timing("restore"):
                hashes = await restore_database(
                    self.lease.bucket, previous, self.path, prefix=self.settings.prefix
                )
            log.info(
                "tenant %s: restored %d pages in %.2fs",
                self.tenant,
                hashes.db_pages,
                clock.monotonic() - started,
            )
        state = json.dumps({"generation": self._held_generation or 0}).encode()
        await asyncio.to_thread(write_atomically, self._state_file, state)
        return hashes

    async def _caught_up(self, follower: Follower, previous: LockRecord) -> PageHashes | None:
        """The standby's copy brought to ``previous`` (the segments it lacks), or None.

        Only a copy the follower vouches for is used: its in-memory page hashes are those of
        what it wrote, and they must be what ``previous`` records.
        """
        try:
            await follower.catch_up(previous)
        except TenantDBError as exc:
            log.warning("tenant %s: the standby's copy cannot be used: %s", self.tenant, exc)
            return None
        return follower.hashes(previous)

    def _matching_local(self, previous: LockRecord) -> PageHashes | None:
        """The local file's page hashes if it is exactly what ``previous`` points at."""
        if any(Path(f"{self.path}{suffix}").exists() for suffix in ("-wal", "-journal")):
            return None
        hashes = PageHashes.of_file(self.path, database_page_size(self.path))
        if previous.log is not None:
            wanted = (previous.log.state, previous.log.db_pages)
            return hashes if (format_state(hashes.state), hashes.db_pages) == wanted else None
        snapshot = previous.snapshot
        return hashes if snapshot and file_sha256(self.path) == snapshot.sha256 else None

    def generation(self) -> int:
        """The generation of the lease this machine holds or last held; 0 before any."""
        record = self._lease.record if self._lease is not None else None
        return record.generation if record else 0

    def log_lag(self) -> float:
        """Seconds the oldest commit not yet in the bucket has waited; 0 when none."""
        return self._shipper.lag() if self._shipper is not None else 0.0

    @property
    def _held_generation(self) -> int | None:
        record = self.lease.record
        return record.generation if record else None

    def _on_lease_lost(self, exc: LeaseLostError) -> None:
        if self.state in ("serving", "restoring"):
            self._move("fenced")
            self._supervisor.spawn("fenced", self._after_fenced, "fail_stop")

    async def _after_fenced(self) -> None:
        # The old holder's renewal, checkpoint and restore tasks must not outlive its lease.
        await self._supervisor.cancel(keep=asyncio.current_task())
        await self._close_database()
        try:
            await self.lease.acquire()
        except LeaseHeldError as held:
            self._enter_standby(held)
            return
        except TenantDBError as exc:
            log.error("tenant %s: fenced, and the lease cannot be read: %s", self.tenant, exc)
            self._enter_standby(None)
            return
        self._take_hold()

    def _fail_stop(self, reason: str) -> None:
        """A task this machine cannot run without died: stop serving now, then stop the rest."""
        if self.state not in ("restoring", "serving", "fenced"):
            return  # already failed, or stopping anyway
        self.failure = reason
        self._move("failed")
        self._failing = asyncio.get_running_loop().create_task(self._after_failure())

    async def _after_failure(self) -> None:
        """Cancel every task, close the database, release the lease unless that loses data."""
        try:
            await self._supervisor.cancel()
            try:
                await self._close_database()
            except Exception as exc:  # the exit must come whatever the database does
                log.error(
                    "tenant %s: closing the failed machine's database: %s: %s",
                    self.tenant,
                    type(exc).__name__,
                    exc,
                )
            if self.settings.durability == "async":
                # Commits answered but maybe not shipped (the dead shipper cannot say) are
                # only in the local file: the lease is kept for this machine's restart on
                # its data directory (same claim), which takes it back at once and publishes
                # them; without a volume, a standby takes over at the lease's expiry.
                log.error(
                    "tenant %s: the lease is left to expire: with async durability, commits "
                    "answered here may be only in %s",
                    self.tenant,
                    self.path.resolve(),
                )
            else:
                await self._release_now()
        finally:
            self._failed.set()

    async def _release_now(self) -> None:
        """Give the lease up without a final publish, within a bound.

        A conditional write on this holding's own ETag: it never releases a lease another
        machine has taken since (that is a 412, and this machine counts as fenced).
        """
        lease = self._lease
        if lease is None or lease.status != "held":
            return
        try:
            async with asyncio.timeout(max(min(lease.valid_for, _RELEASE_TIMEOUT), 0.5)):
                await lease.release()
        except Exception as exc:  # a machine giving up must get to its exit whatever this does
            log.error(
                "tenant %s: could not release the lease (%s: %s); other machines wait for it "
                "to expire",
                self.tenant,
                type(exc).__name__,
                str(exc) or "timed out",
            )
            return
        log.warning("tenant %s: lease released without a final publish", self.tenant)

    async def sync(self) -> None:
        """Return once everything committed so far is in the bucket (fenced, durable)."""
        await self._serving_shipper().sync()

    async def checkpoint(self) -> bool:
        """Ship what is committed, then make a full snapshot the log's new base.

        Returns False when the newest snapshot already holds everything (no segment since).
        """
        return await self._serving_shipper().snapshot()

    def _serving_shipper(self) -> Shipper:
        if self._shipper is None or self.state not in ("serving", "stopping"):
            raise LeaseLostError(
                f"tenant {self.tenant} is not served here ({self.state})", tenant=self.tenant
            )
        return self._shipper

    async def stop(self) -> None:
        """Final snapshot, publish, release; keep the local file if publishing fails."""
        if self.state == "stopped":
            return
        started = self._draining_since or clock.monotonic()
        was = self.state
        self._move("stopping")
        try:
            if was == "serving":
                await self._final_publish(deadline=started + self.settings.kill_timeout * 0.8)
            elif was == "restoring":
                log.warning(
                    "tenant %s: stopped before the database could be opened (%s); nothing "
                    "was published here, and the lease is released",
                    self.tenant,
                    self.problem or "still restoring",
                )
                await self._supervisor.cancel()
                await self._close_database()
                await self._release_now()
            elif was == "failed":
                await self._failed.wait()
        finally:
            await self._close_resources()
            self._move("stopped")
            took = clock.monotonic() - started
            log.info("tenant %s: shutdown took %.2fs", self.tenant, took)
            if took > self.settings.kill_timeout * 0.5:
                log.warning(
                    "tenant %s: shutdown took %.1fs of the %.0fs kill timeout; raise "
                    "kill_timeout in fly.toml",
                    self.tenant,
                    took,
                    self.settings.kill_timeout,
                )

    async def _final_publish(self, *, deadline: float) -> None:
        if self._pool is not None:
            await self._pool.close()
        attempt = 0
        while True:
            attempt += 1
            failure: Exception
            try:
                # Each attempt gets only the time left: a stalled upload (the read timeout
                # can exceed the kill timeout) must not outlast the machine, or the log
                # below would never be written.
                async with asyncio.timeout(max(deadline - clock.monotonic(), 0.1)):
                    await self._serving_shipper().sync()
                break
            except LeaseLostError:
                log.critical(
                    "tenant %s: FINAL PUBLISH FENCED: another machine took the lease, so "
                    "writes acknowledged here since the last publish are not in the bucket "
                    "(they remain only in %s)",
                    self.tenant,
                    self.path.resolve(),
                )
                return
            except TimeoutError as exc:
                failure = exc
            except TenantDBError as exc:
                failure = exc
            reason = str(failure) or "it did not finish before the kill timeout"
            if clock.monotonic() + min(2.0, attempt * 0.5) >= deadline:
                log.critical(
                    "tenant %s: FINAL PUBLISH FAILED (%s). The lease is NOT released and "
                    "the newest data is only in %s: restart this machine to publish it",
                    self.tenant,
                    reason,
                    self.path.resolve(),
                )
                return
            log.warning("tenant %s: final publish failed, retrying: %s", self.tenant, reason)
            await asyncio.sleep(min(2.0, attempt * 0.5))
        # "idle" only if still so now: a stop that interrupts requests is a handoff.
        limit = self.settings.idle_stop
        why: ReleaseReason | None = "idle" if 0 < limit <= self.idle_for() else None
        try:
            async with asyncio.timeout(max(deadline - clock.monotonic(), 0.5)):
                await self.lease.release(reason=why)
            log.info("tenant %s: lease released%s", self.tenant, " (idle)" if why else "")
        except (TenantDBError, TimeoutError) as exc:
            log.error(
                "tenant %s: published, but could not release the lease (%s); other machines "
                "wait for it to expire",
                self.tenant,
                str(exc) or "timed out",
            )

    async def _close_database(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._shipper is not None:
            await self._shipper.close()
            self._shipper = None

    async def _close_resources(self) -> None:
        await self._supervisor.cancel()
        await self._close_database()
        await self._stack.aclose()
        self._dir_lock.release()
