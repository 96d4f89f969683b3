"""Log lines: one per event, ``key=value`` by default, JSON with ``TENANTDB_LOG_FORMAT=json``.

Every line of the ``tenantdb`` loggers carries ``tenant=`` and ``generation=``: the record's
own (``extra={"tenant": ...}``) or else those of the tenant this machine serves, which
``follow()`` names (one per machine). A line has no other source of text than the record's
message, and tenantdb's messages never hold a secret (``config.Secret``).

    from tenantdb.logs import configure_logging
    configure_logging()  # on the root logger, format from TENANTDB_LOG_FORMAT
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

from tenantdb.errors import ConfigurationError
from tenantdb.metrics import WatchedTenant

__all__ = [
    "JSONFormatter",
    "KeyValueFormatter",
    "LogFormat",
    "RecurringProblem",
    "configure_logging",
    "follow",
    "formatter",
]

LogFormat = Literal["keyvalue", "json"]

# A value that needs no quotes: no space, quote, equals sign or control character.
_BARE = re.compile(r"[^\s\"=\\]+")
_followed: WatchedTenant | None = None


def follow(tdb: WatchedTenant | None) -> None:
    """Name the tenant (and so the generation) that lines without their own describe."""
    global _followed
    _followed = tdb


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, str]:
    event = record.getMessage()
    if record.exc_info:
        event = f"{event}\n{formatter.formatException(record.exc_info)}"
    tenant = getattr(record, "tenant", None)
    generation = getattr(record, "generation", None)
    followed = _followed
    if tenant is None and followed is not None and record.name.startswith("tenantdb"):
        tenant, generation = followed.tenant, followed.generation()
    stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
    return {
        "time": stamp.replace("+00:00", "Z"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": event,
        "tenant": "" if tenant is None else str(tenant),
        "generation": "" if generation is None else str(generation),
    }


def _quoted(value: str) -> str:
    """The value as is when it is one plain word, else in double quotes, escaped as JSON."""
    return value if _BARE.fullmatch(value) else json.dumps(value, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``time=... level=... logger=... event="..." tenant=... generation=...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """One line of ``key=value`` pairs; values with spaces or quotes are quoted."""
        return " ".join(f"{key}={_quoted(value)}" for key, value in _fields(record, self).items())


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with the keys of ``KeyValueFormatter``."""

    def format(self, record: logging.LogRecord) -> str:
        """One line of JSON."""
        return json.dumps(_fields(record, self), ensure_ascii=False)


def formatter(env: Mapping[str, str] | None = None) -> logging.Formatter:
    """The formatter ``TENANTDB_LOG_FORMAT`` chooses: ``keyvalue`` (default) or ``json``."""
    raw = (os.environ if env is None else env).get("TENANTDB_LOG_FORMAT") or "keyvalue"
    choice = raw.strip().lower()
    if choice == "json":
        return JSONFormatter()
    if choice == "keyvalue":
        return KeyValueFormatter()
    raise ConfigurationError(
        f"TENANTDB_LOG_FORMAT={raw[:80]!r} is not a log format; allowed: 'keyvalue' or 'json'",
        variable="TENANTDB_LOG_FORMAT",
    )


def configure_logging(level: int = logging.INFO, env: Mapping[str, str] | None = None) -> None:
    """Send the root logger's records to stderr, one line each in the chosen format.

    It replaces any handler of the root logger that already writes to stderr (a
    ``logging.basicConfig()`` run by an imported module, or an earlier call), so that each
    event is printed once, in this format; handlers that write elsewhere stay. The root
    logger's level becomes ``level`` unless it was set lower (DEBUG, say) already.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(env))
    root = logging.getLogger()
    for old in list(root.handlers):
        if type(old) is logging.StreamHandler and old.stream in (sys.stderr, sys.__stderr__):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(min(level, root.level) if root.level != logging.NOTSET else level)


class RecurringProblem:
    """One warning per problem while it recurs (then one a minute), not one per attempt."""

    REPEAT_AFTER = 60.0

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: tuple[str, float] | None = None  # the problem, when it was last logged

    def warn(self, message: str, *args: object) -> None:
        """Log ``message % args`` unless that same line was logged within a minute."""
        text = message % args if args else message
        now = time.monotonic()
        if self._last is None or self._last[0] != text or now - self._last[1] > self.REPEAT_AFTER:
            self._logger.warning(text)
            self._last = (text, now)

    def clear(self) -> bool:
        """The problem is gone; whether one had been logged."""
        was, self._last = self._last is not None, None
        return was
