"""`tenantdb init` packages one's own app for Fly.io; the Dockerfile's command serves it.

Docker is not needed: the generated files are read as Docker and Fly read them, the wheel
`init` writes is installed with pip, and the Dockerfile's CMD runs, with the Dockerfile's
environment, in the project directory as the image's WORKDIR: a real uvicorn process on
loopback that serves the app's tenant and stops gracefully on SIGINT, as Fly stops it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from tenantdb.cli.main import main
from tests.support.servers import ROOT, free_port

pytestmark = pytest.mark.usefixtures("clean_environment")

NOTES = """
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tenantdb import TenantDBMiddleware, tenant_db

MIGRATIONS = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"]


async def add_note(request: Request) -> JSONResponse:
    db = tenant_db(request)
    await db.execute("INSERT INTO notes (body) VALUES (?)", [(await request.body()).decode()])
    await db.commit()
    return JSONResponse({"tenant": request.state.tenant}, status_code=201)


async def list_notes(request: Request) -> JSONResponse:
    async with tenant_db(request).execute("SELECT body FROM notes ORDER BY id") as cursor:
        return JSONResponse([body for (body,) in await cursor.fetchall()])


app = Starlette(
    routes=[
        Route("/customers/{tenant}/notes", add_note, methods=["POST"]),
        Route("/customers/{tenant}/notes", list_notes),
    ],
    middleware=[Middleware(TenantDBMiddleware, migrations=MIGRATIONS)],
)
"""


def dockerfile(project: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = (project / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def dockerfile_env(lines: list[str]) -> dict[str, str]:
    return dict(
        pair.split("=", 1) for line in lines if line.startswith("ENV ") for pair in line.split()[1:]
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory with the app module and its dependencies, packaged by `init`."""
    project = tmp_path / "My Notes"
    project.mkdir()
    (project / "notes.py").write_text(NOTES)
    (project / "requirements.txt").write_text("starlette>=0.37\n")
    assert main(["init", "--app", "notes:app", "--dir", str(project)]) == 0
    return project


def test_init_writes_a_dockerfile_serving_the_app_and_a_matching_fly_toml(project: Path) -> None:
    lines = dockerfile(project)
    assert lines[0].startswith("FROM python:3.1")
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user not in ("root", "0")
    [cmd] = [line for line in lines if line.startswith("CMD ")]
    assert json.loads(cmd.removeprefix("CMD ")) == ["tenantdb", "serve"]
    env = dockerfile_env(lines)
    fly = tomllib.loads((project / "fly.toml").read_text())
    assert fly["app"] == "my-notes"  # from the directory's name
    assert env["TENANTDB_APP"] == "notes:app"
    assert (env["HOST"], env["PORT"]) == ("::", "8080")  # 6PN is IPv6 only
    assert fly["kill_signal"] == "SIGINT"
    assert env["TENANTDB_KILL_TIMEOUT"] == str(fly["kill_timeout"])
    assert fly["env"]["TENANTDB_KILL_TIMEOUT"] == str(fly["kill_timeout"])
    assert fly["http_service"]["internal_port"] == int(env["PORT"])
    # Dependencies before the source: a change to the app reuses the installed layer.
    steps = [line for line in lines if line.startswith(("COPY ", "RUN pip"))]
    assert steps == [
        "COPY requirements.txt ./",
        "COPY wheels ./wheels",
        "RUN pip install --requirement requirements.txt",
        "COPY . .",
    ]
    [check] = fly["http_service"]["checks"]
    assert check["path"] == "/healthz"  # answered by TenantDBMiddleware itself
    ignored = (project / ".dockerignore").read_text().splitlines()
    assert {".tenantdb", ".venv", ".env"} <= set(ignored)


