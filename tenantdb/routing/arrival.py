"""How a request reached this machine: direct, replayed by Fly, via the replay cache, sent back
after a failed replay, or through another machine's body proxy.

Read from Fly's request headers (https://fly.io/docs/networking/dynamic-request-routing/) and
tenantdb's own signed ``tenantdb-proxied-by``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Literal

from starlette.datastructures import Headers
from starlette.types import Scope

from tenantdb.routing.machines import validate_machine_id
from tenantdb.routing.proxy import PROXIED_BY, verify_proxied_by

__all__ = [
    "Arrival",
    "ReplaySource",
    "RequestArrival",
    "arrival_of",
    "invalidation",
    "is_machine_id",
    "printable",
]

log = logging.getLogger("tenantdb.routing")

Arrival = Literal["direct", "replayed", "cache-hit", "failed", "proxied"]


@dataclass(frozen=True, slots=True)
class ReplaySource:
    """The ``fly-replay-src`` request header: which machine replayed this request here."""

    instance: str
    region: str | None = None
    t: int | None = None
    state: str | None = None

    @classmethod
    def parse(cls, value: str) -> ReplaySource | None:
        """Parse ``instance=<id>;region=<r>;t=<us>;state=<s>``; None if it is malformed.

        Commas are accepted as field separators as well as semicolons.
        """
        fields: dict[str, str] = {}
        for part in re.split("[;,]", value):
            key, sep, item = part.partition("=")
            key = key.strip().lower()
            if sep and key and key not in fields:
                fields[key] = item.strip()
        try:
            instance = validate_machine_id(fields.get("instance", ""))
        except ValueError:
            return None
        t = fields.get("t", "")
        return cls(
            instance=instance,
            region=fields.get("region") or None,
            t=int(t) if t.isascii() and t.isdigit() else None,
            state=fields.get("state"),
        )


@dataclass(frozen=True, slots=True)
class RequestArrival:
    """How a request reached this machine, and from which machine when that is known."""

    how: Arrival
    source: str | None = None
    detail: str = ""


def arrival_of(scope: Scope, proxy_key: bytes | None) -> RequestArrival:
    """How the request says it arrived. Only ``tenantdb-proxied-by`` is authenticated: Fly's
    proxy appends ``fly-replay-src`` and sets ``fly-replay-failed``, but documents nothing
    about removing a client's own (https://fly.io/docs/networking/dynamic-request-routing/),
    so what they trigger (a fresh lookup, a forgotten route) is rate-limited per tenant."""
    headers = Headers(scope=scope)
    failed = headers.get("fly-replay-failed")
    if failed is not None:
        return RequestArrival("failed", detail=printable(failed))
    proxied = headers.get(PROXIED_BY)
    if proxied is not None:
        proxy = verify_proxied_by(
            proxy_key, proxied, scope.get("method", ""), scope["path"], time.time()
        )
        if proxy is not None and is_machine_id(proxy):
            return RequestArrival("proxied", proxy)
        log.debug("ignoring an unsigned or stale %s header", PROXIED_BY)
    raw_source = headers.get("fly-replay-src")
    if raw_source is not None:
        source = ReplaySource.parse(raw_source)
        if source is not None:
            return RequestArrival("replayed", source.instance)
        log.debug("ignoring malformed fly-replay-src header %r", raw_source[:80])
    if headers.get("fly-replay-cache-status", "").strip().lower() == "hit":
        return RequestArrival("cache-hit")
    return RequestArrival("direct")


def is_machine_id(value: str) -> bool:
    """Whether ``value`` is a well-formed Fly machine id."""
    try:
        validate_machine_id(value)
    except ValueError:
        return False
    return True


def printable(value: str, limit: int = 120) -> str:
    """``value`` fit for a message: printable ASCII only, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in value)
    return text[:limit] + ("..." if len(text) > limit else "")


def invalidation(arrival: RequestArrival) -> dict[str, str]:
    """The header that drops the replay cache entry that sent a request here, if one did."""
    return {"fly-replay-cache": "invalidate"} if arrival.how == "cache-hit" else {}
