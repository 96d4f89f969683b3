"""Deploying one's own app: ``tenantdb init`` packages it for Fly.io, ``tenantdb serve`` runs it.

``tenantdb init --app notes:app`` writes into the project directory a ``Dockerfile`` (which
runs ``tenantdb serve`` with ``TENANTDB_APP=notes:app``), a ``fly.toml`` and a
``.dockerignore``, and a wheel of this tenantdb in ``wheels/`` that ``requirements.txt``
names, so that the image installs the same tenantdb without a package index that has it.

``tenantdb serve`` is what a machine runs: uvicorn serving the app on ``HOST``:``PORT``
with tenantdb's log format, the proxy's forwarded headers, and a graceful shutdown on SIGINT
or SIGTERM that leaves most of ``TENANTDB_KILL_TIMEOUT`` to the final publish.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import sys
import zipfile
from importlib import metadata, resources
from pathlib import Path

import uvicorn

import tenantdb
from tenantdb.cli.common import EXIT_FAILURE, EXIT_OK, Command, err
from tenantdb.config import Settings
from tenantdb.errors import ConfigurationError
from tenantdb.logs import configure_logging

__all__ = ["DEPLOY_COMMANDS", "serve_app", "write_wheel"]

_APP_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_FLY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# Of the kill timeout, what uvicorn gives requests in flight; the rest is for the final publish.
_DRAIN_SHARE = 0.3


def _app_spec(value: str) -> str:
    if not _APP_SPEC.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value[:80]!r} is not an ASGI app: give it as module:attribute, e.g. notes:app"
        )
    return value


# --- tenantdb serve ---


def serve_app(app: str) -> None:
    """Serve ``app`` (``module:attribute``) with uvicorn as a tenantdb machine until a signal."""
    settings = Settings.from_env()  # a setting that cannot work stops it here, named
    configure_logging()
    # The app's module is in the working directory (the image's WORKDIR), as uvicorn's own
    # command finds it (its --app-dir, "." by default); a console script's path lacks it.
    sys.path.insert(0, os.getcwd())
    uvicorn.run(
        app,
        # On Fly, the IPv6 wildcard (IPv4 too): Fly's proxy and the private network (IPv6
        # only) reach it. Elsewhere only this computer should.
        host=os.environ.get("HOST") or ("::" if settings.app_name else "127.0.0.1"),
        port=settings.port,
        lifespan="on",
        log_config=None,  # uvicorn's lines too go through tenantdb's format
        # Behind Fly's proxy, X-Forwarded-For and -Proto are the client's; FORWARDED_ALLOW_IPS
        # says whose to trust (the Dockerfile: any, as only the proxy reaches the machine).
        proxy_headers=True,
        timeout_graceful_shutdown=max(1, round(settings.kill_timeout * _DRAIN_SHARE)),
    )


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve an ASGI app with uvicorn as a tenantdb machine: on HOST (default :: on "
        "Fly, 127.0.0.1 elsewhere) "
        "and PORT (default 8080), trusting forwarded headers from FORWARDED_ALLOW_IPS, and "
        "stopping gracefully on SIGINT or SIGTERM within TENANTDB_KILL_TIMEOUT. The Dockerfile "
        "of `tenantdb init` runs it."
    )
    parser.add_argument(
        "app",
        nargs="?",
        type=_app_spec,
        default=os.environ.get("TENANTDB_APP"),
        metavar="MODULE:APP",
        help="the app to serve (default: $TENANTDB_APP)",
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    if not args.app:
        raise ConfigurationError(
            "no app to serve: pass MODULE:APP or set TENANTDB_APP (e.g. notes:app)",
            variable="TENANTDB_APP",
        )
    serve_app(args.app)
    return EXIT_OK


# --- tenantdb init ---


def write_wheel(dest_dir: Path) -> Path:
    """Write a wheel of this tenantdb (the package as installed here) into ``dest_dir``."""
    dist = metadata.distribution("tenantdb")
    version = dist.version
    package = Path(tenantdb.__file__).parent
    files = {
        f"tenantdb/{path.relative_to(package).as_posix()}": path.read_bytes()
        for path in sorted(package.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    info = f"tenantdb-{version}.dist-info"
    requires = [r for r in dist.requires or [] if "extra ==" not in r]
    files[f"{info}/METADATA"] = (
        "Metadata-Version: 2.1\nName: tenantdb\n"
        f"Version: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    ).encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tenantdb init\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\ntenantdb = tenantdb.cli.main:main\n"
    record = [f"{name},sha256={_digest(body)},{len(body)}" for name, body in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    dest_dir.mkdir(parents=True, exist_ok=True)
    wheel = dest_dir / f"tenantdb-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return wheel


def _digest(body: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()


def _health_path(value: str) -> str:
    if not re.fullmatch(r"/[\w./~-]*", value):
        raise argparse.ArgumentTypeError(f"{value[:80]!r} is not a path: e.g. /healthz")
    return value


def _health_check(path: str) -> str:
    """fly.toml's HTTP check of ``path``."""
    return (
        "  [[http_service.checks]]\n"
        '    grace_period = "10s"\n'
        '    interval = "30s"\n'
        '    method = "GET"\n'
        f'    path = "{path}"\n'
        '    timeout = "5s"\n'
    )


