"""tenantdb's own answers: readable errors (JSON when asked for) and fly-replay."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

__all__ = ["RETRY_AFTER", "send_error", "send_response"]

# Seconds a client is asked to wait before retrying a 503 of this machine's tenant.
RETRY_AFTER = "2"

# Close codes for websockets whose server lacks the denial-response extension.
_WS_CLOSE_CODES = {400: 1008, 404: 1008, 413: 1009, 503: 1013}


def wants_json(scope: Scope) -> bool:
    """True when the client's Accept header prefers JSON."""
    accept = Headers(scope=scope).get("accept", "")
    return "application/json" in accept or "+json" in accept


async def send_response(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    """Send ``response`` on an http scope, or as a websocket denial (or close) on a websocket."""
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get(
        "extensions", {}
    ):
        reason = bytes(response.body).decode(errors="replace")[:120]
        await WebSocketClose(_WS_CLOSE_CODES.get(response.status_code, 1011), reason)(
            scope, receive, send
        )
        return
    await response(scope, receive, send)


async def send_error(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer with ``status`` and a readable message: JSON if the client asks, else text."""
    response: Response
    if wants_json(scope):
        response = JSONResponse({"error": message, "status": status}, status, headers=headers)
    else:
        response = PlainTextResponse(message + "\n", status, headers=headers)
    await send_response(scope, receive, send, response)
