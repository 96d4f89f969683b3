"""Streaming requests whose bodies are too large for fly-replay to the tenant's machine.

"Requests larger than 1MB cannot be replayed" (1,000,000 bytes,
https://fly.io/docs/networking/dynamic-request-routing/), so such a request is streamed to
the owner machine and its response streamed back; neither body is ever held whole in memory.
It goes to ``Settings.proxy_url``: on Fly, by default, the app's Flycast address
``http://<app>.flycast`` with ``fly-force-instance-id: <machine_id>``, where Fly's proxy
starts a stopped machine (https://fly.io/docs/networking/flycast/); off Fly, the machine's
private name ``http://<machine_id>.vm.<app>.internal:<port>``.

This module and ``machines_api.py`` are the only ones of tenantdb proper that import httpx
(``tenantdb dev``'s proxy has its own client). Their clients (and tail hints') are made at
their first request (``LazyClient``): making one loads the CA certificates, tens of
milliseconds that a machine waking to answer its own tenant would spend for nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterable, Callable
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
from starlette.types import Scope, Send

from tenantdb.config import Settings
from tenantdb.errors import ConfigurationError, RoutingError

__all__ = [
    "HOP_BY_HOP",
    "PROXIED_BY",
    "BodyProxy",
    "LazyClient",
    "MachineURL",
    "machine_urls",
    "proxy_key",
    "sign_proxied_by",
    "verify_proxied_by",
]

log = logging.getLogger("tenantdb.routing")

MachineURL = Callable[[str], str]
"""Returns the base URL (``http://host:port``) of a machine, given its id."""


def machine_urls(
    template: str,
    *,
    app: str,
    port: int,
    variable: str = "TENANTDB_PROXY_URL",
    what: str = "proxy",
) -> MachineURL:
    """The machine URLs of a URL template ({machine_id}, {app}, {port}) set by ``variable``."""
    fields = {"app": app, "port": port}
    try:
        template.format(machine_id="m", **fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigurationError(
            f"{what} URL template {variable}={template!r} is not valid: it may use "
            "only {machine_id}, {app} and {port}",
            variable=variable,
        ) from exc
    if not template.startswith(("http://", "https://")):
        raise ConfigurationError(
            f"{what} URL template {variable}={template!r} must be http(s)://...",
            variable=variable,
        )

    def url(machine_id: str) -> str:
        return template.format(machine_id=machine_id, **fields)

    return url


# Names the machine that proxied a request: the receiver's loop guard reads it, the way a
# replayed request carries fly-replay-src. Signed (``sign_proxied_by``): a client that sends
# it itself must not pass for another machine (it would switch the routing cache off).
PROXIED_BY = "tenantdb-proxied-by"
# How far a signature's time may be from the receiver's clock (Fly machines run NTP).
PROXIED_BY_WINDOW = 60.0


def proxy_key(settings: Settings) -> bytes | None:
    """The key that signs ``tenantdb-proxied-by``: from TENANTDB_PROXY_SECRET, else from the
    bucket's secret access key (every machine of the app has it, no client does); None
    without either (the header is then never trusted)."""
    secret = settings.proxy_secret or settings.secret_access_key
    if secret is None:
        return None
    return hmac.new(b"tenantdb-proxied-by", secret.reveal().encode(), hashlib.sha256).digest()


def _mac(key: bytes, machine_id: str, t: int, method: str, path: str) -> str:
    message = f"{machine_id}\n{t}\n{method}\n{path}".encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_proxied_by(key: bytes, machine_id: str, method: str, path: str, now: float) -> str:
    """The header value naming ``machine_id`` as the proxy of this one request."""
    t = int(now)
    return f"{machine_id};t={t};sig={_mac(key, machine_id, t, method, path)}"


def verify_proxied_by(
    key: bytes | None, value: str, method: str, path: str, now: float
) -> str | None:
    """The machine a signed, current ``tenantdb-proxied-by`` names; None for any other value."""
    parts = [part.strip() for part in value.split(";")]
    if key is None or len(parts) != 3:
        return None
    machine_id, t, sig = parts[0], parts[1].removeprefix("t="), parts[2].removeprefix("sig=")
    if not (t.isascii() and t.isdigit() and len(t) <= 12) or abs(now - int(t)) > PROXIED_BY_WINDOW:
        return None
    if not hmac.compare_digest(sig.encode(), _mac(key, machine_id, int(t), method, path).encode()):
        return None
    return machine_id


# Headers that describe one connection, not the request or response (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Those, plus the ones this hop sets itself. "expect" goes too: 100-continue was already
# answered to the client by this server, and httpx sends the body without waiting anyway.
_REQUEST_DROP = HOP_BY_HOP | frozenset(
    {
        b"expect",
        PROXIED_BY.encode(),
        b"fly-force-instance-id",
    }
)
# This server adds its own date and server headers: copies would be duplicates.
_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"server",
    }
)


