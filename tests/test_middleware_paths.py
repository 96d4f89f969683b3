"""Request paths against the middleware in process: no 5xx, no lookup for invalid ids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import aiosqlite
import fastapi.dependencies.utils
import pytest
from fastapi import Depends, FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from example_app import MIGRATIONS, create_app
from tenantdb import TenantDBMiddleware, tenant_db, tenant_db_dependency
from tenantdb.routing.replay import Router
from tenantdb.tenants import validate_tenant
from tests.support.apps import local_acme_settings

FORWARDED: list[str] = []


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("paths")


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    app = create_app(settings=local_acme_settings(root))
    original = Router.forward

    async def spy(self: Router, scope, receive, send, tenant):  # type: ignore[no-untyped-def]
        FORWARDED.append(tenant)
        await original(self, scope, receive, send, tenant)

    Router.forward = spy  # type: ignore[method-assign]
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client
    finally:
        Router.forward = original  # type: ignore[method-assign]


segments = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["..", ".", "", "ACME", "acme.", "acme%2F..", "%61cme", "-acme", "a" * 64]),
    st.from_regex(r"[a-z0-9%./-]{1,70}", fullmatch=True),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=segments, rest=st.lists(segments, max_size=3))
def test_no_path_gives_a_5xx_or_reaches_another_tenants_data(
    client: TestClient, first: str, rest: list[str]
) -> None:
    FORWARDED.clear()
    # Unicode and control characters travel percent-encoded, as a browser would send them.
    path = "/customers/" + quote("/".join([first, *rest]), safe="/%.-")
    response = client.get(path, headers={"accept": "application/json"})
    assert response.status_code < 500, (path, response.text)
    for tenant in FORWARDED:
        assert validate_tenant(tenant) == tenant  # only valid ids ever reach routing
    if response.headers["content-type"].startswith("application/json") and response.is_success:
        assert response.json()["tenant"] == "acme"  # the only database this machine opens


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/customers/acme", 200),
        ("/customers/ACME", 400),
        ("/customers/acme.", 400),
        ("/customers/-acme", 400),
        ("/customers/" + "a" * 64, 400),
        ("/customers/other", 404),
        ("/customers/", 404),
        ("/healthz", 200),
    ],
)
def test_path_outcomes(client: TestClient, path: str, status: int) -> None:
    response = client.get(path, headers={"accept": "application/json"})
    assert response.status_code == status, response.text
    if status == 400:
        assert "invalid tenant id" in response.json()["error"]


def test_errors_are_plain_text_unless_json_is_asked_for(client: TestClient) -> None:
    response = client.get("/customers/Nope")
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert "lowercase" in response.text


def test_no_other_tenant_is_ever_created_in_the_bucket(client: TestClient, root: Path) -> None:
    client.get("/customers/other")
    client.get("/customers/%61cme")
    assert sorted(p.name for p in (root / "bucket" / "keys" / "tenants").iterdir()) == ["acme"]


def make_app(root: Path) -> Starlette:
    async def boom(request: Request) -> Response:
        raise ValueError("the app's own bug")

    async def ws_count(websocket: WebSocket) -> None:
        db = tenant_db(websocket)
        await websocket.accept()
        async with db.execute("SELECT count FROM counter") as cursor:
            row = await cursor.fetchone()
        await websocket.send_json(
            {"tenant": websocket.state.tenant, "count": row[0] if row else None}
        )
        await websocket.close()

    return Starlette(
        routes=[
            Route("/customers/{tenant}/boom", boom),
            WebSocketRoute("/customers/{tenant}/ws", ws_count),
        ],
        middleware=[
            Middleware(
                TenantDBMiddleware,
                migrations=MIGRATIONS,
                settings=local_acme_settings(root),
            )
        ],
    )


def test_errors_in_the_apps_own_handlers_pass_through_untouched(tmp_path: Path) -> None:
    with TestClient(make_app(tmp_path)) as client, pytest.raises(ValueError, match="own bug"):
        client.get("/customers/acme/boom")


def test_websockets_of_this_machines_tenant_get_the_database(tmp_path: Path) -> None:
    with TestClient(make_app(tmp_path)) as client:
        with client.websocket_connect("/customers/acme/ws") as ws:
            assert ws.receive_json() == {"tenant": "acme", "count": 0}
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/customers/Acme/ws").__enter__()
        assert denied.value.status_code == 400


@pytest.mark.parametrize("route", ["/customers/acme", "/customers/acme/ws"])
def test_the_fastapi_dependency_runs_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    app = FastAPI()
    app.add_middleware(
        TenantDBMiddleware, migrations=MIGRATIONS, settings=local_acme_settings(tmp_path)
    )

    @app.get("/customers/{tenant}")
    async def count(db: Annotated[aiosqlite.Connection, Depends(tenant_db_dependency)]) -> int:
        async with db.execute("SELECT count FROM counter") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else -1

    @app.websocket("/customers/{tenant}/ws")
    async def ws(
        websocket: WebSocket, db: Annotated[aiosqlite.Connection, Depends(tenant_db_dependency)]
    ) -> None:
        await websocket.accept()
        await websocket.send_json(isinstance(db, aiosqlite.Connection))
        await websocket.close()

    async def no_threads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dependency ran in a worker thread")

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", no_threads)
    with TestClient(app) as client:
        if route.endswith("/ws"):
            with client.websocket_connect(route) as socket:
                assert socket.receive_json() is True
        else:
            assert client.get(route).json() == 0
