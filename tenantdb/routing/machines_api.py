"""A small client for the Fly Machines API: find, create and destroy tenant machines.

Only the calls tenantdb needs, over ``httpx.AsyncClient``::

    GET    /v1/apps/{app}/machines?metadata.{key}={value}    list (optionally filtered)
    GET    /v1/apps/{app}/machines/{id}                      one machine (stop timeout, config)
    POST   /v1/apps/{app}/machines                           create (or copy to another region)
    POST   /v1/apps/{app}/machines/{id}/stop                 graceful stop (final snapshot)
    GET    /v1/apps/{app}/machines/{id}/wait?state=S         wait for started/stopped
    DELETE /v1/apps/{app}/machines/{id}?force=true           destroy (force kills it first)

Every httpx error and every non-2xx answer becomes a ``MachinesAPIError`` here, at the
boundary; a 429 carries its ``Retry-After``. The API allows about one request per second per
action, bursting to three (https://fly.io/docs/machines/api/working-with-machines-api/, "Rate
limits"), so callers that route requests must not call it per request. The API token lives
in a ``Secret`` and is revealed only while building the ``Authorization`` header of a
request: it is never part of a message, a log line or a repr. What the answers mean (and
what a tenant's machine is created with) is ``tenantdb.routing.machines``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable, Generator, Mapping
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx

from tenantdb.config import Secret
from tenantdb.errors import ConfigurationError, MachinesAPIError
from tenantdb.routing.machines import (
    GONE_STATES,
    Autostop,
    CPUKind,
    Machine,
    MetricsConfig,
    is_dns_label,
    tenant_machine_body,
    tenant_service,
    validate_machine_id,
)
from tenantdb.routing.proxy import LazyClient
from tenantdb.tenants import validate_tenant

# Machine, MetricsConfig, Autostop, tenant_service and validate_machine_id live in
# routing.machines; they are named here too, where callers have always found them.
__all__ = [
    "DEFAULT_BASE_URL",
    "Autostop",
    "Machine",
    "MachinesClient",
    "MetricsConfig",
    "tenant_service",
    "validate_machine_id",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.machines.dev"

_MAX_DETAIL = 200
# A token is scrubbed whole and by its parts (scheme, comma-separated macaroons) this long.
_TOKEN_PARTS_RE = re.compile(r"[\s,]+")
_MIN_PIECE = 8
# The wait endpoint holds a request at most this long; longer waits are several calls.
_MAX_WAIT_CALL = 60
# A 429 without a usable Retry-After still pauses the caller this long (the API refills
# about one request per second per action).
_DEFAULT_RETRY_AFTER = 1.0


def _user_agent() -> str:
    try:
        return f"tenantdb/{version('tenantdb')}"
    except PackageNotFoundError:
        return "tenantdb"


class _FlyAuth(httpx.Auth):
    """Adds the Authorization header per request, so the token never sits in client headers."""

    def __init__(self, token: Secret) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Set ``Authorization`` on ``request`` and send it."""
        value = self._token.reveal().strip()
        # Macaroon tokens from `fly tokens create` carry their own "FlyV1" scheme and are
        # sent as they are (as flyctl does); everything else is a bearer token.
        scheme = "" if value.startswith("FlyV1 ") else "Bearer "
        request.headers["Authorization"] = f"{scheme}{value}"
        yield request

    def __repr__(self) -> str:
        return "_FlyAuth(token=Secret('***'))"


