"""Tail hints over HTTP: the endpoint a holder serves and the client a standby asks it with.

``GET <holder>/.tenantdb/tail/<tenant>?after=<generation>.<index>&wait=<seconds>`` with
``Accept: application/x-ndjson`` is a stream: the holder's middleware (``TailHintEndpoint``)
writes a line ``{"holding": true, "position": "<generation>.<index>"}`` each time the
position it published moves past the last one told (``after`` at first), and after ``wait``
seconds (at most a third of the holder's TTL), or once a second passed without a move after
one (``QUIET_END``), a last line where it stands, then ends; it ends at once after a line
saying it no longer holds the lease. Moves that land while a line is on its way are told
together, by the next line. Without that Accept header (a standby before streams) the
request is a long poll: one such object, answered at the first move or
after the wait. The endpoint keeps at most ``MAX_WAITERS`` requests, streams or not, at a
time and refuses other tenants (421) and malformed requests (400, 405) with a readable
message; what it tells is nothing a bookmark does not.

The standby (``HttpTailHints``) reaches the holder at ``TENANTDB_HINT_URL``: by default its
private address ``http://<machine_id>.vm.<app>.internal:<port>``, straight to the machine
and never through Fly's proxy, which would start a stopped holder
(https://fly.io/docs/networking/private-networking/). It takes each whole line for what it
says, and nothing else: a line longer than ``MAX_LINE_BYTES`` or not such an object, a
stream cut mid-line or not ended within its wait and ``slack``, or any status but 200 fail
the stream, and the standby then polls lock.json as without hints. A holder before streams
answers ``application/json``: its one object is taken as a stream of one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs

import httpx
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from tenantdb.errors import ConfigurationError, InvalidTenantError
from tenantdb.machine.bookmark import Bookmark
from tenantdb.machine.database import TenantDB
from tenantdb.machine.tail_hints import TailState, Told
from tenantdb.parsing import Malformed, load_json
from tenantdb.responses import RETRY_AFTER, send_error
from tenantdb.routing.proxy import LazyClient, MachineURL
from tenantdb.tenants import validate_tenant

__all__ = ["MAX_WAITERS", "TAIL_HINT_PATH", "HttpTailHints", "TailHintEndpoint", "tail_state"]

# Under a dot segment: no tenant id (a DNS label) and no path the middleware resolves can be it.
TAIL_HINT_PATH = "/.tenantdb/tail/"
# A holder's answer, and each line of its stream, is a small JSON object; anything longer
# is not one.
MAX_LINE_BYTES = 1024
# What a standby asks for to get a stream, and what a holder's stream says it is.
STREAM_TYPE = "application/x-ndjson"
# Hint requests a holder keeps waiting at once (a tenant has a handful of standbys).
MAX_WAITERS = 32
# The longest query string a hint request may have.
_MAX_QUERY = 200
# How long past its wait a holder keeps an answer going to a standby that does not take it
# (its lines stuck in a full socket buffer): then it gives the request up.
_SEND_GRACE = 5.0


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
        wait = min(asked.wait, self.max_wait)
        answering = asyncio.ensure_future(
            self._stream(asked, wait, send) if asked.stream else self._answer(asked, wait, send)
        )
        # A standby that stops waiting (its own poll came first, it moved on) frees its
        # place at once.
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait(
                {answering, gone}, timeout=wait + _SEND_GRACE, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self.waiting -= 1
            gone.cancel()
            answering.cancel()

    async def _answer(self, asked: _Asked, wait: float, send: Send) -> None:
        """The long poll: one object, at the first move past ``after`` or after ``wait``."""
        answer = _line(await asked.tdb.wait_tail(asked.after, wait)).rstrip(b"\n")
        length = (b"content-length", str(len(answer)).encode())
        await _send_ignoring_gone(send, _start(b"application/json", length))
        await _send_ignoring_gone(send, _body(answer, more=False))

    async def _stream(self, asked: _Asked, wait: float, send: Send) -> None:
        """The stream: a line at each move past the last one told, for ``wait`` seconds."""
        await _send_ignoring_gone(send, _start(STREAM_TYPE.encode()))
        async for state in asked.tdb.tail_moves(asked.after, wait):
            await _send_ignoring_gone(send, _body(_line(state), more=True))
        await _send_ignoring_gone(send, _body(b"", more=False))

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
        accept = Headers(scope=scope).get("accept", "")
        return _Asked(self.tdb, after, wait, STREAM_TYPE in accept)


@dataclass(frozen=True)
class _Asked:
    tdb: TenantDB
    after: Bookmark
    wait: float
    stream: bool  # the standby asked for a stream, not a long poll


@dataclass(frozen=True)
class _Refusal:
    status: int
    message: str


def _line(state: TailState) -> bytes:
    """One line of a holder's stream (and, without its newline, the long poll's answer)."""
    position = str(state.position) if state.position is not None else None
    return json.dumps({"holding": state.holding, "position": position}).encode() + b"\n"


def _start(content_type: bytes, *more: tuple[bytes, bytes]) -> Message:
    headers = [(b"content-type", content_type), (b"cache-control", b"no-store"), *more]
    return {"type": "http.response.start", "status": 200, "headers": headers}


def _body(body: bytes, *, more: bool) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": more}


async def _send_ignoring_gone(send: Send, message: Message) -> None:
    """Send ``message``; a standby that has gone is not an error (its request is over)."""
    with contextlib.suppress(OSError):
        await send(message)


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


def tail_state(line: bytes) -> TailState | None:
    """What one line of a holder's answer says, or None when it is not such a line."""
    if len(line) > MAX_LINE_BYTES:
        return None
    try:
        answer = load_json(line)
    except Malformed:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("holding"), bool):
        return None
    position = answer.get("position")
    if position is None:
        return TailState(answer["holding"], None)
    if not isinstance(position, str):
        return None
    try:
        return TailState(answer["holding"], Bookmark.parse(position))
    except ValueError:
        return None


async def _tell_lines(response: httpx.Response, told: Told) -> bool:
    """Tell each whole line of ``response``; True once it ended after a whole line."""
    stream = response.headers.get("content-type", "").partition(";")[0].strip() == STREAM_TYPE
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        if stream:
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if (state := tail_state(line)) is None:
                    return False
                told(state)
        if len(pending) > MAX_LINE_BYTES:
            return False
    if stream:
        return not pending  # else cut mid-line
    # A holder before streams: its answer is one object, without a newline.
    if (state := tail_state(pending)) is None:
        return False
    told(state)
    return True


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

    async def watch(
        self, holder: str, tenant: str, after: Bookmark, wait: float, told: Told
    ) -> bool:
        """Ask ``holder``'s stream of the moves of its tail past ``after`` for ``wait`` seconds."""
        if not self._client.is_open or not math.isfinite(wait) or wait < 0:
            return False
        url = self.machine_url(holder).rstrip("/") + TAIL_HINT_PATH + tenant
        timeout = httpx.Timeout(wait + self.slack, connect=self.connect_timeout)
        params = {"after": str(after), "wait": f"{wait:.3f}"}
        try:
            # The whole answer within the wait and the slack: a stream that stalls, or
            # trickles a byte at a time, fails.
            async with (
                asyncio.timeout(wait + self.slack),
                self._client.get().stream(
                    "GET", url, params=params, headers={"accept": STREAM_TYPE}, timeout=timeout
                ) as response,
            ):
                return response.status_code == 200 and await _tell_lines(response, told)
        except (httpx.HTTPError, httpx.InvalidURL, OSError, TimeoutError):
            # InvalidURL: the holder's id (read from lock.json) makes no URL in the template.
            return False
