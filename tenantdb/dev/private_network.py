"""Fly's private network between the machines of ``tenantdb dev``, for tail hints.

On Fly a machine reaches another at ``<machine_id>.vm.<app>.internal``, straight to it and never
through Fly Proxy, which would start a stopped machine
(https://fly.io/docs/networking/private-networking/). Here the machines share 127.0.0.1 on
ports of their own, so a machine's requests go to the proxy's port under
``/_dev/6pn/<caller's region>/<machine id>/<path>`` and ``PrivateNetwork`` relays them to that
machine if it runs (502 otherwise: nothing is started), after the injected latency between the
two regions each way. ``hint_url`` is the ``TENANTDB_HINT_URL`` template that leads there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

import httpx
from starlette.types import Receive, Scope, Send

from tenantdb.dev.http_relay import RequestBody, no_cookie_jar, relay, send_error
from tenantdb.dev.processes import LOOPBACK, MachineStatus
from tenantdb.dev.regions import NO_LATENCY, RegionLatency, is_region
from tenantdb.routing.proxy import HOP_BY_HOP

__all__ = ["PREFIX", "PrivateNetwork", "hint_url"]

PREFIX = "/_dev/6pn/"
# A tail hint request has no body; anything bigger is no private request this relays.
_MAX_BODY = 64 * 1024


def hint_url(proxy_port: int, region: str) -> str:
    """The ``TENANTDB_HINT_URL`` template of a machine in ``region`` ({machine_id} left)."""
    return f"http://{LOOPBACK}:{proxy_port}{PREFIX}{region}/{{machine_id}}"


class PrivateNetwork:
    """Relays ``/_dev/6pn/<region>/<machine id>/<path>`` to a running machine (pure ASGI).

    Open it with ``async with`` (its HTTP client) before serving. ``machines`` says where each
    machine runs now (``Cluster.status``).
    """

    def __init__(
        self,
        machines: Callable[[], Sequence[MachineStatus]],
        *,
        latency: RegionLatency = NO_LATENCY,
        timeout: float = 60.0,
    ) -> None:
        self.machines = machines
        self.latency = latency
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        # trust_env=False: an HTTP(S)_PROXY of the developer's shell must not catch loopback.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout), trust_env=False, cookies=no_cookie_jar()
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._client is None:
            raise RuntimeError("PrivateNetwork is not open: use `async with PrivateNetwork(...)`")
        origin, _, rest = scope["path"].removeprefix(PREFIX).partition("/")
        machine_id, _, path = rest.partition("/")
        if scope["type"] != "http" or not is_region(origin) or not machine_id:
            await send_error(send, 404, f"use {PREFIX}<your region>/<machine id>/<path>", "")
            return
        target = next((m for m in self.machines() if m.machine_id == machine_id), None)
        if target is None or target.port is None or target.state != "started":
            # As a private address whose machine does not run: nothing answers, nothing starts.
            await send_error(send, 502, f"machine {machine_id} is not running", "")
            return
        body = RequestBody(receive, _MAX_BODY)
        await body.load()
        if body.client_gone:
            return
        if not body.replayable:
            await send_error(send, 413, f"private requests here are up to {_MAX_BODY} bytes", "")
            return
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://{LOOPBACK}:{target.port}/{path}" + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP | {b"host"}]
        await self.latency.cross(origin, target.region)
        try:
            request = self._client.build_request(
                scope["method"], url, headers=headers, content=body.content()
            )
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            await send_error(send, 502, f"machine {machine_id} did not answer: {exc!r}", "")
            return
        try:
            await self.latency.cross(target.region, origin)
            await relay(response, send, "", leg=self.latency.between(target.region, origin))
        finally:
            await response.aclose()
