"""A tiny Fly Machines API (list by metadata only), served by uvicorn in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class FakeMachines:
    """``GET /v1/apps/{app}/machines?metadata.<key>=<value>`` over a dict of machines."""

    app_name: str
    machines: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)
    status: int = 200
    base_url: str = ""

    def add(self, machine_id: str, state: str, **metadata: str) -> None:
        """Register a machine as the API would describe it."""
        self.machines.append(
            {
                "id": machine_id,
                "name": machine_id,
                "state": state,
                "region": "ams",
                "config": {"metadata": metadata},
            }
        )

    async def _list(self, request: Request) -> Response:
        self.queries.append(dict(request.query_params))
        if request.path_params["app"] != self.app_name:
            return JSONResponse({"error": "app not found"}, 404)
        if self.status != 200:
            return JSONResponse({"error": "internal error"}, self.status)
        wanted = {
            k.removeprefix("metadata."): v
            for k, v in request.query_params.items()
            if k.startswith("metadata.")
        }
        found = [
            m
            for m in self.machines
            if all(m["config"]["metadata"].get(k) == v for k, v in wanted.items())
        ]
        return JSONResponse(found)

    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(routes=[Route("/v1/apps/{app}/machines", self._list)])


@contextmanager
def serve_fake_machines(app_name: str) -> Iterator[FakeMachines]:
    """Serve a FakeMachines on a free loopback port until the block ends."""
    fake = FakeMachines(app_name)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("the fake Machines API did not start")
        time.sleep(0.01)
    fake.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
