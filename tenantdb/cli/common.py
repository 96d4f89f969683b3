"""What every ``tenantdb`` subcommand shares: exit codes, output streams, argument types.

Data (tables, ``--json``) goes to stdout and everything meant for a person (progress,
questions, errors) to stderr, so that ``tenantdb status --json | jq`` sees only data.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tenantdb.config import Secret, Settings, parse_duration
from tenantdb.errors import ConfigurationError, InvalidTenantError
from tenantdb.parsing import printable
from tenantdb.tenants import validate_tenant

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "TIME_HELP",
    "Command",
    "confirm",
    "err",
    "fly_settings",
    "format_age",
    "format_size",
    "iso",
    "out",
    "parse_time",
    "positive_int",
    "print_table",
    "safe",
    "tenant_arg",
    "time_arg",
]

PROG = "tenantdb"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TIME_HELP = (
    "an ISO 8601 time (2026-11-29T10:00:00Z; a time without an offset is UTC) or a time ago: "
    "90s, 10m, 2h, 1d"
)
_RELATIVE_RE = re.compile(r"\d+(?:\.\d+)?[smhd]")


@dataclass(frozen=True)
class Command:
    """A top-level subcommand: its one-line help and the function that fills its parser."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]


def safe(text: str) -> str:
    """``text`` with every non-printable character but newlines escaped (``\\x1b``).

    Owners, regions, keys and error messages may come from bucket objects anyone with
    credentials can write: raw, an escape sequence would reach the operator's terminal.
    """
    return "\n".join(printable(line) for line in text.split("\n"))


def out(text: str) -> None:
    """Print data to stdout, escaped (see ``safe``)."""
    # sys.stdout is looked up per call so redirections (and pytest's capsys) apply.
    print(safe(text), file=sys.stdout)


def err(text: str) -> None:
    """Print a message for a person to stderr, after the command's name, escaped."""
    print(f"{PROG}: {safe(text)}", file=sys.stderr)


def confirm(question: str) -> bool:
    """Ask a yes/no question on stderr and read the answer from stdin; only yes is yes."""
    # The question goes to stderr so that stdout stays clean for scripts.
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in {"y", "yes"}


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Print rows (the first is the header) to stdout in left-aligned columns, escaped."""
    rows = [[safe(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def format_size(size: int) -> str:
    """A byte count for people: 812 B, 4.0 KiB, 1.5 MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def iso(moment: datetime | None) -> str | None:
    """A moment as ISO 8601 to the second, for people and JSON (None stays None)."""
    return moment.isoformat(timespec="seconds") if moment else None


def format_age(seconds: float) -> str:
    """A duration for people, rounded: 42s, 5m, 3h, 2d."""
    seconds = max(seconds, 0.0)
    for limit, unit, size in ((120, "s", 1), (7200, "m", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds / 86400:.0f}d"


# --- argument types: raise ArgumentTypeError so argparse reports a usage error (exit 2) ---


def tenant_arg(value: str) -> str:
    """A tenant id argument."""
    try:
        return validate_tenant(value)
    except InvalidTenantError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(value: str) -> int:
    """A whole number of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} must be at least 1")
    return number


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_pair(value: str) -> tuple[str, str]:
    """``NAME=VALUE`` as a pair, NAME a valid environment variable name."""
    name, sep, val = value.partition("=")
    if not sep or not _ENV_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value[:80]!r}")
    return name, val


def port_number(value: str) -> int:
    """A TCP port: 1 to 65535."""
    number = positive_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a TCP port")
    return number


def parse_time(value: str, *, now: datetime) -> datetime:
    """An aware UTC time from ISO 8601 (naive means UTC) or a time before ``now`` (``10m``)."""
    text = value.strip()
    if _RELATIVE_RE.fullmatch(text):
        return now - timedelta(seconds=parse_duration(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value[:80]!r} is not a time: use {TIME_HELP}") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def time_arg(value: str) -> datetime:
    """A TIME argument (see ``TIME_HELP``), relative forms counted back from now."""
    try:
        return parse_time(value, now=datetime.now(UTC))
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fly_settings(args: argparse.Namespace) -> tuple[Settings, str, Secret]:
    """Return settings with the app name and the token that every Fly call needs."""
    overrides = {"app_name": args.app, "machines_api_url": args.api_url}
    settings = Settings.from_env(**{k: v for k, v in overrides.items() if v})
    if not settings.app_name or settings.fly_api_token is None:
        # Every missing setting at once, so that one fix is enough.
        missing = [
            text
            for text, absent in (
                ("the Fly app: set FLY_APP_NAME or pass --app", not settings.app_name),
                (
                    "a Fly API token: set FLY_API_TOKEN (from `fly tokens create deploy`)",
                    settings.fly_api_token is None,
                ),
            )
            if absent
        ]
        raise ConfigurationError("missing " + "; and ".join(missing))
    return settings, settings.app_name, settings.fly_api_token
