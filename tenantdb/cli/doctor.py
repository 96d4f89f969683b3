"""``tenantdb doctor``: check a deployment before and after deploying (see tenantdb.cli.checks)."""

from __future__ import annotations

import argparse
import asyncio
import json

from tenantdb.cli.checks import CheckResult, run_checks
from tenantdb.cli.common import EXIT_FAILURE, EXIT_OK, Command, out
from tenantdb.config import Settings

__all__ = ["DOCTOR_COMMANDS"]

_MARKS = {"pass": "ok  ", "fail": "FAIL", "warn": "warn", "skip": "skip"}


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check the deployment the environment points at, one line per check with what to do "
        "when it fails: the bucket (reachable, conditional writes enforced, consistent "
        "across the regions in use), the app's machines (stop timeout, autostop, metrics, "
        "restart policy, metadata key, images; with FLY_API_TOKEN) and the Flycast address "
        "(from inside Fly). Exit status 0 when no check failed (skipped checks and warnings "
        "say why), 1 otherwise."
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--app", help="Fly app name (default: $FLY_APP_NAME)")
    parser.add_argument(
        "--api-url",
        metavar="URL",
        help="Machines API base URL (default: $TENANTDB_MACHINES_API_URL)",
    )
    parser.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    overrides = {"app_name": args.app, "machines_api_url": args.api_url}
    settings = Settings.from_env(**{k: v for k, v in overrides.items() if v})
    results = asyncio.run(run_checks(settings))
    ok = all(r.status != "fail" for r in results)
    if args.json:
        out(json.dumps({"ok": ok, "checks": [r.to_json() for r in results]}, indent=2))
    else:
        for result in results:
            out(_line(result))
    return EXIT_OK if ok else EXIT_FAILURE


def _line(result: CheckResult) -> str:
    """One line: the mark, the check, what was found, and what to do (after "->")."""
    line = f"{_MARKS[result.status]}  {result.check}: {result.detail}"
    return f"{line} -> {result.fix}" if result.fix else line


DOCTOR_COMMANDS: dict[str, Command] = {
    "doctor": Command(
        help="check the bucket, the machines and Fly's setup of a deployment",
        configure=_configure,
    ),
}
