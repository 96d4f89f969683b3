"""Answering requests for tenants this machine does not serve: fly-replay to the owner."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tenantdb.config import Settings
from tenantdb.responses import send_error, send_response
from tenantdb.tenants import TenantPattern

__all__ = ["Router"]


class Router:
    """Sends requests for other tenants to the machine that serves them."""

    def __init__(self, settings: Settings, pattern: TenantPattern) -> None:
        self.settings = settings
        self.pattern = pattern

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    @property
    def can_replay(self) -> bool:
        """True when a fly-replay answer can reach another machine (on Fly or emulated)."""
        return self.settings.app_name is not None

    async def replay_to(
        self, scope: Scope, receive: Receive, send: Send, machine_id: str, tenant: str
    ) -> None:
        """Answer with ``fly-replay: instance=<machine_id>`` and an empty body."""
        response = Response(b"", 204, headers={"fly-replay": f"instance={machine_id}"})
        await send_response(scope, receive, send, response)

    async def forward(self, scope: Scope, receive: Receive, send: Send, tenant: str) -> None:
        """Route a request for ``tenant``, which this machine does not serve."""
        await send_error(
            scope,
            receive,
            send,
            404,
            f"tenant {tenant} is not served by this machine "
            f"({self.settings.tenant or 'no tenant'}), and routing is not configured",
        )
