"""The dashboard of `tenantdb dev`: machines, leases and the last requests, live, at ``/_dev/``.

``DevEdge`` sits in front of the proxy on its port: paths under ``/_dev/`` go to the
dashboard (those under ``/_dev/6pn/`` to the machines' private network,
``dev.private_network``), every other one to the machines. Tenant ids are DNS labels, so no
tenant's path can be ``/_dev/...``; an app's own routes there are hidden while it runs under
`tenantdb dev`.

The page (``dashboard.html``) polls ``GET /_dev/state``: each machine's process state and
lease, each tenant's ``lock.json`` (holder, generation, last snapshot, age of the log), and the
proxy's last routes. ``POST /_dev/machines/<id>/stop|kill|start`` act on a machine. The
dashboard answers only requests for ``127.0.0.1:<port>`` or ``localhost:<port>``, and a POST
only from those origins (DNS rebinding would otherwise let any web page press the buttons).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tenantdb.config import Settings
from tenantdb.dev.backends import MachineState, MachineUnavailableError
from tenantdb.dev.private_network import PREFIX as PRIVATE_PREFIX
from tenantdb.dev.processes import MachineStatus
from tenantdb.dev.proxy import FlyProxy
from tenantdb.dev.routes import RouteRecord
from tenantdb.errors import ObjectNotFoundError, TenantDBError
from tenantdb.parsing import parse_iso_time
from tenantdb.protocol.lockfile import LOCK_MAX_BYTES, LockRecord
from tenantdb.storage import Bucket, open_bucket

__all__ = ["PREFIX", "ClusterView", "DevEdge"]

PREFIX = "/_dev"
# A cross-site form may POST to a loopback port, but it cannot set a custom header without
# a CORS preflight, which nothing here answers: the buttons' requests carry this one.
_ACTION_HEADER = "x-tenantdb-dev"
# The buttons each machine state offers.
_ACTIONS: dict[MachineState, tuple[str, ...]] = {
    "started": ("stop", "kill"),
    "starting": ("kill",),
    "stopping": ("kill",),
    "stopped": ("start",),
    "failed": ("start",),
}


class ClusterView(Protocol):
    """The cluster as the dashboard reads and drives it (``dev.cluster.Cluster`` is one)."""

    @property
    def proxy(self) -> FlyProxy:
        """The proxy in front of the machines: requests go there, its routes are shown."""
        ...

    @property
    def tenants(self) -> Sequence[str]:
        """The tenants whose leases are shown."""
        ...

    def status(self) -> Sequence[MachineStatus]:
        """Every machine with its tenant, state and process."""
        ...

    def bucket_settings(self) -> Settings:
        """Settings naming the bucket the machines use."""
        ...

    async def start_machine(self, machine_id: str) -> None:
        """Start a stopped or failed machine."""
        ...

    async def stop_machine(self, machine_id: str) -> None:
        """Stop a machine gracefully."""
        ...

    async def kill_machine(self, machine_id: str) -> None:
        """SIGKILL a machine."""
        ...


class DevEdge:
    """The proxy's port: ``/_dev/`` paths go to the dashboard, all others to the machines."""

    def __init__(self, cluster: ClusterView, *, private_network: ASGIApp | None = None) -> None:
        self._proxy: ASGIApp = cluster.proxy
        self._dashboard = _dashboard(cluster)
        # The machines' own requests to each other (dev.private_network), if they make any.
        self._private_network = private_network

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and (path == PREFIX or path.startswith(PREFIX + "/")):
            refusal = _foreign_origin(scope)
            if refusal is None and self._private_network and path.startswith(PRIVATE_PREFIX):
                await self._private_network(scope, receive, send)
            elif refusal is None:
                await self._dashboard(scope, receive, send)
            else:
                await JSONResponse({"error": refusal}, 403)(scope, receive, send)
        else:
            await self._proxy(scope, receive, send)


def _foreign_origin(scope: Scope) -> str | None:
    """Why a dashboard request does not come from this computer's own browser, if it does not.

    A page of any site can resolve its name to 127.0.0.1 (DNS rebinding) and so reach this
    port as the same origin: only the loopback names themselves are answered, and a POST
    that names an origin must name one of them.
    """
    port = (scope.get("server") or ("", 0))[1]
    allowed = {f"127.0.0.1:{port}", f"localhost:{port}"}
    headers = Headers(scope=scope)
    if headers.get("host", "").lower() not in allowed:
        return f"the dashboard answers only at http://127.0.0.1:{port}/_dev/"
    origin = headers.get("origin")
    origins = {f"http://{host}" for host in allowed}
    if scope["method"] != "GET" and origin is not None and origin.lower() not in origins:
        return f"the dashboard's actions are taken only from http://127.0.0.1:{port}"
    return None