class MachinesClient:
    """Async client for one Fly app's machines; use it as ``async with MachinesClient(...)``.

    Why ~290 lines: one method per API call, each a few lines around ``_request`` (the
    boundary); ``create_machine`` repeats its fifteen typed options to pass them on.
    """

    def __init__(
        self,
        app_name: str,
        token: Secret,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
    ) -> None:
        if not is_dns_label(app_name):
            raise ConfigurationError(
                f"Fly app name {app_name[:80]!r} must be lowercase letters, digits and hyphens"
            )
        if not isinstance(token, Secret) or not token.reveal().strip():
            raise ConfigurationError("a Fly API token is required (set FLY_API_TOKEN)")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"Machines API URL {base_url!r} must be http(s)://...")
        if timeout <= 0:
            raise ConfigurationError(f"Machines API timeout {timeout}s must be positive")
        self.app_name = app_name
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._client = LazyClient(
            "MachinesClient",
            base_url=self.base_url,
            auth=_FlyAuth(self._token),
            timeout=self.timeout,
            headers={"User-Agent": _user_agent(), "Accept": "application/json"},
            # A redirect could carry the token to another host; the API never redirects.
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return (
            f"MachinesClient(app_name={self.app_name!r}, base_url={self.base_url!r}, "
            f"token=Secret('***'))"
        )

    async def __aenter__(self) -> Self:
        self._client.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def list_machines(self, metadata: Mapping[str, str] | None = None) -> list[Machine]:
        """Return the app's machines, only those carrying all of ``metadata`` if given."""
        wanted = dict(metadata or {})
        params = {f"metadata.{key}": value for key, value in wanted.items()}
        path = self._machines_path()
        status, data = await self._request("GET", path, params=params)
        if not isinstance(data, list):
            raise MachinesAPIError(f"GET {path}: expected a JSON list of machines", status=status)
        machines: list[Machine] = []
        for item in data:
            try:
                machine = Machine.from_api(item)
            except ValueError as exc:
                raise MachinesAPIError(
                    f"GET {path}: unusable machine in the answer: {exc}", status=status
                ) from exc
            # The filter is applied again here: an API (or proxy) that ignored the query
            # must not make tenantdb route one tenant's requests to another's machine.
            if all(machine.metadata.get(k) == v for k, v in wanted.items()):
                machines.append(machine)
            else:
                log.debug("machine %s does not match the metadata filter; skipped", machine.id)
        return machines

    async def find_tenant_machines(
        self, tenant: str, metadata_key: str = "customer_id"
    ) -> list[Machine]:
        """Return the live machines whose ``metadata_key`` names ``tenant``, sorted by id."""
        validate_tenant(tenant)
        machines = await self.list_machines({metadata_key: tenant})
        # Sorted so that every caller picks the same machine when there are several.
        return sorted((m for m in machines if m.state not in GONE_STATES), key=lambda m: m.id)

    async def create_machine(
        self,
        tenant: str,
        *,
        image: str,
        region: str | None = None,
        metadata_key: str = "customer_id",
        env: Mapping[str, str] | None = None,
        internal_port: int = 8080,
        memory_mb: int = 256,
        cpus: int = 1,
        cpu_kind: CPUKind = "shared",
        autostop: Autostop = "stop",
        autostart: bool = True,
        min_machines_running: int = 0,
        kill_timeout: float = 30.0,
        metrics_port: int = 9091,
        name: str | None = None,
    ) -> Machine:
        """Create the machine that serves ``tenant``: metadata and TENANT_ID name it.

        The machine's config is ``tenant_machine_body``'s (which see).
        """
        body = tenant_machine_body(
            tenant,
            image=image,
            region=region,
            metadata_key=metadata_key,
            env=env,
            internal_port=internal_port,
            memory_mb=memory_mb,
            cpus=cpus,
            cpu_kind=cpu_kind,
            autostop=autostop,
            autostart=autostart,
            min_machines_running=min_machines_running,
            kill_timeout=kill_timeout,
            metrics_port=metrics_port,
            name=name,
        )
        path = self._machines_path()
        status, data = await self._request("POST", path, json_body=body, tenant=tenant)
        try:
            machine = Machine.from_api(data)
        except ValueError as exc:
            raise MachinesAPIError(
                f"POST {path}: unusable machine in the answer ({exc}); a machine may have "
                f"been created, check with `tenantdb machines list`",
                status=status,
                tenant=tenant,
            ) from exc
        if machine.metadata and machine.metadata.get(metadata_key) != tenant:
            raise MachinesAPIError(
                f"POST {path}: machine {machine.id} was created with metadata "
                f"{metadata_key}={machine.metadata.get(metadata_key)!r}, not {tenant!r}",
                status=status,
                tenant=tenant,
            )
        log.info("created machine %s for tenant %s in %s", machine.id, tenant, machine.region)
        return machine

    async def copy_machine(self, machine_id: str, *, region: str, name: str) -> Machine:
        """Create and start a machine in ``region`` with ``machine_id``'s whole config.

        Image, env, services, guest, stop config and metadata are the source's, as
        ``fly machine clone`` makes them; only the region and the name are new.
        """
        source = self._machine_path(machine_id)
        status, data = await self._request("GET", source)
        config = data.get("config") if isinstance(data, Mapping) else None
        if not isinstance(config, Mapping):
            raise MachinesAPIError(f"GET {source}: the machine has no config", status=status)
        path = self._machines_path()
        body = {"name": name, "region": region, "config": dict(config)}
        status, created = await self._request("POST", path, json_body=body)
        try:
            machine = Machine.from_api(created)
        except ValueError as exc:
            raise MachinesAPIError(
                f"POST {path}: unusable machine in the answer ({exc}); a machine may have "
                f"been created, check with `tenantdb machines list`",
                status=status,
            ) from exc
        log.info("created machine %s in %s as a copy of %s", machine.id, region, machine_id)
        return machine

    async def get_machine(self, machine_id: str) -> Machine:
        """Return one machine of the app, as the API describes it now."""
        path = self._machine_path(machine_id)
        status, data = await self._request("GET", path)
        try:
            return Machine.from_api(data)
        except ValueError as exc:
            raise MachinesAPIError(f"GET {path}: unusable machine ({exc})", status=status) from exc

    async def stop_machine(self, machine_id: str) -> None:
        """Ask a machine to stop gracefully (its stop signal, then its kill timeout)."""
        path = f"{self._machine_path(machine_id)}/stop"
        await self._request("POST", path)
        log.info("stopping machine %s", machine_id)

    async def wait_for_state(
        self,
        machine_id: str,
        state: Literal["started", "stopped", "destroyed"],
        *,
        instance_id: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Return once the machine is in ``state``; MachinesAPIError(408) after ``timeout``."""
        path = f"{self._machine_path(machine_id)}/wait"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            params = {"state": state, "timeout": str(max(1, min(_MAX_WAIT_CALL, round(left))))}
            if instance_id:
                params["instance_id"] = instance_id
            try:
                await self._request("GET", path, params=params, read_timeout=_MAX_WAIT_CALL)
                return
            except MachinesAPIError as exc:
                # 408: this call's wait ran out; another call may still be within budget.
                if exc.status != 408 or time.monotonic() >= deadline - 1:
                    raise
            # Normally the 408 itself took the whole wait; never spin on a fast one.
            await asyncio.sleep(1)

    async def destroy_machine(self, machine_id: str, force: bool = True) -> None:
        """Destroy a machine for good; ``force`` kills it first if it is still running."""
        params = {"force": "true"} if force else {}
        await self._request("DELETE", self._machine_path(machine_id), params=params)
        log.info("destroyed machine %s", machine_id)

    def _machine_path(self, machine_id: str) -> str:
        try:
            validate_machine_id(machine_id)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        return f"{self._machines_path()}/{machine_id}"

    def _machines_path(self) -> str:
        return f"/v1/apps/{quote(self.app_name, safe='')}/machines"

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        tenant: str = "",
        read_timeout: float = 0,
    ) -> tuple[int, Any]:
        """Send one request; return its status and decoded JSON (None for an empty body)."""
        client = self._client.get()
        where = f"{method} {path}"
        timeout = httpx.Timeout(self.timeout, read=self.timeout + read_timeout)
        try:
            response = await client.request(
                method, path, params=params or None, json=json_body, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            # A create that timed out may still have happened on Fly's side.
            maybe = "; it may still have taken effect" if method != "GET" else ""
            raise MachinesAPIError(
                f"{where}: timed out ({type(exc).__name__}){maybe}",
                tenant=tenant,
            ) from exc
        except httpx.HTTPError as exc:
            raise MachinesAPIError(
                self._scrub(f"{where}: {type(exc).__name__}: {exc}"), tenant=tenant
            ) from exc
        status = response.status_code
        if not 200 <= status < 300:
            detail = _error_detail(response, self._scrub)
            raise MachinesAPIError(
                self._scrub(f"{where}: HTTP {status}{': ' + detail if detail else ''}"),
                status=status,
                tenant=tenant,
                retry_after=_retry_after(response) if status == 429 else None,
            )
        if not response.content.strip():
            return status, None
        try:
            return status, response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MachinesAPIError(
                f"{where}: HTTP {status} with a body that is not JSON",
                status=status,
                tenant=tenant,
            ) from exc

    def _scrub(self, message: str) -> str:
        # The API echoes nothing secret today; this keeps it so if that ever changes. The
        # token is removed whole and piece by piece ("FlyV1 fm2_a,fm2_b" holds macaroons
        # an echo may quote on their own).
        token = self._token.reveal().strip()
        pieces = [token, *(p for p in _TOKEN_PARTS_RE.split(token) if len(p) >= _MIN_PIECE)]
        for piece in sorted(filter(None, pieces), key=len, reverse=True):
            message = message.replace(piece, "***")
        return message


def _retry_after(response: httpx.Response) -> float:
    """Seconds a 429 asks to wait: its Retry-After in seconds, else a one-second pause."""
    raw = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(raw)
    except ValueError:
        return _DEFAULT_RETRY_AFTER  # absent, or an HTTP date: pause briefly
    if not math.isfinite(seconds):
        return _DEFAULT_RETRY_AFTER
    return min(max(seconds, 0.0), 300.0)


def _error_detail(response: httpx.Response, scrub: Callable[[str], str]) -> str:
    """Return the API's short error text ({"error": "..."}), scrubbed, cut to a sane length.

    Scrubbed before it is cut: a cut through the token would leave a piece of it behind.
    """
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip()
    else:
        text = str(data.get("error") or "") if isinstance(data, dict) else ""
    text = " ".join(scrub(text).split())
    return text[:_MAX_DETAIL] + ("..." if len(text) > _MAX_DETAIL else "")
