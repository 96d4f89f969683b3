"""The dev proxy's websockets: relaying messages between a client and the machine that
upgraded its handshake, and refusing a handshake as a denial response (or a close).

The only module of tenantdb that imports httpx-ws and wsproto.
"""

from __future__ import annotations

import asyncio

import httpx
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, WebSocketNetworkError
from starlette.types import Message, Receive, Scope, Send
from wsproto.events import BytesMessage, TextMessage

__all__ = ["MAX_MESSAGE_BYTES", "answers", "relay_websocket"]

# The largest message relayed: uvicorn's default ``ws_max_size``, what the machines and
# the proxy's own server accept. httpx-ws closes with 1009 past its own limit, 64 KiB by
# default since 0.10 (before, that number only sized its reads).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def answers(scope: Scope, send: Send) -> Send:
    """``send`` for HTTP answers: on a websocket, as a denial response, or else a close."""
    if scope["type"] == "http":
        return send
    denial = "websocket.http.response" in scope.get("extensions", {})

    async def answer(message: Message) -> None:
        if denial:
            await send({**message, "type": "websocket." + message["type"]})
        elif message["type"] == "http.response.start":
            # The server refuses the handshake (403): the status is lost, the code says why.
            await send({"type": "websocket.close", "code": 1011})

    return answer


async def relay_websocket(response: httpx.Response, receive: Receive, send: Send) -> None:
    """Accept the client's websocket as the machine accepted it; relay messages until a close."""
    session = AsyncWebSocketSession(
        response.extensions["network_stream"],
        # The client's pings are answered by the server in front of the proxy: none needed here.
        keepalive_ping_interval_seconds=None,
        response=response,
        max_message_size_bytes=MAX_MESSAGE_BYTES,
    )
    async with session:
        await send({"type": "websocket.accept", "subprotocol": session.subprotocol})
        directions = {
            asyncio.create_task(_to_machine(receive, session)),
            asyncio.create_task(_to_client(session, send)),
        }
        try:
            done, _ = await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in directions:
                task.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
        for task in done:
            task.result()


async def _to_machine(receive: Receive, session: AsyncWebSocketSession) -> None:
    """Send the client's messages to the machine; pass the client's close on."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            await session.close(message.get("code", 1000), message.get("reason") or None)
            return
        if message.get("text") is not None:
            await session.send_text(message["text"])
        else:
            await session.send_bytes(message.get("bytes") or b"")


async def _to_client(session: AsyncWebSocketSession, send: Send) -> None:
    """Send the machine's messages to the client; pass the machine's close on."""
    while True:
        try:
            event = await session.receive()
        except WebSocketDisconnect as closed:
            await session.close(closed.code, closed.reason or None)
            await send({"type": "websocket.close", "code": closed.code, "reason": closed.reason})
            return
        except WebSocketNetworkError:
            await send({"type": "websocket.close", "code": 1011, "reason": "machine gone"})
            return
        if isinstance(event, TextMessage):
            await send({"type": "websocket.send", "text": event.data})
        elif isinstance(event, BytesMessage):
            await send({"type": "websocket.send", "bytes": bytes(event.data)})