class LazyClient:
    """The ``httpx.AsyncClient(**options)`` of an owner that is open, made when first asked."""

    def __init__(self, owner: str, **options: Any) -> None:
        """``owner`` names the class using it, for the error when it is used unopened."""
        self._owner = owner
        self._options = options
        self._open = False
        self._client: httpx.AsyncClient | None = None

    @property
    def is_open(self) -> bool:
        """Between ``open()`` and ``aclose()``."""
        return self._open

    def open(self) -> None:
        """Allow the client to be made (the owner's ``__aenter__``)."""
        if self._open:
            raise RuntimeError(f"{self._owner} is already open")
        self._open = True

    def get(self) -> httpx.AsyncClient:
        """The client, made now if this is its first use."""
        if not self._open:
            raise RuntimeError(f"use {self._owner} in 'async with' before calling it")
        if self._client is None:
            self._client = httpx.AsyncClient(**self._options)
        return self._client

    async def aclose(self) -> None:
        """Close the client if it was made; it can be opened again after."""
        client, self._client, self._open = self._client, None, False
        if client is not None:
            await client.aclose()


class BodyProxy:
    """Stream HTTP requests to another machine and its responses back (pure ASGI).

    Use it as ``async with BodyProxy(...)``: the httpx client lives between enter and exit.
    With ``key`` (``proxy_key``), each request names this machine in a signed
    ``tenantdb-proxied-by``.
    """

    def __init__(
        self,
        machine_url: MachineURL,
        *,
        machine_id: str,
        key: bytes | None = None,
        connect_timeout: float = 5.0,
        timeout: float = 60.0,
    ) -> None:
        if connect_timeout <= 0 or timeout <= 0:
            raise ConfigurationError("proxy timeouts must be positive")
        self.machine_url = machine_url
        self.machine_id = machine_id
        self._key = key
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._client = LazyClient(
            "BodyProxy",
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
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

    async def forward(
        self,
        scope: Scope,
        body: AsyncIterable[bytes],
        send: Send,
        machine_id: str,
        *,
        tenant: str = "",
    ) -> None:
        """Send the request of ``scope`` with ``body`` to ``machine_id``; stream the answer back.

        Raises ``RoutingError`` when the machine cannot be reached or breaks off, or when the
        request would reach it under another path than ``scope``'s; whatever
        ``body`` raises (a client disconnect) propagates unchanged.
        """
        client = self._client.get()
        base = self.machine_url(machine_id).rstrip("/")
        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        query: bytes = scope.get("query_string", b"")
        url = base + raw_path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _REQUEST_DROP]
        if self._key is not None:  # without a key no receiver would trust it
            signed = sign_proxied_by(
                self._key, self.machine_id, scope["method"], scope["path"], time.time()
            )
            headers.append((PROXIED_BY.encode(), signed.encode()))
        # Honoured by Fly's proxy when the URL points at it (Flycast), which then starts the
        # machine if it is stopped; a machine's own server ignores it.
        headers.append((b"fly-force-instance-id", machine_id.encode()))
        where = f"{scope['method']} {url}"
        try:
            request = client.build_request(scope["method"], url, headers=headers, content=body)
            if request.url.path != scope["path"]:
                # httpx resolves dot segments: the machine would get another path than the
                # one its tenant was decided on.
                raise RoutingError(
                    f"the path {scope['path']!r} would reach machine {machine_id} as "
                    f"{request.url.path!r}: not sent",
                    tenant=tenant,
                )
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise RoutingError(
                f"machine {machine_id} could not be reached ({where}): {type(exc).__name__}: {exc}",
                tenant=tenant,
            ) from exc
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v) for k, v in response.headers.raw if k.lower() not in _RESPONSE_DROP
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            log.warning("proxying to machine %s broke off: %s", machine_id, exc)
            raise RoutingError(
                f"machine {machine_id} broke off its response ({where}): {type(exc).__name__}",
                tenant=tenant,
            ) from exc
        finally:
            await response.aclose()
