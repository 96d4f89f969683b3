"""Checks shared by every parser of bucket objects: total, bounded, never trusting a field.

Each parser (``lockfile``, ``replication.history``, ``replication.segment``) turns any
byte string into its typed value or into its own ``TenantDBError`` naming the key. These
helpers answer ``Malformed`` (with a reason) or None; the parser translates that at its
boundary. None of them allocates or loops more than the input's own size.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "MAX_COUNTER",
    "MAX_JSON_DEPTH",
    "MAX_TEXT",
    "MAX_TIME_MS",
    "Malformed",
    "bounded_int",
    "bounded_text",
    "load_json",
    "parse_iso_time",
    "printable",
    "time_of_ms",
]

# Generations, sequence numbers, log indices, sizes: far above anything real, and exact in
# a double (JSON readers elsewhere may use one).
MAX_COUNTER = 2**53 - 1
# tenantdb's own JSON objects nest three levels deep.
MAX_JSON_DEPTH = 16
# Owners, regions, claims, keys: machine ids and bucket keys are far shorter.
MAX_TEXT = 1024
# The times tenantdb writes: after the Unix epoch and before the year 9000, so that any
# arithmetic on them (ages, ``fromtimestamp``) stays within ``datetime``'s range.
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)
MAX_TIME_MS = int((_LATEST - _EARLIEST).total_seconds()) * 1000
_ISO_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})", re.ASCII
)
# Strings are skipped (with their escapes) when counting brackets: unrolled, so linear.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class Malformed(ValueError):
    """A bucket object is not what tenantdb writes; ``reason`` says why (bounded, escaped)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def load_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON nested at most ``max_depth`` levels; ``Malformed`` for anything else.

    The depth is counted before the parser runs, so a deep document never recurses.
    NaN and Infinity, which Python's parser takes, are refused: they are not JSON.
    """
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub(b'""', bytes(body))):
        if match[0] in b"[{":
            depth += 1
            if depth > max_depth:
                raise Malformed(f"nested more than {max_depth} levels deep")
        else:
            depth -= 1
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise Malformed("not valid JSON") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def bounded_int(value: object, low: int, high: int = MAX_COUNTER) -> int | None:
    """``value`` if it is an int (not a bool) within ``low..high``, else None."""
    return value if type(value) is int and low <= value <= high else None


def bounded_text(value: object, *, max_length: int = MAX_TEXT) -> str | None:
    """``value`` if it is a printable string of at most ``max_length`` characters, else None."""
    if isinstance(value, str) and len(value) <= max_length and value.isprintable():
        return value
    return None


def parse_iso_time(value: object) -> datetime | None:
    """An aware UTC time from strict ISO 8601 with an offset, within a sane range; else None."""
    if not isinstance(value, str) or len(value) > 40 or not _ISO_TIME.fullmatch(value):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:  # 2026-02-31 and the like
        return None
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00
        return None
    return moment if _EARLIEST <= moment < _LATEST else None


def time_of_ms(ms: int) -> datetime:
    """The aware UTC time ``ms`` Unix milliseconds stand for (``0 <= ms <= MAX_TIME_MS``)."""
    if not 0 <= ms <= MAX_TIME_MS:
        raise Malformed(f"time {ms} ms is outside 0..{MAX_TIME_MS}")
    return _EARLIEST + timedelta(milliseconds=ms)


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped, for a terminal or a log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
