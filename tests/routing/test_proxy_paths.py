"""The large-body proxy sends a request to the machine of the tenant its path names, under
that very path: a path that a client or httpx would resolve (``..``) never changes tenants
on the way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from tenantdb import TenantDBMiddleware
from tenantdb.config import Settings
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.errors import RoutingError
from tenantdb.routing.proxy import BodyProxy
from tests.support.servers import serve_in_thread

APP = "routeapp"
BODY = 2 << 20  # over Fly's replay limit: streamed by the body proxy


class Recorder:
    """A machine's server that notes each request's path and headers, then answers 200."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append((scope["path"], headers))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"beta"})


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"the router's own app"})


@contextlib.asynccontextmanager
async def served(app: Any, **options: Any) -> AsyncIterator[str]:
    """``serve_in_thread`` entered off this loop (the DNS responder answers on it)."""
    with contextlib.ExitStack() as stack:
        url = await asyncio.to_thread(stack.enter_context, serve_in_thread(app, **options))
        try:
            yield url
        finally:
            await asyncio.to_thread(stack.close)


async def raw_post(url: str, target: str, size: int) -> bytes:
    """POST ``target`` exactly as written (no client resolves its dot segments).

    With ``Expect: 100-continue``, so that a server that answers at once (before reading the
    body) gets no body it would reset the connection over.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {target} HTTP/1.1\r\nHost: {APP}.fly.dev\r\nContent-Length: {size}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 100"):
            return head + await asyncio.wait_for(reader.read(), 10)
        writer.write(b"x" * size)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "target",
    ["/customers/beta/../../internal/admin", "/customers/beta/%2e%2e/%2E%2E/internal/admin"],
)
async def test_a_dot_segment_path_is_refused_not_proxied_to_another_path(
    tmp_path: Path, target: str
) -> None:
    beta = Recorder()
    async with DevDNSServer(APP) as dns, served(beta) as beta_url:
        dns.set_machine("m2beta", {"customer_id": "beta"})
        settings = Settings(
            app_name=APP,
            machine_id="m0self",
            dns_server=dns.address,
            local_bucket_dir=tmp_path / "bucket",
            data_dir=tmp_path / "data",
            metrics_port=0,
        )
        router = TenantDBMiddleware(inner, settings=settings, machine_url=lambda _: beta_url)
        async with served(router, lifespan="on") as url:
            refused = await raw_post(url, target, BODY)
            plain = await raw_post(url, "/customers/beta/upload", BODY)
    assert refused.startswith(b"HTTP/1.1 400"), refused[:200]
    assert b"'..'" in refused
    # Only the plain request reached beta's machine, under the path it was routed by.
    assert plain.startswith(b"HTTP/1.1 200"), plain[:200]
    assert [path for path, _ in beta.received] == ["/customers/beta/upload"]


async def test_the_body_proxy_sends_nothing_it_would_send_under_another_path() -> None:
    beta = Recorder()
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def body() -> AsyncIterator[bytes]:
        yield b"x"

    path = "/customers/beta/../../internal/admin"
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode()}
    async with served(beta) as beta_url:
        proxy = BodyProxy(lambda _: beta_url, machine_id="m0self")
        async with proxy:
            with pytest.raises(RoutingError, match="would reach machine m2beta as '/internal"):
                await proxy.forward({**scope, "headers": []}, body(), send, "m2beta")
    assert beta.received == []
    assert sent == []
