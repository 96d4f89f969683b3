"""Tail hints over HTTP: the endpoint a holder serves and the client a standby asks it with.

``GET <holder>/.tenantdb/tail/<tenant>?after=<generation>.<index>&wait=<seconds>`` is
answered by the holder's middleware (``TailHintEndpoint``) once lock.json moved past
``after`` or the lease is no longer held there, else after ``wait`` (at most a third of the
holder's TTL): ``{"holding": true, "position": "<generation>.<index>"}``. The endpoint holds
at most ``MAX_WAITERS`` requests at a time and refuses other tenants (421) and malformed
requests (400, 405) with a readable message; its answer carries nothing a bookmark does not.

The standby (``HttpTailHints``) reaches the holder at ``TENANTDB_HINT_URL``: by default its
private address ``http://<machine_id>.vm.<app>.internal:<port>``, straight to the machine
and never through Fly's proxy, which would start a stopped holder
(https://fly.io/docs/networking/private-networking/). Every failure is an answer
("failed"): the standby then polls lock.json as without hints.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs

import httpx
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from tenantdb.errors import ConfigurationError, InvalidTenantError
from tenantdb.machine.bookmark import Bookmark
from tenantdb.machine.database import TenantDB
from tenantdb.machine.tail_hints import HintAnswer
from tenantdb.responses import RETRY_AFTER, send_error, send_response
from tenantdb.routing.proxy import LazyClient, MachineURL
from tenantdb.tenants import validate_tenant

__all__ = ["MAX_WAITERS", "TAIL_HINT_PATH", "HttpTailHints", "TailHintEndpoint", "hint_answer"]

# Under a dot segment: no tenant id (a DNS label) and no path the middleware resolves can be it.
TAIL_HINT_PATH = "/.tenantdb/tail/"
# A holder's answer is a small JSON object; anything longer is not one.
MAX_ANSWER_BYTES = 1024
# Hint requests a holder keeps waiting at once (a tenant has a handful of standbys).
MAX_WAITERS = 32
# The longest query string a hint request may have.
_MAX_QUERY = 200


class TailHintEndpoint:
    """Answers tail hint requests for ``tdb``'s tenant (pure ASGI, http only)."""

    def __init__(self, tdb: TenantDB | None, *, max_wait: float) -> None:
        if max_wait <= 0:
            raise ConfigurationError("the longest tail hint wait must be positive")
        self.tdb = tdb
        self.max_wait = max_wait
        self.waiting = 0  # requests held now, across all of them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = self._parse(scope)
        if isinstance(asked, _Refusal):
            await send_error(scope, receive, send, asked.status, asked.message)
            return
        if self.waiting >= MAX_WAITERS:
            await send_error(
                scope,
                receive,
                send,
                503,
                f"{MAX_WAITERS} tail hint requests wait here already; retry later",
                headers={"Retry-After": RETRY_AFTER},
            )
            return
        self.waiting += 1
        answered = asyncio.ensure_future(
            asked.tdb.wait_tail(asked.after, min(asked.wait, self.max_wait))
        )
        # A standby that stops waiting (its own poll came first) frees its place at once.
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({answered, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting -= 1
            gone.cancel()
            answered.cancel()
        if not answered.done() or answered.cancelled():
            return  # nobody to answer
        state = answered.result()
        body = {
            "holding": state.holding,
            "position": str(state.position) if state.position is not None else None,
        }
        response = JSONResponse(body, headers={"Cache-Control": "no-store"})
        await send_response(scope, receive, send, response)

    def _parse(self, scope: Scope) -> _Asked | _Refusal:
        """The request to answer, or the status and message refusing it."""
        if scope["method"] != "GET":
            return _Refusal(405, f"tail hints are asked for with GET, not {scope['method'][:10]}")
        name = scope["path"].removeprefix(TAIL_HINT_PATH)
        try:
            tenant = validate_tenant(name)
        except InvalidTenantError as exc:
            return _Refusal(400, f"not a tail hint request: {exc}")
        if self.tdb is None or tenant != self.tdb.tenant:
            return _Refusal(421, f"this machine does not serve tenant {tenant}: ask its holder")
        after, wait = _query(scope)
        if after is None or wait is None:
            return _Refusal(
                400,
                "a tail hint request needs ?after=<generation>.<index>&wait=<seconds> "
                f"(at most {self.max_wait:g}s are waited), and nothing else",
            )
        return _Asked(self.tdb, after, wait)


@dataclass(frozen=True)
class _Asked:
    tdb: TenantDB
    after: Bookmark
    wait: float


@dataclass(frozen=True)
class _Refusal:
    status: int
    message: str


async def _disconnect(receive: Receive) -> None:
    """Return once the client has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _query(scope: Scope) -> tuple[Bookmark | None, float | None]:
    """``after`` and ``wait`` of a hint request's query; None for one that is malformed."""
    raw: bytes = scope.get("query_string", b"")
    if len(raw) > _MAX_QUERY:
        return None, None
    try:
        fields = parse_qs(raw.decode("ascii"), strict_parsing=True, max_num_fields=2)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if set(fields) != {"after", "wait"} or any(len(v) != 1 for v in fields.values()):
        return None, None
    try:
        after = Bookmark.parse(fields["after"][0])
        wait = float(fields["wait"][0])
    except ValueError:
        return None, None
    if not math.isfinite(wait) or wait < 0:
        return None, None
    return after, wait


def hint_answer(body: bytes, after: Bookmark) -> HintAnswer:
    """What a holder's 200 answer says: "moved" unless it holds at exactly ``after``."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "failed"
    if not isinstance(answer, dict) or not isinstance(answer.get("holding"), bool):
        return "failed"
    position = answer.get("position")
    if position is not None and not isinstance(position, str):
        return "failed"
    return "unchanged" if answer["holding"] and position == str(after) else "moved"


class HttpTailHints:
    """``TailHintClient`` over HTTP; use as ``async with`` (the client lives in between)."""

    def __init__(
        self, machine_url: MachineURL, *, connect_timeout: float = 1.0, slack: float = 1.0
    ) -> None:
        if connect_timeout <= 0 or slack <= 0:
            raise ConfigurationError("tail hint timeouts must be positive")
        self.machine_url = machine_url
        self.connect_timeout = connect_timeout
        self.slack = slack  # how much later than the wait asked for an answer may come
        self._client = LazyClient(
            "HttpTailHints",
            # HTTP(S)_PROXY from the environment must never capture private-network traffic.
            trust_env=False,
            follow_redirects=False,
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

    async def wait_past(self, holder: str, tenant: str, after: Bookmark, wait: float) -> HintAnswer:
        """Ask ``holder`` to answer once lock.json moved past ``after``, or after ``wait``."""
        if not self._client.is_open or not math.isfinite(wait) or wait < 0:
            return "failed"
        url = self.machine_url(holder).rstrip("/") + TAIL_HINT_PATH + tenant
        timeout = httpx.Timeout(wait + self.slack, connect=self.connect_timeout)
        params = {"after": str(after), "wait": f"{wait:.3f}"}
        try:
            async with self._client.get().stream(
                "GET", url, params=params, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    return "failed"
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        return "failed"
        except (httpx.HTTPError, OSError):
            return "failed"
        return hint_answer(body, after)
