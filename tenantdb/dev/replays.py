"""Fly's replay rules, emulated: fly-replay directives, the replay cache, load balancing, and
the fallback that sends a failed replay back.

As https://fly.io/docs/networking/dynamic-request-routing/ describes them (``dev.proxy`` has
the details).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import httpx

from tenantdb.dev.backends import STARTABLE, MachineInfo, MachineState, held_down
from tenantdb.dev.http_relay import ProxyError

__all__ = [
    "MAX_REPLAYS",
    "MIN_CACHE_TTL",
    "CacheStatus",
    "Hop",
    "ReplayCache",
    "ReplayDirective",
    "ReplayFailed",
    "ReplayVia",
    "choose_machine",
    "fall_back",
    "replay_src",
    "valid_replay",
]

log = logging.getLogger("tenantdb.dev.proxy")

MAX_REPLAYS = 10
MIN_CACHE_TTL = 10

ReplayVia = Literal["fly-replay", "cache"]
CacheStatus = Literal["miss", "hit", "bypass"]
Fallback = Literal["force_self", "prefer_self"]
# Why a replay failed, in fly-replay-failed: the reasons Fly documents.
FailReason = Literal["timeout", "retries_exhausted", "no_candidate"]
_FALLBACKS: dict[str, Fallback] = {"force_self": "force_self", "prefer_self": "prefer_self"}
_DURATION_RE = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class ReplayDirective:
    """A parsed ``fly-replay`` response header (or the routing headers of a request)."""

    instance: str | None = None
    prefer_instance: str | None = None
    regions: tuple[str, ...] = ()
    app: str | None = None
    elsewhere: bool = False
    state: str | None = None
    fallback: Fallback | None = None
    # Seconds the proxy tries to reach the target before the replay fails (None: no bound).
    timeout: float | None = None

    @classmethod
    def parse(cls, value: str) -> ReplayDirective:
        """Parse ``field=value;field=value``; values may be quoted, unknown fields are ignored.

        Raises ``ValueError`` for a ``timeout`` that is no duration (``10s``, ``800ms``).
        """
        fields: dict[str, str] = {}
        for part in value.split(";"):
            name, _, raw = part.partition("=")
            fields[name.strip().lower()] = raw.strip().strip('"')
        timeout = fields.get("timeout")
        return cls(
            timeout=None if timeout is None else _duration(timeout),
            instance=fields.get("instance") or None,
            prefer_instance=fields.get("prefer_instance") or None,
            regions=tuple(r.strip() for r in fields.get("region", "").split(",") if r.strip()),
            app=fields.get("app") or None,
            elsewhere=fields.get("elsewhere", "").lower() == "true",
            state=fields.get("state"),
            fallback=_FALLBACKS.get(fields.get("fallback", "")),
        )


@dataclass(frozen=True)
class _CacheEntry:
    """A cached replay: requests under ``host`` + ``prefix`` go where ``directive`` says."""

    host: str
    prefix: str
    directive: ReplayDirective
    source: MachineInfo
    allow_bypass: bool
    expires_at: float

    def matches(self, host: str, path: str) -> bool:
        return host == self.host and (path == self.prefix or path.startswith(self.prefix + "/"))


@dataclass(frozen=True)
class Hop:
    """Where the next attempt of a request goes, and what the proxy tells that machine."""

    directive: ReplayDirective
    source: MachineInfo | None = None
    via: ReplayVia = "fly-replay"
    cache_status: CacheStatus | None = None
    # Why the replay before this hop failed: the request is on its way back (fallback).
    failed: str | None = None


class ReplayFailed(ProxyError):
    """The proxy could not hand the request to its target: a fallback may take it back.

    ``reason`` is one of the three Fly documents for ``fly-replay-failed``; ``target`` and
    ``region`` name the machine the replay was for, when there is one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: FailReason = "no_candidate",
        target: MachineInfo | None = None,
    ) -> None:
        super().__init__(status, message)
        self.reason: FailReason = reason
        self.target = target


