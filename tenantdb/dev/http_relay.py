"""The dev proxy's HTTP side: which headers machines see, the request body held for replays,
a machine's answer streamed back, and the proxy's own answers (errors, the HTTPS redirect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from starlette.types import Receive, Scope, Send

from tenantdb.routing.proxy import HOP_BY_HOP

__all__ = [
    "ProxyError",
    "RequestBody",
    "forward_headers",
    "no_cookie_jar",
    "redirect_to_https",
    "relay",
    "send_error",
]

log = logging.getLogger("tenantdb.dev.proxy")

# Set by the proxy alone (a client must not forge where a request was replayed from: the
# machines' loop guard trusts it), meant for the proxy, or answered by it already (a
# 100-continue was sent to the client when the proxy read the body).
_NOT_FORWARDED = HOP_BY_HOP | {
    b"expect",
    # A websocket handshake's own headers belong to one connection: the proxy makes its own
    # to the machine (no extensions: it relays whole messages). The subprotocols go through,
    # from the scope (servers may leave them out of its headers).
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"fly-replay-src",
    b"fly-replay-failed",
    b"fly-replay-cache-status",
    b"fly-preferred-instance-unavailable",
    b"fly-request-id",
    b"fly-client-ip",
    b"fly-force-instance-id",
    b"fly-prefer-instance-id",
    b"fly-replay-cache-control",
    b"x-forwarded-for",
    # The dev-only choice of region (dev.regions): the machines see Fly-Region instead.
    b"tenantdb-dev-region",
    b"fly-region",
}
_HTTP_SCHEMES = {"http": b"http", "https": b"https", "ws": b"http", "wss": b"https"}


class ProxyError(Exception):
    """Stop routing and answer the client with this error (its HTTP status and message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestBody:
    """A request body: held whole when it fits the replay limit, else streamed through once."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._buffer = bytearray()
        self._complete = False
        self._streamed = False
        self.client_gone = False

    async def load(self) -> None:
        """Read until the body ends or is bigger than the limit."""
        while not self._complete and len(self._buffer) <= self._limit:
            # A websocket's first message, websocket.connect, reads as an empty body.
            message = await self._receive()
            if message["type"] in ("http.disconnect", "websocket.disconnect"):
                self.client_gone = True
                return
            self._buffer += message.get("body", b"")
            self._complete = not message.get("more_body", False)

    @property
    def replayable(self) -> bool:
        """True when the whole body is held and within the limit: it can be sent again."""
        return self._complete and len(self._buffer) <= self._limit

    def content(self) -> bytes | AsyncIterator[bytes]:
        """The body to send: the held bytes, or (once) the held part and then the rest."""
        if self._complete:
            return bytes(self._buffer)
        if self._streamed:
            raise ProxyError(502, "the request body was already streamed to a machine")
        self._streamed = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        yield bytes(self._buffer)
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return


def forward_headers(
    scope: Scope,
    raw: list[tuple[bytes, bytes]],
    request_id: str,
    replayable: bool,
    edge: str | None = None,
) -> list[tuple[bytes, bytes]]:
    """The request's headers as machines see them: hop-by-hop ones out, Fly's own in.

    ``edge`` is the region the request entered in: Fly's ``Fly-Region`` request header, "the
    region that the connection was accepted in and routed from"
    (https://fly.io/docs/networking/request-headers/).
    """
    client = (scope.get("client") or ("", 0))[0].encode()
    forwarded_for = b", ".join([v for k, v in raw if k == b"x-forwarded-for"] + [client])
    kept = [
        (k, v)
        for k, v in raw
        if k not in _NOT_FORWARDED
        # A held body is sent whole and httpx sets its length; a streamed one keeps it.
        and not (replayable and k == b"content-length")
    ]
    subprotocols = ", ".join(scope.get("subprotocols", ())).encode()
    if subprotocols:
        kept.append((b"sec-websocket-protocol", subprotocols))
    return [
        *kept,
        (b"fly-request-id", request_id.encode()),
        (b"fly-client-ip", client),
        (b"x-forwarded-for", forwarded_for),
        # A websocket's scheme is ws or wss; the handshake itself came over http or https.
        (b"x-forwarded-proto", _HTTP_SCHEMES.get(scope.get("scheme", "http"), b"http")),
        *([(b"fly-region", edge.encode())] if edge is not None else []),
    ]


def no_cookie_jar() -> CookieJar:
    """A cookie jar that keeps nothing: a proxy's HTTP client must not remember one client's
    Set-Cookie and send it with every later request, whoever makes it."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


async def relay(response: httpx.Response, send: Send, request_id: str, *, leg: float = 0) -> None:
    """Stream a machine's answer to the client as it comes, each chunk ``leg`` seconds
    after it came (the way back between two regions: the caller waited it for the start)."""
    headers = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
    headers.append((b"fly-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    try:
        async for chunk in _delayed(response.aiter_raw(), leg):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.TransportError as exc:
        # Too late for an error answer: leaving the response unfinished makes the server
        # drop the connection, so the client sees the failure.
        log.warning("request %s: the machine's answer broke off: %r", request_id, exc)
        return
    await send({"type": "http.response.body", "body": b""})


async def _delayed(chunks: AsyncIterator[bytes], leg: float) -> AsyncIterator[bytes]:
    """``chunks``, each ``leg`` seconds after it came, whatever came before it: as over a
    network, a stream's later lines each cross once (sleeping before each in turn would
    add up the legs of the chunks that came during a sleep)."""
    if not leg:
        async for chunk in chunks:
            yield chunk
        return
    came: asyncio.Queue[tuple[float, bytes | BaseException | None]] = asyncio.Queue()

    async def take() -> None:
        try:
            async for chunk in chunks:
                came.put_nowait((time.monotonic() + leg, chunk))
        except Exception as exc:  # raised where the chunk would have been, one leg later
            came.put_nowait((time.monotonic() + leg, exc))
        else:
            came.put_nowait((time.monotonic() + leg, None))

    taking = asyncio.create_task(take())
    try:
        while True:
            due, item = await came.get()
            await asyncio.sleep(max(due - time.monotonic(), 0))
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        taking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await taking


async def redirect_to_https(scope: Scope, headers: dict[str, str], send: Send) -> None:
    """Answer as a force_https port does: 301 to the same URL over HTTPS, body unread."""
    host = headers.get("host", "").rsplit(":", 1)[0]
    target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    query = scope.get("query_string", b"").decode("latin-1")
    location = f"https://{host}{target}" + (f"?{query}" if query else "")
    await send(
        {
            "type": "http.response.start",
            "status": 301,
            "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def send_error(send: Send, status: int, message: str, request_id: str) -> None:
    """Answer the client with the proxy's own error, as plain text."""
    body = f"fly proxy (tenantdb dev): {message}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"fly-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
