"""What the dev proxy remembers of the requests it routed: each replay, and the machines each
of the last requests went through (for the log, the dashboard and tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

from starlette.types import Message, Send

from tenantdb.dev.backends import STARTABLE, MachineInfo
from tenantdb.dev.replays import Hop, ReplayFailed, ReplayVia

__all__ = ["ReplayRecord", "RouteRecord", "RouteStep", "StepKind", "Trace"]

StepKind = Literal["direct", "replayed", "cached replay", "fallback"]


@dataclass(frozen=True)
class ReplayRecord:
    """One replay: which request, the machine that asked for it, the machine it went to."""

    request_id: str
    method: str
    path: str
    source: str
    target: str
    via: ReplayVia


@dataclass(frozen=True)
class RouteStep:
    """One machine a request went to, how the proxy chose it, and whether it had to start it.

    ``woken`` only when the request started the machine; ``failed`` says why the machine
    could not take the request (a failed machine is never started by one).
    """

    machine_id: str
    kind: StepKind
    woken: bool
    failed: str | None = None


@dataclass(frozen=True)
class RouteRecord:
    """One client request: when, what, its answer's status, and every machine it went to."""

    request_id: str
    method: str
    path: str
    started_at: float
    status: int | None
    steps: tuple[RouteStep, ...]
    # Seconds until the answer started (a machine holding a request shows here), if any.
    answered_after: float | None = None
    # Replica reads: the machine that answered, the bookmark the request carried and the
    # one its answer gave (tenantdb-served-by, tenantdb-bookmark).
    served_by: str | None = None
    carried: str | None = None
    bookmark: str | None = None
    # How long the replica waited for the carried bookmark (tenantdb-waited-ms), and the
    # region the request entered in (None: the proxy knows no regions).
    waited_ms: int | None = None
    edge: str | None = None


@dataclass
class Trace:
    """What ``RouteRecord`` says about a request, gathered while the proxy routes it."""

    started_at: float = field(default_factory=time.time)
    status: int | None = None
    answered_at: float | None = None
    steps: list[RouteStep] = field(default_factory=list)
    served_by: str | None = None
    bookmark: str | None = None
    waited_ms: int | None = None

    def add(self, machine: MachineInfo, hop: Hop) -> None:
        """Note the machine chosen for ``hop``: started by the request unless already running."""
        kind: StepKind
        if hop.via == "cache":
            kind = "cached replay"
        elif hop.failed is not None:
            kind = "fallback"  # back to the machine that asked for a replay that failed
        elif hop.source is not None:
            kind = "replayed"
        else:
            kind = "direct"
        self.steps.append(RouteStep(machine.machine_id, kind, machine.state in STARTABLE))

    def failed(self, failure: ReplayFailed) -> None:
        """Note that the last machine could not take the request (so it was not woken)."""
        self.steps[-1] = replace(self.steps[-1], woken=False, failed=str(failure))

    def watching(self, send: Send) -> Send:
        """``send``, noting the status of the answer the client gets."""

        async def watched(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                self.status = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"tenantdb-served-by":
                        self.served_by = value.decode("latin-1")
                    elif name.lower() == b"tenantdb-bookmark":
                        self.bookmark = value.decode("latin-1")
                    elif name.lower() == b"tenantdb-waited-ms" and value.isdigit():
                        self.waited_ms = int(value)
            elif message["type"] == "websocket.accept":
                self.status = 101
            if self.status is not None and self.answered_at is None:
                self.answered_at = time.time()
            await send(message)

        return watched
