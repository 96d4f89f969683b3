"""TenantDBMiddleware: mount it and the tenant's database is there, startup to shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Concatenate, ParamSpec

import aiosqlite
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantdb.asgi.in_flight import InFlight
from tenantdb.asgi.lending import RequestConnection
from tenantdb.asgi.output_gate import Commits, OutputGate
from tenantdb.asgi.process_end import ProcessEnd
from tenantdb.asgi.replica_reads import (
    SERVED_BY_HEADER,
    ReadRequest,
    ReplicaReads,
    bookmark_headers,
    is_read_method,
)
from tenantdb.asgi.tail_hints import TAIL_HINT_PATH, HttpTailHints, TailHintEndpoint
from tenantdb.config import Durability, Settings
from tenantdb.errors import (
    ConfigurationError,
    ConnectionUnavailableError,
    InvalidTenantError,
    LeaseLostError,
    TenantDBError,
)
from tenantdb.machine.database import Migration, TenantDB
from tenantdb.machine.supervisor import Health
from tenantdb.machine.usage import UsageReporter
from tenantdb.metrics import Metrics, MetricsServer
from tenantdb.responses import RETRY_AFTER, send_error, send_response
from tenantdb.routing.proxy import MachineURL, machine_urls
from tenantdb.routing.replay import LOCAL_APP_NAME, Router
from tenantdb.storage import open_bucket
from tenantdb.storage.metered import MeteredBucket
from tenantdb.storage.probe import check_conditional_writes_once
from tenantdb.tenants import TenantPattern, validate_tenant

__all__ = ["TenantDBMiddleware", "tenant_db", "tenant_db_dependency"]

log = logging.getLogger("tenantdb")

# Requests a standby holds at once on their word that the holder handed them back.
MAX_HANDED_BACK_HOLDS = 64

_P = ParamSpec("_P")
_Init = Callable[Concatenate["TenantDBMiddleware", ASGIApp, _P], None]


def _fail_at_startup(init: _Init[_P]) -> _Init[_P]:
    """Keep a configuration error of the constructor, to fail the server's startup with it.

    Starlette builds its middleware stack inside the first ASGI call, the lifespan's: raised
    there, the error escapes the lifespan handshake, uvicorn's ``--lifespan auto`` takes that
    for "lifespan unsupported", and the server starts and answers every request with 500.
    """

    @functools.wraps(init)
    def kept(
        self: TenantDBMiddleware, app: ASGIApp, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> None:
        try:
            init(self, app, *args, **kwargs)
        except TenantDBError as exc:
            self.startup_error = exc

    return kept


class TenantDBMiddleware:
    """Pure ASGI middleware giving each request of this machine's tenant its database.

    Keyword arguments override the environment (``Settings.from_env()``).
    ``proxy_large_bodies=False`` answers 413 to requests for other tenants whose bodies are
    too large for fly-replay instead of streaming them to the tenant's machine, and
    ``machine_url`` maps a machine id to the base URL they are streamed to.
    ``durability="bucket"`` (the default) holds the answer of a request that committed a
    write until the bucket has it; ``"async"`` answers at once (see the README).
    ``replica_reads=True`` (``TENANTDB_REPLICA_READS=1``) makes a standby serve read requests
    from its copy (``is_read(scope)`` says which are reads: GET, HEAD and OPTIONS unless
    given) and answers carry a bookmark (see ``asgi/replica_reads.py``). The middleware
    takes part in the ASGI lifespan: its startup runs before the app's and its shutdown
    (final snapshot, publish, release) after the app's. Bad configuration fails the startup
    (``startup_error``), never a request.

    With ``TENANTDB_TAIL_HINTS`` (on by default) the middleware answers standbys' tail hint
    requests at ``/.tenantdb/tail/<tenant>`` before the app, and this machine's standby asks
    its holder the same way (``asgi/tail_hints.py``).

    ``health_path`` (``None``: off) answers the platform's health check before the app:
    ``200 ok`` or ``503`` with the reasons of ``health()``. When a task the machine cannot
    run without dies, the machine fails stop: with ``exit_on_failure`` (and a server on the
    main thread) the middleware asks the server to shut down (SIGTERM) and, after the
    lifespan's shutdown, the process exits with ``FAIL_STOP_EXIT_CODE`` (70). The same way,
    a tenant without requests for ``TENANTDB_IDLE_STOP`` seconds ends the process with code 0
    (its lease released as "idle"), and so does its standby.

    Why ~430 lines: it is the one ASGI entry, and a third of it is the keyword options'
    validation and documentation; each request path it picks (own tenant, replica read,
    replay, health) is a short method over pieces that live elsewhere (``lending``,
    ``output_gate``, ``replica_reads``, ``process_end``, ``routing``).
    """

    startup_error: TenantDBError | None = None

    @_fail_at_startup
    def __init__(
        self,
        app: ASGIApp,
        *,
        path_pattern: str = "/customers/{tenant}",
        migrations: Sequence[Migration] = (),
        settings: Settings | None = None,
        tenant: str | None = None,
        lease_ttl: float | None = None,
        checkpoint_interval: float | None = None,
        durability: Durability | None = None,
        data_dir: str | Path | None = None,
        bucket_name: str | None = None,
        proxy_large_bodies: bool = True,
        machine_url: MachineURL | None = None,
        health_path: str | None = "/healthz",
        exit_on_failure: bool = True,
        replica_reads: bool | None = None,
        is_read: ReadRequest = is_read_method,
    ) -> None:
        self.app = app
        if health_path is not None and not health_path.startswith("/"):
            raise ConfigurationError(f"health_path {health_path!r} must start with /")
        self.health_path = health_path
        self.pattern = TenantPattern(path_pattern)
        base = settings if settings is not None else Settings.from_env()
        self.settings = base.with_overrides(
            tenant=tenant,
            lease_ttl=lease_ttl,
            checkpoint_interval=checkpoint_interval,
            durability=durability,
            data_dir=Path(data_dir) if data_dir is not None else None,
            bucket_name=bucket_name,
            replica_reads=replica_reads,
        )
        self.process = ProcessEnd(
            exit_on_failure=exit_on_failure, kill_timeout=self.settings.kill_timeout
        )
        self.metrics = Metrics()  # this middleware's own registry, served at startup
        # One bucket client per process, shared by the tenant's database and the router.
        self.bucket = MeteredBucket(
            open_bucket(self.settings), self.metrics, tenant=self.settings.tenant or ""
        )
        # Tail hints: this machine's standby asks the holder; its holder answers standbys.
        self.hint_client = (
            HttpTailHints(
                machine_urls(
                    self.settings.hint_url,
                    app=self.settings.app_name or LOCAL_APP_NAME,
                    port=self.settings.port,
                    variable="TENANTDB_HINT_URL",
                    what="tail hint",
                )
            )
            if self.settings.tail_hints and self.settings.tenant
            else None
        )
        self.tenantdb = (
            TenantDB(
                self.settings,
                migrations=migrations,
                bucket=self.bucket,
                metrics=self.metrics,
                tail_hints=self.hint_client,
            )
            if self.settings.tenant
            else None
        )
        self.tail_hints = (
            TailHintEndpoint(self.tenantdb, max_wait=self.settings.lease_ttl / 3)
            if self.settings.tail_hints
            else None
        )
        self.router = Router(
            self.settings,
            self.pattern,
            bucket=self.bucket,
            proxy_large_bodies=proxy_large_bodies,
            machine_url=machine_url,
            metrics=self.metrics,
        )
        self.replica_reads = (
            ReplicaReads(
                app,
                machine_id=self.settings.machine_id,
                cookie_path=self.pattern.prefix,
                max_lag=self.settings.max_replica_lag,
                is_read=is_read,
                metrics=self.metrics,
            )
            if self.settings.replica_reads
            else None
        )
        self._resources = AsyncExitStack()  # what the lifespan opened, closed at shutdown
        self._running = InFlight()  # requests of this machine's tenant in flight
        self._handed_back_holds = 0  # requests held on their word that they were handed back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self.startup_error is not None:  # a server without lifespan: fail loudly
            raise self.startup_error
        if scope["type"] == "http" and scope["path"] == self.health_path:
            await self._answer_health(scope, receive, send)
            return
        if (
            scope["type"] == "http"
            and self.tail_hints is not None
            and scope["path"].startswith(TAIL_HINT_PATH)
        ):
            await self.tail_hints(scope, receive, send)
            return
        segment = (
            self.pattern.segment(scope["path"]) if scope["type"] in ("http", "websocket") else None
        )
        if segment is None:
            await self.app(scope, receive, send)
            return
        if _has_dot_segment(scope["path"]):
            # Clients and proxies on the way (httpx among them) may resolve "..": the tenant
            # would be decided on one path and the request received on another.
            await send_error(
                scope,
                receive,
                send,
                400,
                "the path has '.' or '..' segments, which are not resolved here: send the "
                "path it stands for",
            )
            return
        try:
            tenant = validate_tenant(segment)
        except InvalidTenantError as exc:
            await send_error(scope, receive, send, 400, str(exc))
            return
        if tenant != self.settings.tenant or self.tenantdb is None:
            await self.router.forward(scope, receive, send, tenant)
            return
        with self.tenantdb.request():  # keeps the tenant awake (TENANTDB_IDLE_STOP)
            await self._serve_own(scope, receive, send, self.tenantdb)

    async def _serve_own(self, scope: Scope, receive: Receive, send: Send, tdb: TenantDB) -> None:
        if self.replica_reads is not None and await self.replica_reads.refuse_bad_bookmark(
            scope, receive, send
        ):
            return
        if not tdb.serving:
            if self.replica_reads is not None and self.replica_reads.takes(scope, tdb):

                async def to_holder(scope: Scope, receive: Receive, send: Send) -> None:
                    await self._not_serving(scope, receive, send, tdb)

                with self._running:
                    await self.replica_reads.serve(scope, receive, send, tdb, to_holder)
                return
            await self._not_serving(scope, receive, send, tdb)
            return
        if not await self._lease_confirmed(scope, receive, send, tdb):
            return
        self.metrics.routed("local")
        gated = self.settings.durability == "bucket"
        # Lent lazily and set aside while the request waits on its client (see lending.py).
        db = RequestConnection(tdb.pool, track_commits=gated)
        scope = dict(scope)
        scope["state"] = {**scope.get("state", {}), "tenant": tdb.tenant, "db": db}
        answered = False

        async def receive_aside() -> Message:
            if db.holding:
                await db.set_aside()
            return await receive()

        async def to_client(message: Message) -> None:
            nonlocal answered
            answered = True
            await send(message)

        with self._running:
            try:
                if gated:
                    await self._serve_gated(scope, receive_aside, to_client, tdb, db)
                else:

                    async def send_aside(message: Message) -> None:
                        if db.holding:
                            await db.set_aside()
                        await to_client(message)

                    await self.app(scope, receive_aside, send_aside)
            except ConnectionUnavailableError as exc:
                if answered:
                    raise
                # The pool lent nothing in time (or closed), and the app let the error through.
                self.metrics.routed("503")
                await send_error(scope, receive, send, 503, exc.detail, headers=exc.headers)
            finally:
                if db.refusal is not None:
                    log.warning("tenant %s: request refused: %s", tdb.tenant, db.refusal)
                if db.holding:
                    await db.end()

    async def _lease_confirmed(
        self, scope: Scope, receive: Receive, send: Send, tdb: TenantDB
    ) -> bool:
        """Whether the holder may serve this request; if not, it was answered (after a
        freeze, the one renewal that confirms the lease failed)."""
        if not tdb.lease.needs_confirming():
            return True
        try:
            async with asyncio.timeout(self.settings.durability_timeout):
                await tdb.confirm_lease()
        except LeaseLostError:
            await self._not_serving(scope, receive, send, tdb)  # to the new holder
            return False
        except (TenantDBError, TimeoutError) as exc:
            log.warning("tenant %s: lease not confirmed after a freeze: %s", tdb.tenant, exc)
            self.metrics.routed("503")
            await send_error(
                scope,
                receive,
                send,
                503,
                f"tenant {tdb.tenant}: this machine was paused and could not confirm its "
                "lease with the bucket yet",
                headers={"Retry-After": RETRY_AFTER},
            )
            return False
        return True

    async def _serve_gated(
        self, scope: Scope, receive: Receive, send: Send, tdb: TenantDB, db: RequestConnection
    ) -> None:
        """Run the app behind an output gate: no answer goes out before its writes are durable."""

        async def make_durable() -> None:
            async with db.waiting():
                await tdb.sync()
                # Committed before a freeze, answered after it: not on a lapsed lease.
                await tdb.confirm_lease()

        stamp = None
        commits: Commits = db
        if self.replica_reads is not None:
            # Every answer that read or wrote the database says which log position its data
            # needs: a replica serves the client's next read only from there on. An answer
            # that saw commits not yet in the bucket waits for them, like one that made them.
            commits = _FirstUse(db)
            path = self.pattern.prefix(tdb.tenant)

            def stamp() -> list[tuple[bytes, bytes]]:
                served = [(SERVED_BY_HEADER.encode(), self.settings.machine_id.encode())]
                bookmark = tdb.bookmark()
                if bookmark is None:
                    return served
                max_lag = self.settings.max_replica_lag
                marked = bookmark_headers(bookmark, path=path, max_lag=max_lag, scope=scope)
                return [*served, *marked]

        gate = OutputGate(
            send,
            commits,
            make_durable,
            timeout=self.settings.durability_timeout,
            tenant=tdb.tenant,
            metrics=self.metrics,
            stamp=stamp,
        )

        async def send_aside(message: Message) -> None:
            if db.holding:
                await db.set_aside()
            await gate.send(message)

        try:
            await self.app(scope, receive, send_aside)
        except Exception:
            if gate.failure is None:
                raise
        if gate.failure is not None:
            log.error("tenant %s: answer withheld: %s", tdb.tenant, gate.failure)
            await gate.refuse(scope, receive)

    def health(self) -> Health:
        """This machine's health: its tenant's (``TenantDB.health``); green without one."""
        return self.tenantdb.health() if self.tenantdb is not None else Health()

    async def _answer_health(self, scope: Scope, receive: Receive, send: Send) -> None:
        health = self.health()
        if health.ok:
            await send_response(scope, receive, send, PlainTextResponse("ok\n"))
        else:
            await send_error(scope, receive, send, 503, "; ".join(health.reasons))

    async def _not_serving(self, scope: Scope, receive: Receive, send: Send, tdb: TenantDB) -> None:
        holder = tdb.holder.owner if tdb.holder else ""
        if await self._held_for_handoff(scope, tdb, holder):
            await self._serve_own(scope, receive, send, tdb)
            return
        if (
            tdb.state in ("standby", "replica", "fenced")
            and holder
            and holder != self.settings.machine_id
            and self.router.can_replay
        ):
            await self.router.replay_to(scope, receive, send, holder, tdb.tenant)
            return
        reasons = {
            "stopped": "tenantdb is not started: the server must run the ASGI lifespan",
            "starting": "the tenant's database is starting",
            # Never tdb.problem: it names the bucket, keys and local paths. The log has it.
            "restoring": "the tenant's database is being restored"
            + (" (the last attempt failed; retrying)" if tdb.problem else ""),
            "standby": "the tenant's lock.json is damaged"
            if tdb.lock_damaged
            else f"machine {holder or 'another machine'} holds the tenant's lease",
            "replica": f"machine {holder or 'another machine'} holds the tenant's lease",
            "fenced": "this machine lost the tenant's lease",
            "failed": f"this machine failed ({tdb.failure}) and is restarting",
            "stopping": "this machine is shutting down",
            "serving": "this machine's lease is about to expire",
        }
        self.metrics.routed("503")
        await send_error(
            scope,
            receive,
            send,
            503,
            f"tenant {tdb.tenant} is unavailable here: "
            f"{reasons['stopping' if tdb.draining else tdb.state]}; retry shortly",
            headers={"Retry-After": RETRY_AFTER},
        )

    async def _held_for_handoff(self, scope: Scope, tdb: TenantDB, holder: str) -> bool:
        """Hold a request while the lease comes to this machine; whether it now serves.

        During a handoff the holder stops taking requests before this standby can: a
        request it cannot take (its replay failed, or it sent the request here) or one
        that arrives when the lease is released, expired or just taken here waits up to
        ``handoff_wait`` seconds instead of failing.
        """
        if tdb.state not in ("standby", "replica", "restoring") or not self.settings.handoff_wait:
            return False
        if tdb.handoff_expected():
            return await tdb.wait_serving(self.settings.handoff_wait)
        # Only the request's headers say the holder handed it back, and a client can send
        # them: hold a bounded number of such requests at a time.
        if self._handed_back_holds >= MAX_HANDED_BACK_HOLDS or not self.router.handed_back(
            scope, holder or None
        ):
            return False
        self._handed_back_holds += 1
        try:
            return await tdb.wait_serving(self.settings.handoff_wait)
        finally:
            self._handed_back_holds -= 1

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        startup: Message | None = await receive()
        try:
            await self._startup()
        except Exception as exc:
            # The server prints the message (uvicorn: one ERROR line) and exits.
            await send({"type": "lifespan.startup.failed", "message": f"tenantdb: {exc}"})
            return
        app_started = False
        app_finished = False

        async def app_receive() -> Message:
            nonlocal startup
            if startup is not None:
                message: Message = startup
                startup = None
                return message
            return await receive()

        async def app_send(message: Message) -> None:
            nonlocal app_started, app_finished
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                app_started = True
            elif kind in (
                "lifespan.startup.failed",
                "lifespan.shutdown.complete",
                "lifespan.shutdown.failed",
            ):
                app_finished = True
                await self._shutdown()
                self.process.exit_if_asked()
            await send(message)

        try:
            await self.app(scope, app_receive, app_send)
        except BaseException:
            if app_started or app_finished:
                if not app_finished:
                    await self._shutdown()
                raise
            # The app does not do lifespan: run the protocol for our part alone.
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            await self._shutdown()
            self.process.exit_if_asked()
            await send({"type": "lifespan.shutdown.complete"})

    async def _startup(self) -> None:
        if self.startup_error is not None:
            raise self.startup_error
        if self.tenantdb is None:
            log.log(
                logging.INFO if self.router.enabled else logging.WARNING,
                "TENANT_ID is not set, so this machine serves no tenant%s",
                ": it routes every tenant's requests to the tenant's machine"
                if self.router.enabled
                else "; set TENANT_ID to the tenant this server should serve",
            )
        async with AsyncExitStack() as stack:
            if self.settings.metrics_port:
                server = MetricsServer(
                    self.metrics, self.settings.metrics_port, self.settings.metrics_host
                )
                await stack.enter_async_context(server)
            await stack.enter_async_context(self.bucket)
            if self.settings.tenant:
                # Its last record is written at shutdown, before the bucket closes.
                reporter = UsageReporter(
                    self.bucket,
                    self.metrics,
                    tenant=self.settings.tenant,
                    prefix=self.settings.prefix,
                )
                await stack.enter_async_context(reporter)
            await stack.enter_async_context(self.router)
            if self.hint_client is not None:
                await stack.enter_async_context(self.hint_client)
            if self.tenantdb is not None:
                if self.settings.bucket_name:
                    # A store that ignores If-None-Match or If-Match would let two machines
                    # hold the lease: refuse to serve from it (the embedded bucket is ours).
                    await check_conditional_writes_once(
                        self.bucket,
                        self.settings.prefix,
                        store=self._store_name(),
                        data_dir=self.settings.data_dir,
                    )
                await self.tenantdb.start(standby=True)
                for watcher in self.process.watch(self.tenantdb):
                    stack.callback(watcher.cancel)
            self._resources = stack.pop_all()

    def _store_name(self) -> str:
        """Where the tenants' objects are: endpoint, bucket and prefix."""
        settings = self.settings
        return f"{settings.endpoint_url or 'aws'} {settings.bucket_name} {settings.prefix}"

    async def _shutdown(self) -> None:
        tdb = self.tenantdb
        try:
            if tdb is not None and tdb.state != "stopped":
                tdb.drain()
                # Requests already accepted finish, so their writes are in the final snapshot.
                try:
                    await asyncio.wait_for(
                        self._running.idle.wait(), timeout=self.settings.kill_timeout * 0.3
                    )
                except TimeoutError:
                    log.warning("%d request(s) still running at shutdown", self._running.count)
                await tdb.stop()
        finally:
            await self._resources.aclose()


class _FirstUse:
    """The gate's question with replica reads: did the request commit, or (its first time
    asked) use the database at all?"""

    def __init__(self, db: RequestConnection) -> None:
        self._db = db
        self._asked = False

    async def take(self) -> bool:
        committed = await self._db.take()
        first, self._asked = not self._asked, True
        return committed or (first and self._db.borrowed)


def _has_dot_segment(path: str) -> bool:
    # Most paths have no dot at all: no split for them (this runs on every request).
    return "." in path and any(part in (".", "..") for part in path.split("/"))


def tenant_db(connection: HTTPConnection) -> aiosqlite.Connection:
    """The tenant's database connection for a request (in FastAPI: ``tenant_db_dependency``)."""
    db = getattr(connection.state, "db", None)
    if not isinstance(db, aiosqlite.Connection):
        raise TenantDBError("this request is not for this machine's tenant: no database")
    return db


async def tenant_db_dependency(connection: HTTPConnection) -> aiosqlite.Connection:
    """``tenant_db`` as a FastAPI dependency: ``Depends(tenant_db_dependency)``."""
    # async, so FastAPI calls it on the event loop: a plain function would cost every
    # request a hop to a worker thread and back.
    return tenant_db(connection)