def test_the_wheel_init_writes_installs_tenantdb_with_its_dependencies(
    project: Path, tmp_path: Path
) -> None:
    requirements = (project / "requirements.txt").read_text().splitlines()
    [wheel_line] = [line for line in requirements if "tenantdb" in line]
    assert requirements == [wheel_line, "starlette>=0.37"]  # the app's own are kept
    wheel = project / wheel_line
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line for line in archive.read(meta).decode().splitlines() if "Requires-Dist" in line
        ]
    assert "tenantdb/cli/deploy.py" in names
    assert "tenantdb/templates/Dockerfile" in names
    assert "Requires-Dist: uvicorn>=0.30" in requires
    target = tmp_path / "site"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"),
            *("--target", str(target), str(wheel)),
        ],
        check=True,
        timeout=120,
    )
    assert (target / "tenantdb" / "asgi" / "middleware.py").is_file()
    assert (target / "bin" / "tenantdb").is_file()


def test_the_dockerfiles_command_serves_the_app_and_stops_gracefully_on_sigint(
    project: Path, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    lines = dockerfile(project)
    [cmd] = [line for line in lines if line.startswith("CMD ")]
    program, *args = json.loads(cmd.removeprefix("CMD "))
    port = free_port()
    env = {
        **subprocess_env,
        **dockerfile_env(lines),
        # This computer is not the machine: loopback, a free port, a data dir of its own.
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "TENANTDB_DATA_DIR": str(tmp_path / "data"),
        "TENANT_ID": "100",
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / program), *args],
            cwd=project,  # the image's WORKDIR holds the project
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, log_path.read_text()
                try:
                    client.get("/")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.1)
            # As Fly's proxy forwards the client's address: trusted (FORWARDED_ALLOW_IPS).
            added = client.post(
                "/customers/100/notes", content="first", headers={"x-forwarded-for": "203.0.113.7"}
            )
            assert (added.status_code, added.json()) == (201, {"tenant": "100"})
            assert client.get("/customers/100/notes").json() == ["first"]
        server.send_signal(signal.SIGINT)  # fly.toml's kill_signal
        assert server.wait(int(env["TENANTDB_KILL_TIMEOUT"])) == 0, log_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log_text = log_path.read_text()
    assert 'event="203.0.113.7:0 - \\"POST /customers/100/notes HTTP/1.1\\" 201"' in log_text
    assert "lease released" in log_text
    assert "Traceback" not in log_text


def test_init_keeps_existing_files_and_needs_the_apps_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "app"
    project.mkdir()
    assert main(["init", "--app", "notes:app", "--dir", str(project)]) == 1
    assert f"{project} has no notes.py or notes/" in capsys.readouterr().err
    (project / "notes.py").write_text(NOTES)
    (project / "Dockerfile").write_text("FROM scratch\n")
    assert main(["init", "--app", "notes:app", "--dir", str(project)]) == 1
    assert "Dockerfile exist(s)" in capsys.readouterr().err
    assert (project / "Dockerfile").read_text() == "FROM scratch\n"
    forced = ["init", "--app", "notes:app", "--dir", str(project), "--force"]
    assert main([*forced, "--health-path", "/up"]) == 0
    assert "tenantdb serve" in (project / "Dockerfile").read_text()
    [check] = tomllib.loads((project / "fly.toml").read_text())["http_service"]["checks"]
    assert (check["path"], check["method"]) == ("/up", "GET")
    assert main(["init", "--app", "not an app", "--dir", str(project)]) == 2


def test_serve_without_an_app_says_what_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 1
    assert "set TENANTDB_APP" in capsys.readouterr().err


def test_the_fly_toml_of_init_is_the_demos_own(tmp_path: Path) -> None:
    # One configuration, two copies: the repository's (the demo) and the template's.
    (tmp_path / "example_app").mkdir()
    argv = ["init", "--app", "example_app:app", "--dir", str(tmp_path)]
    assert main([*argv, "--name", "tenantdb-demo"]) == 0  # the middleware's /healthz
    written = tomllib.loads((tmp_path / "fly.toml").read_text())
    assert written == tomllib.loads((ROOT / "fly.toml").read_text())
