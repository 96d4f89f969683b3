"""A fake Fly Machines API: the endpoints tenantdb uses, with every request recorded.

``serve_fake_machines(app_name)`` serves one with uvicorn in a thread on a free loopback
port for the ``with`` block (``fake.base_url`` is then set). Between tests sharing one
served fake, ``reset()`` empties it.

Failure injection: ``fail_next`` answers the next request with (status, body) instead;
``fail_always`` answers every request so; ``list_override`` replaces the answer to a list
(bad or unfiltered data); ``delay`` holds every answer that many seconds; ``retry_after``
is sent as the ``Retry-After`` header of injected failures.

Machines as processes: ``on_create(fake, machine)`` runs when a machine is created (start
its process and set its state, as Fly launches it), ``on_stop(fake, machine_id)`` when one
is asked to stop (send its stop signal; set its state once it has exited). Without them a
created machine stays ``created`` and a stop is instant. Both run on the fake's event loop:
they must not block.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.servers import serve_in_thread


@dataclass
class Recorded:
    """One request as the fake API received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeMachinesAPI:
    """List, create, stop, wait for and destroy machines of one app.

    With a ``token``, requests without ``Authorization: Bearer <token>`` get a 401; with
    None, any request is accepted.
    """

    app_name: str
    token: str | None = None
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail_next: tuple[int, Any] | None = None
    fail_always: tuple[int, Any] | None = None
    list_override: Any = None
    delay: float = 0.0
    retry_after: str | None = None
    base_url: str = ""
    on_create: Callable[[FakeMachinesAPI, dict[str, Any]], None] | None = None
    on_stop: Callable[[FakeMachinesAPI, str], None] | None = None

    def reset(self) -> None:
        """Forget every machine, request and planned failure (between tests)."""
        self.machines.clear()
        self.requests.clear()
        self.fail_next = self.fail_always = self.list_override = self.retry_after = None
        self.on_create = self.on_stop = None
        self.delay = 0.0

    def add(
        self,
        tenant: str | None,
        *,
        state: str = "started",
        key: str = "customer_id",
        machine_id: str | None = None,
        stop_timeout: Any = None,
    ) -> str:
        """Store a machine for ``tenant`` (None: no tenant metadata) and return its id."""
        machine_id = machine_id or secrets.token_hex(7)
        metadata = {key: tenant} if tenant is not None else {"fly_process_group": "app"}
        self.machines[machine_id] = {
            "id": machine_id,
            "name": tenant or "other",
            "state": state,
            "region": "ams",
            "instance_id": f"01INST{machine_id.upper()}",
            "private_ip": "fdaa:0:1::2",
            "config": {"image": "img:1", "metadata": metadata},
        }
        if stop_timeout is not None:
            self.machines[machine_id]["config"]["stop_config"] = {"timeout": stop_timeout}
        return machine_id

    def calls(self, method: str) -> list[Recorded]:
        """The requests made with ``method``, in order."""
        return [r for r in self.requests if r.method == method]

    @property
    def queries(self) -> list[dict[str, str]]:
        """The query parameters of every request, in order."""
        return [r.query for r in self.requests]

    def app(self) -> Starlette:
        """Return the Starlette app serving this fake."""
        base = "/v1/apps/{app}/machines"
        return Starlette(
            routes=[
                Route(base, self._list, methods=["GET"]),
                Route(base, self._create, methods=["POST"]),
                Route(base + "/{id}", self._get, methods=["GET"]),
                Route(base + "/{id}", self._delete, methods=["DELETE"]),
                Route(base + "/{id}/stop", self._stop, methods=["POST"]),
                Route(base + "/{id}/wait", self._wait, methods=["GET"]),
            ]
        )

    async def _guard(self, request: Request) -> Response | None:
        body = await request.body()
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.url.path,
                query=dict(request.query_params),
                headers=dict(request.headers),
                body=json.loads(body) if body else None,
            )
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        failure = self.fail_next or self.fail_always
        self.fail_next = None
        if failure is not None:
            status, payload = failure
            headers = {"retry-after": self.retry_after} if self.retry_after else None
            if isinstance(payload, str):
                return Response(payload, status_code=status, headers=headers)
            return JSONResponse(payload, status_code=status, headers=headers)
        if self.token is not None and (
            request.headers.get("authorization") != f"Bearer {self.token}"
        ):
            return JSONResponse({"error": "You must be authenticated"}, status_code=401)
        if request.path_params["app"] != self.app_name:
            return JSONResponse({"error": "app not found"}, status_code=404)
        machine_id = request.path_params.get("id")
        if machine_id is not None and machine_id not in self.machines:
            return JSONResponse({"error": "machine not found"}, status_code=404)
        return None

    async def _list(self, request: Request) -> Response:
        if (refused := await self._guard(request)) is not None:
            return refused
        if self.list_override is not None:
            return JSONResponse(self.list_override)
        wanted = {
            k.removeprefix("metadata."): v
            for k, v in request.query_params.items()
            if k.startswith("metadata.")
        }
        found = [
            m
            for m in self.machines.values()
            if all(m["config"]["metadata"].get(k) == v for k, v in wanted.items())
        ]
        return JSONResponse(found)

    async def _get(self, request: Request) -> Response:
        if (refused := await self._guard(request)) is not None:
            return refused
        return JSONResponse(self.machines[request.path_params["id"]])

    async def _create(self, request: Request) -> Response:
        if (refused := await self._guard(request)) is not None:
            return refused
        body = self.requests[-1].body
        machine_id = secrets.token_hex(7)
        machine = {
            "id": machine_id,
            "name": body.get("name") or "generated-name",
            "state": "created",
            "region": body.get("region") or "ord",
            "instance_id": "01NEWINSTANCE",
            "private_ip": "fdaa:0:1::9",
            "config": body["config"],
        }
        self.machines[machine_id] = machine
        if self.on_create is not None:
            self.on_create(self, machine)
        return JSONResponse(machine)

    async def _stop(self, request: Request) -> Response:
        if (refused := await self._guard(request)) is not None:
            return refused
        if self.on_stop is not None:
            self.on_stop(self, request.path_params["id"])
        else:
            self.machines[request.path_params["id"]]["state"] = "stopped"
        return JSONResponse({"ok": True})

    async def _wait(self, request: Request) -> Response:
        if (refused := await self._guard(request)) is not None:
            return refused
        machine = self.machines[request.path_params["id"]]
        if machine["state"] != request.query_params.get("state", "started"):
            return JSONResponse({"error": "deadline_exceeded"}, status_code=408)
        return JSONResponse({"ok": True})

    async def _delete(self, request: Request) -> Response:
        if (refused := await self._guard(request)) is not None:
            return refused
        machine_id = request.path_params["id"]
        if self.machines[machine_id]["state"] == "started" and (
            request.query_params.get("force") != "true"
        ):
            return JSONResponse(
                {"error": "failed_precondition: machine still active, refusing to delete"},
                status_code=412,
            )
        del self.machines[machine_id]
        return JSONResponse({"ok": True})


@contextmanager
def serve_fake_machines(app_name: str, token: str | None = None) -> Iterator[FakeMachinesAPI]:
    """Serve a FakeMachinesAPI on a free loopback port until the block ends."""
    fake = FakeMachinesAPI(app_name, token)
    with serve_in_thread(fake.app()) as url:
        fake.base_url = url
        yield fake
