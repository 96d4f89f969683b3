"""The output gate: a request's answer waits until the writes before it are in the bucket.

With ``durability="bucket"`` the middleware passes the app an ``OutputGate.send`` in place
of the server's. Each outgoing message is checked against the request connection's
``CommitTracker``: if the connection committed since the last message went out, the
message is held until the bucket has everything committed so far (a group commit shared
with every other request waiting), and a request that committed nothing is never held.

``http.response.start`` is held until the first body message, so the status goes out
only once that check passed: when the write cannot be made durable in time, the answer is
a 503 instead. A streaming response that commits after its first chunk cannot change its
status any more: the gate then aborts it (the server closes the connection mid-body), so
the client never receives a complete response for a write that is not durable. A
websocket is closed with code 1011 instead of sending a message that follows such a write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from tenantdb.errors import DurabilityError, LeaseLostError, TenantDBError
from tenantdb.metrics import Metrics
from tenantdb.responses import RETRY_AFTER, send_error

__all__ = ["Commits", "OutputGate"]


class Commits(Protocol):
    """What the gate asks of a request's connection: did it commit since it last asked?"""

    async def take(self) -> bool:
        """Whether a commit with changes ran since the last call (and reset that)."""
        ...


class OutputGate:
    """One request's outgoing messages, each released once the commits before it are durable."""

    def __init__(
        self,
        send: Send,
        tracker: Commits,
        make_durable: Callable[[], Awaitable[None]],
        *,
        timeout: float,
        tenant: str,
        metrics: Metrics,
        stamp: Callable[[], list[tuple[bytes, bytes]]] | None = None,
    ) -> None:
        """``stamp`` gives headers for an answer held until the bucket had its writes
        (the bookmark of what it needs, with replica reads)."""
        self._send = send
        self._stamp = stamp
        self._tracker = tracker
        self._make_durable = make_durable
        self._timeout = timeout
        self._tenant = tenant
        self._metrics = metrics
        self._held_start: Message | None = None
        self.response_started = False  # the server has a status line (or websocket accept)
        self.failure: DurabilityError | None = None
        self._answer = ""  # what the client is told of the failure (the log has the rest)

    async def send(self, message: Message) -> None:
        """The ``send`` the app gets: hold, then forward, or refuse once durability failed."""
        if self.failure is not None:
            raise self.failure  # nothing may follow a write that is not durable
        if message["type"] == "http.response.start":
            self._held_start = message  # released with the first body message
            return
        if await self._tracker.take():
            with self._metrics.gate_holding():
                await self._wait_durable()
            if self._held_start is not None and self._stamp is not None:
                headers = [*self._held_start.get("headers", []), *self._stamp()]
                self._held_start = {**self._held_start, "headers": headers}
        if self._held_start is not None:
            start, self._held_start = self._held_start, None
            await self._send(start)
        self.response_started = True
        await self._send(message)

    async def _wait_durable(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._make_durable()
        except TimeoutError:
            reason = public = f"the bucket did not confirm it within {self._timeout:g}s"
        except LeaseLostError as exc:
            reason, public = str(exc), "this machine lost the tenant's lease"
        except TenantDBError as exc:
            # The error names bucket keys and local paths: the log has it, a client does not.
            reason, public = str(exc), "the bucket did not confirm it"
        else:
            self._metrics.gate_outcome(durable=True)
            return
        self._metrics.gate_outcome(durable=False)
        self.failure = DurabilityError(_withheld(self._tenant, reason), tenant=self._tenant)
        self._answer = _withheld(self._tenant, public)
        raise self.failure

    async def refuse(self, scope: Scope, receive: Receive) -> None:
        """Answer a request whose write failed to become durable, as far as still possible.

        A 503 if no status went out yet, a websocket close with code 1011; otherwise the
        failure is raised, so that the server aborts the half-sent response.
        """
        if self.failure is None:
            raise ValueError("refuse() without a durability failure")
        if scope["type"] == "websocket":
            await WebSocketClose(1011, self._answer[:120])(scope, receive, self._send)
        elif not self.response_started:
            await send_error(
                scope,
                receive,
                self._send,
                503,
                self._answer,
                headers={"Retry-After": RETRY_AFTER},
            )
        else:
            raise self.failure


def _withheld(tenant: str, reason: str) -> str:
    return (
        f"tenant {tenant}: a write was committed on this machine but is not known to be in "
        f"the bucket ({reason}); it may or may not be kept: check before retrying"
    )