def _template(name: str) -> str:
    return resources.files("tenantdb.templates").joinpath(name).read_text()


def _configure_init(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Package your ASGI app for Fly.io: write a Dockerfile (serving MODULE:APP with "
        "`tenantdb serve`), fly.toml and .dockerignore into the project directory, and a "
        "wheel of tenantdb into its wheels/, named in requirements.txt (created if missing). "
        "Existing files are kept unless --force."
    )
    parser.add_argument(
        "--app", required=True, type=_app_spec, metavar="MODULE:APP", help="e.g. notes:app"
    )
    parser.add_argument(
        "--name", help="the Fly app's name in fly.toml (default: the directory's name)"
    )
    parser.add_argument(
        "--dir", type=Path, default=Path(), help="the project directory (default: here)"
    )
    parser.add_argument(
        "--health-path",
        type=_health_path,
        metavar="PATH",
        default="/healthz",
        help="the path of fly.toml's HTTP health check (default: /healthz, which "
        "TenantDBMiddleware answers: red while the machine cannot do its part; give the "
        "middleware's health_path if you moved it)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(handler=_init)


def _init(args: argparse.Namespace) -> int:
    project: Path = args.dir.resolve()
    module = args.app.partition(":")[0]
    top = module.split(".")[0]
    if not ((project / f"{top}.py").is_file() or (project / top).is_dir()):
        err(
            f"error: {project} has no {top}.py or {top}/: run `tenantdb init` in your "
            "project's directory (or pass --dir), with the app's module as Python imports it"
        )
        return EXIT_FAILURE
    name = args.name or re.sub(r"[^a-z0-9-]+", "-", project.name.lower()).strip("-")
    if not _FLY_NAME.fullmatch(name):
        err(f"error: {name!r} is not a Fly app name: pass --name (lowercase letters, digits, -)")
        return EXIT_FAILURE
    files = {
        "Dockerfile": _template("Dockerfile").replace("@APP@", args.app),
        "fly.toml": _template("fly.toml")
        .replace("@NAME@", name)
        .replace("@CHECKS@", _health_check(args.health_path)),
        ".dockerignore": _template("dockerignore"),
    }
    existing = [f for f in files if (project / f).exists()]
    if existing and not args.force:
        err(f"error: {', '.join(existing)} exist(s) in {project}: pass --force to overwrite")
        return EXIT_FAILURE
    for file, text in files.items():
        (project / file).write_text(text)
    wheel = write_wheel(project / "wheels")
    requirement = f"./wheels/{wheel.name}"
    requirements = project / "requirements.txt"
    lines = requirements.read_text().splitlines() if requirements.exists() else []
    # One tenantdb requirement: this wheel, in place of any earlier one.
    kept = [line for line in lines if not re.match(r"\s*(\./wheels/)?tenantdb\b", line)]
    requirements.write_text("\n".join([requirement, *kept]) + "\n")
    err(
        f"wrote Dockerfile (serving {args.app}), fly.toml (app {name}), .dockerignore, "
        f"{requirement} and requirements.txt in {project}: list your app's own dependencies "
        "in requirements.txt, then follow `Deploy your own app` in the README"
    )
    return EXIT_OK


DEPLOY_COMMANDS: dict[str, Command] = {
    "init": Command(
        "write a Dockerfile and fly.toml that deploy your app (module:app)", _configure_init
    ),
    "serve": Command(
        "serve an ASGI app as a tenantdb machine (what the Dockerfile runs)", _configure_serve
    ),
}
