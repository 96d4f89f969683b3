"""Call an ASGI app in process with hand-made scopes, its lifespan running in a thread.

``LiveASGI(app)`` starts an event loop in a daemon thread, runs the app's ``lifespan``
startup there, and then answers ``request(...)`` calls from any (synchronous) test, such as
a hypothesis test making hundreds of calls. Scopes are built by hand, so headers may hold
any bytes a client could send and nothing normalises the path on the way. ``close()`` runs
the lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

__all__ = ["Answer", "LiveASGI"]


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as the app sent it."""

    status: int
    headers: dict[str, str]
    body: bytes
    error: BaseException | None = None  # an exception that escaped the app


class LiveASGI:
    """An ASGI app with its lifespan started, callable from synchronous code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._to_app: asyncio.Queue[Message] | None = None
        self._from_app: asyncio.Queue[Message] | None = None
        self._lifespan: asyncio.Future[Any] | None = None

    def start(self, timeout: float = 30) -> LiveASGI:
        """Run the lifespan startup; raise if the app reports it failed."""
        self._thread.start()
        message = self._run(self._startup(), timeout)
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"lifespan startup failed: {message.get('message')}")
        return self

    async def _startup(self) -> Message:
        self._to_app, self._from_app = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.ensure_future(
            self.app(scope, self._to_app.get, self._from_app.put)
        )
        await self._to_app.put({"type": "lifespan.startup"})
        return await self._from_app.get()

    def close(self, timeout: float = 30) -> None:
        """Run the lifespan shutdown and stop the thread."""
        try:
            if self._lifespan is not None and not self._lifespan.done():
                self._run(self._shutdown(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop.close()

    async def _shutdown(self) -> None:
        assert self._to_app is not None
        assert self._from_app is not None
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        assert self._lifespan is not None
        await asyncio.wait_for(self._lifespan, 10)

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the app's event loop (e.g. a call on one of its parts)."""
        return self._run(coro, timeout)

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: Sequence[tuple[bytes, bytes]] = (),
        query: bytes = b"",
        body: bytes = b"",
        raw_path: bytes | None = None,
        timeout: float = 30,
    ) -> Answer:
        """Send one HTTP request; return the answer (or the exception the app raised)."""
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": raw_path if raw_path is not None else path.encode("utf-8", "replace"),
            "query_string": query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in headers],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
            "state": {},
        }
        return self._run(self._call(scope, body), timeout)  # type: ignore[no-any-return]

    async def _call(self, scope: dict[str, Any], body: bytes) -> Answer:
        sent_body = False
        messages: list[Message] = []

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # the client stays connected
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            messages.append(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            error = exc
        start = next((m for m in messages if m["type"] == "http.response.start"), None)
        if start is None:
            return Answer(500, {}, b"", error or RuntimeError("no response was started"))
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
        bodies = [m.get("body", b"") for m in messages if m["type"] == "http.response.body"]
        content = b"".join(bodies)
        return Answer(start["status"], headers, content, error)