def _duration(text: str) -> float:
    """Seconds of a fly-replay ``timeout`` such as ``10s`` or ``800ms``; ValueError otherwise."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"timeout {text[:40]!r} is not a duration such as 10s or 800ms")
    return float(match["number"]) * _DURATION_UNITS[match["unit"]]


def valid_replay(value: str, headers: httpx.Headers, machine: MachineInfo) -> ReplayDirective:
    """The fly-replay of ``machine``'s answer, or PA03 as Fly answers an invalid one.

    "The ``timeout`` and ``fallback`` fields cannot be set in the ``fly-replay`` intended to
    be cached" (https://fly.io/docs/networking/dynamic-request-routing/, "Requirements and
    Limitations"); PA03 is "Invalid fly-replay" (https://fly.io/docs/reference/error-codes/).
    """
    try:
        directive = ReplayDirective.parse(value)
    except ValueError as exc:
        raise ProxyError(
            502, f"PA03: invalid fly-replay from {machine.machine_id}: {exc}"
        ) from None
    cached = headers.get("fly-replay-cache", "invalidate") != "invalidate"
    if cached and (directive.timeout is not None or directive.fallback is not None):
        raise ProxyError(
            502,
            f"PA03: invalid fly-replay from {machine.machine_id}: timeout and fallback cannot "
            "be set on a fly-replay with fly-replay-cache",
        )
    return directive


def fall_back(hop: Hop, failure: ReplayFailed, app: str, elapsed: float) -> Hop:
    """The hop back to the machine that asked for a failed replay, if its fallback allows.

    Without a fallback (or on the way back already) ``failure`` is raised: the client gets
    the proxy's error. The hop carries ``fly-replay-failed`` as Fly writes it:
    ``instance=..;app=..;region=..;replay_source=..;reason=..;elapsed_ms=..``
    (https://fly.io/docs/networking/dynamic-request-routing/, "The fly-replay-failed Header").
    """
    source = hop.source
    fallback = hop.directive.fallback
    if source is None or fallback is None or hop.failed is not None or hop.via != "fly-replay":
        raise failure
    log.info("replay to failed (%s): back to %s (%s)", failure, source.machine_id, fallback)
    back = (
        ReplayDirective(instance=source.machine_id)
        if fallback == "force_self"
        else ReplayDirective(prefer_instance=source.machine_id)
    )
    target = failure.target
    fields = {
        "instance": target.machine_id if target else hop.directive.instance,
        "app": app,
        "region": target.region if target else None,
        "replay_source": source.machine_id,
        "reason": failure.reason,
        "elapsed_ms": str(round(elapsed * 1000)),
    }
    failed = ";".join(f"{name}={value}" for name, value in fields.items() if value)
    return Hop(back, failed=failed)


def replay_src(source: MachineInfo, directive: ReplayDirective) -> str:
    """The ``fly-replay-src`` value Fly adds to a replayed request."""
    value = f"instance={source.machine_id};region={source.region};t={time.time_ns() // 1000}"
    return value if directive.state is None else f"{value};state={directive.state}"


def choose_machine(
    hop: Hop,
    machines: Sequence[MachineInfo],
    app: str,
    rng: random.Random,
    *,
    near: str | None = None,
) -> tuple[MachineInfo, str | None]:
    """Pick the next machine as Fly's load balancer would, and a preferred one passed over.

    Load balancing prefers machines in ``near``, the region the request entered in: "Send
    traffic to the least loaded, closest Machine"; "Cross-region routing only happens when
    all Machines in the local region are unhealthy or at their hard_limit"
    (https://fly.io/docs/reference/load-balancing/).
    """
    by_id = {m.machine_id: m for m in machines}
    directive = hop.directive
    if directive.app not in (None, app):
        raise ProxyError(502, f"replays to other apps ({directive.app}) are not emulated")
    if directive.instance is not None:
        machine = by_id.get(directive.instance)
        if machine is None:
            raise ReplayFailed(502, f"no machine {directive.instance} in app {app}")
        if machine.state == "stopping":
            raise ReplayFailed(
                503,
                f"PM08: machine {machine.machine_id} is stopping and takes no requests",
                target=machine,
            )
        if held_down(machine):
            raise ReplayFailed(
                503,
                f"machine {machine.machine_id} is {machine.state} and its service has "
                "autostart off: the proxy does not start it",
                target=machine,
            )
        return machine, None
    preferred = directive.prefer_instance
    if preferred is not None:
        machine = by_id.get(preferred)
        if machine is not None and machine.state != "failed" and not held_down(machine):
            return machine, None
    regions = set(directive.regions)
    excluded = hop.source.machine_id if directive.elsewhere and hop.source else None
    candidates = [
        m
        for m in by_id.values()
        if (not regions or "any" in regions or m.region in regions)
        and m.machine_id != excluded
        and not held_down(m)
    ]
    local = [m for m in candidates if m.region == near]
    started: tuple[MachineState, ...] = ("started",)
    tiers = ((local, started), (local, STARTABLE), (candidates, started), (candidates, STARTABLE))
    for nearby, states in tiers:
        pool = sorted((m for m in nearby if m.state in states), key=lambda m: m.machine_id)
        if pool:
            return rng.choice(pool), preferred
    held = sum(held_down(m) for m in by_id.values())
    reason = f" ({held} not started, with autostart off)" if held else ""
    raise ProxyError(503, f"no machine of app {app} can take the request{reason}")


class ReplayCache:
    """The replay cache: ``fly-replay-cache`` instructions Fly would accept, until their TTL."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, str], _CacheEntry] = {}

    def cached(self, host: str, path: str) -> _CacheEntry | None:
        """The longest live entry under which ``host`` + ``path`` falls, if any."""
        now = self._clock()
        for key, entry in list(self._entries.items()):
            if entry.expires_at <= now:
                del self._entries[key]
        matching = [e for e in self._entries.values() if e.matches(host, path)]
        return max(matching, key=lambda e: len(e.prefix)) if matching else None

    def invalidate(self, host: str, path: str) -> None:
        """Drop the entries ``host`` + ``path`` falls under (fly-replay-cache: invalidate)."""
        for key, entry in list(self._entries.items()):
            if entry.matches(host, path):
                del self._entries[key]
                log.info("replay cache: dropped %s%s/*", entry.host, entry.prefix)

    def remember(
        self,
        headers: httpx.Headers,
        request_host: str,
        path: str,
        source: MachineInfo,
        directive: ReplayDirective,
    ) -> None:
        """Store a ``fly-replay-cache`` instruction, if it is one Fly would accept."""
        pattern = headers.get("fly-replay-cache")
        if pattern is None or pattern == "invalidate":
            return
        # "/path/*" is cached for the request's own domain; "example.com/path/*" names one.
        host, slash, rest = pattern.partition("/")
        path_pattern = slash + rest
        ttl = headers.get("fly-replay-cache-ttl-secs", "")
        problem = None
        if ":" in host:
            problem = "the domain must not include a port"
        elif not path_pattern.endswith("/*"):
            problem = "the pattern must end with /*"
        elif not ttl.isdigit() or int(ttl) < MIN_CACHE_TTL:
            problem = f"fly-replay-cache-ttl-secs {ttl!r} must be a whole number >= {MIN_CACHE_TTL}"
        elif directive.state is not None:
            problem = "a cached fly-replay cannot carry state"
        else:
            entry = _CacheEntry(
                host.lower() or request_host,
                path_pattern[:-2],
                directive,
                source,
                headers.get("fly-replay-cache-allow-bypass", "").lower() == "yes",
                self._clock() + int(ttl),
            )
            if not entry.matches(request_host, path):
                problem = f"it does not match the request ({request_host}{path})"
            else:
                self._entries[(entry.host, entry.prefix)] = entry
                log.info("replay cache: %s -> %s for %ss", pattern, directive.instance, ttl)
                return
        log.warning("ignored fly-replay-cache %r from %s: %s", pattern, source.machine_id, problem)