def _dashboard(cluster: ClusterView) -> Starlette:
    """The dashboard's Starlette app: the page, its state, and the machine buttons."""
    actions: dict[str, Callable[[str], Awaitable[None]]] = {
        "start": cluster.start_machine,
        "stop": cluster.stop_machine,
        "kill": cluster.kill_machine,
    }

    async def page(request: Request) -> Response:
        html = resources.files("tenantdb.dev").joinpath("dashboard.html").read_text()
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    async def state(request: Request) -> Response:
        return JSONResponse(await _state(cluster), headers={"cache-control": "no-store"})

    async def act(request: Request) -> Response:
        action = actions.get(request.path_params["action"])
        if action is None:
            return JSONResponse({"error": "the actions are start, stop and kill"}, 404)
        if request.headers.get(_ACTION_HEADER) != "1":
            return JSONResponse({"error": f"the {_ACTION_HEADER} header is missing"}, 403)
        machine_id = request.path_params["machine_id"]
        states = {m.machine_id: m.state for m in cluster.status()}
        state = states.get(machine_id)
        if state is not None and request.path_params["action"] not in _ACTIONS[state]:
            allowed = ", ".join(_ACTIONS[state])
            return JSONResponse(
                {"error": f"machine {machine_id} is {state}: it can only {allowed}"}, 409
            )
        try:
            await action(machine_id)
        except MachineUnavailableError as exc:
            return JSONResponse({"error": str(exc)}, 409)
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route(PREFIX, lambda _: RedirectResponse(PREFIX + "/")),
            Route(PREFIX + "/", page),
            Route(PREFIX + "/state", state),
            Route(PREFIX + "/machines/{machine_id}/{action}", act, methods=["POST"]),
        ]
    )


async def _state(cluster: ClusterView) -> dict[str, Any]:
    """Everything the page shows, as JSON: machines, tenants, recent requests."""
    settings = cluster.bucket_settings()
    tenants = cluster.tenants
    async with open_bucket(settings) as bucket:
        locks = await asyncio.gather(
            *(_read_lock(bucket, f"{settings.prefix}{t}/lock.json", t) for t in tenants)
        )
    by_tenant = dict(zip(tenants, locks, strict=True))
    machines = []
    for m in cluster.status():
        lock = by_tenant[m.tenant].get("lock") or {}
        holder = lock.get("holder") == m.machine_id
        machines.append(
            {
                "id": m.machine_id,
                "tenant": m.tenant,
                "region": m.region,
                "state": m.state,
                # How it last ended on its own: 0 is an idle stop (TENANTDB_IDLE_STOP).
                "exit_code": m.exit_code,
                "pid": m.pid,
                "metrics_port": m.metrics_port,
                # The buttons the page shows: never "start" on a running machine.
                "actions": _ACTIONS[m.state],
                "lease": "holder" if holder else "standby" if m.state == "started" else "",
                "generation": lock.get("generation") if holder else None,
            }
        )
    return {
        "machines": machines,
        "tenants": locks,
        "requests": [_route(r) for r in reversed(cluster.proxy.routes)],
    }


async def _read_lock(bucket: Bucket, key: str, tenant: str) -> dict[str, Any]:
    """A tenant's lease and data pointers from its lock.json, or why they cannot be shown."""
    try:
        found = await bucket.get(key, max_size=LOCK_MAX_BYTES)
        record = LockRecord.parse(found.body, tenant=tenant, key=key)
    except ObjectNotFoundError:
        return {"tenant": tenant, "error": "no lock.json yet"}
    except TenantDBError as exc:
        return {"tenant": tenant, "error": str(exc)}
    info = found.info
    now = datetime.now(UTC)
    snapshot = record.snapshot
    log = record.log
    return {
        "tenant": tenant,
        "lock": {
            "holder": record.owner,
            "last_owner": record.last_owner,
            "released": record.released,
            "generation": record.generation,
            "seq": record.seq,
            "ttl_seconds": record.ttl_seconds,
            # Judged on the bucket's clock, as the machines judge expiry.
            "written_ago": ((info.server_date or now) - info.last_modified).total_seconds(),
            "snapshot": None if snapshot is None else asdict(snapshot),
            "log_tail": None if log is None else log.tail,
            "log_age": _age(log.updated_at, now) if log is not None else None,
        },
    }


def _age(iso: str, now: datetime) -> float | None:
    """Seconds since an ISO 8601 time, or None when there is none (or it is not one)."""
    moment = parse_iso_time(iso)
    return (now - moment).total_seconds() if moment else None


def _route(record: RouteRecord) -> dict[str, Any]:
    return {
        "id": record.request_id,
        "at": datetime.fromtimestamp(record.started_at, UTC).isoformat(timespec="seconds"),
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "answered_after": record.answered_after,
        "served_by": record.served_by,
        "carried": record.carried,
        "bookmark": record.bookmark,
        "waited_ms": record.waited_ms,
        "edge": record.edge,
        "steps": [
            {"machine": s.machine_id, "kind": s.kind, "woken": s.woken, "failed": s.failed}
            for s in record.steps
        ],
    }
