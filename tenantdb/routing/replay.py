"""Answering requests for tenants this machine does not serve: fly-replay to the owner.

Which machine that is, ``tenantdb.routing.resolver`` finds (cache, DNS, ``lock.json``, the
Machines API); this module crafts the answers. Fly's proxy semantics it relies on
(https://fly.io/docs/networking/dynamic-request-routing/):

- ``fly-replay: instance=<id>`` on a response makes the proxy replay the request to that
  machine. "Requests larger than 1MB cannot be replayed": bodies over 1,000,000 bytes are
  streamed to the machine directly (``tenantdb.routing.proxy``).
- ``timeout=<d>;fallback=prefer_self`` ("Replay timeout and fallback") sends a request whose
  replay failed back here with a ``fly-replay-failed`` header, instead of the proxy's bare
  error; it cannot be replayed again, and is answered 503 with ``Retry-After`` (or, for
  this machine's own tenant, held for the handoff). Fly documents three reasons for a
  fallback: ``timeout``, ``retries_exhausted`` and ``no_candidate``; the timeout is what
  bounds a replay to a machine that is stopping. Fly may instead answer the client itself
  with its PM08 error ("non-startable machine state", a 503 from the proxy): the client
  then retries, like after any 503.
- A replay that sets ``fly-replay-cache`` carries neither field: "The ``timeout`` and
  ``fallback`` fields cannot be set in the ``fly-replay`` intended to be cached" (the same
  page, "Requirements and Limitations"). Each replay is therefore either cached (a direct
  request for a tenant whose machine DNS lists as running) or has the fallback.
- A replayed request arrives with ``fly-replay-src: instance=<id>;region=<r>;t=<us>;state=<s>``
  naming the machine that answered fly-replay.
- ``fly-replay-cache: <path>/*`` with ``fly-replay-cache-ttl-secs`` (at least 10) lets the proxy
  send later requests under that path straight to the target. Such requests carry
  ``fly-replay-cache-status: hit`` and no ``fly-replay-src``. The documented way for a target
  to drop a stale entry is a fly-replay back to the app with ``fly-replay-cache: invalidate``;
  this module answers such requests so, never with an error carrying the header alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from tenantdb.config import Settings
from tenantdb.errors import ConfigurationError
from tenantdb.metrics import Metrics
from tenantdb.responses import send_error
from tenantdb.routing.answers import Answers, Problem
from tenantdb.routing.arrival import ReplaySource, arrival_of, invalidation, is_machine_id
from tenantdb.routing.bodies import MAX_REPLAY_BODY, measure
from tenantdb.routing.checks import check_machine_setup
from tenantdb.routing.dns import MachineLocator
from tenantdb.routing.machines_api import MachinesClient
from tenantdb.routing.proxy import (
    BodyProxy,
    MachineURL,
    machine_urls,
    proxy_key,
)
from tenantdb.routing.resolver import LOOKUP_ERRORS, MachineResolver, Resolution
from tenantdb.storage import Bucket, open_bucket
from tenantdb.tenants import TenantPattern

# MAX_REPLAY_BODY and ReplaySource live in routing.bodies and routing.arrival; they are
# named here too, where callers have always found them.
__all__ = ["LOCAL_APP_NAME", "MAX_REPLAY_BODY", "ReplaySource", "Resolution", "Router"]

log = logging.getLogger("tenantdb.routing")

# The app name of the local emulation when only TENANTDB_DNS_SERVER is set (DevDNSServer's).
LOCAL_APP_NAME = "tenantdb-dev"
_NOT_STARTED = "routing is not started: the server must run the ASGI lifespan"
# Fly refuses replay-cache TTLs under 10 seconds.
MIN_REPLAY_CACHE_TTL = 10
# A fly-replay-cache pattern is a path glob: only plain path characters go into one.
_CACHE_PATH_RE = re.compile(r"/[A-Za-z0-9/._~%-]*")

# How long Fly tries to reach the target of an uncached replay before the fallback.
DEFAULT_REPLAY_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class _Resources:
    """What an open Router uses; set as a whole once everything is open."""

    stack: AsyncExitStack
    resolver: MachineResolver
    proxy: BodyProxy | None


class Router:
    """Sends requests for other tenants to the machine that serves them.

    Why one class of ~330 lines: its three decisions (``forward``, ``replay_to``,
    ``handed_back``) read the same arrival, lookup and options, and half of it is the
    options' validation and documentation; how a request arrived (``routing.arrival``), its
    body (``routing.bodies``) and the answers (``routing.answers``) live in their own modules.

    Built from settings and the tenant path pattern, without I/O; ``async with`` opens the
    DNS resolver, the bucket (for ``lock.json``), the Machines API client (only with
    ``FLY_API_TOKEN``) and the body proxy's HTTP client, then runs the startup checks of
    ``tenantdb.routing.checks`` (warnings only). Routing is enabled on Fly (``FLY_APP_NAME``)
    or, locally, when ``TENANTDB_DNS_SERVER`` names a DNS server (the app name is then
    ``tenantdb-dev``, as for ``DevDNSServer``).

    Options: ``bucket`` shares an open bucket (else the Router opens its own);
    ``proxy_large_bodies`` streams bodies Fly cannot replay to the owner (False: 413);
    ``machine_url`` maps a machine id to its base URL (default: ``Settings.proxy_url``);
    ``replay_cache_ttl`` is the ``fly-replay-cache-ttl-secs`` sent (0: no replay cache);
    ``replay_timeout`` the ``timeout`` of uncached replays (how long Fly tries to reach a
    target, a stopping one included, before it sends the request back here);
    ``cache_ttl`` / ``negative_cache_ttl`` / ``failure_ttl`` are how long found / not-found /
    failed lookups are kept; ``dns_timeout`` and ``lookup_timeout`` bound the DNS and the
    bucket / API steps.
    """

    def __init__(
        self,
        settings: Settings,
        pattern: TenantPattern,
        *,
        bucket: Bucket | None = None,
        proxy_large_bodies: bool = True,
        machine_url: MachineURL | None = None,
        replay_cache_ttl: int = 30,
        replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
        cache_ttl: float = 5.0,
        negative_cache_ttl: float = 1.0,
        failure_ttl: float = 1.0,
        dns_timeout: float = 1.0,
        lookup_timeout: float = 5.0,
        max_entries: int = 10_000,
        metrics: Metrics | None = None,
    ) -> None:
        if replay_cache_ttl != 0 and replay_cache_ttl < MIN_REPLAY_CACHE_TTL:
            raise ConfigurationError(
                f"replay cache TTL {replay_cache_ttl}s: Fly needs at least "
                f"{MIN_REPLAY_CACHE_TTL}s (0 turns the replay cache off)"
            )
        if min(cache_ttl, negative_cache_ttl, failure_ttl) < 0 or max_entries < 1:
            raise ConfigurationError("cache TTLs must be >= 0 and max_entries >= 1")
        if dns_timeout <= 0 or lookup_timeout <= 0 or replay_timeout < 0.001:
            raise ConfigurationError("routing timeouts must be positive (replays: at least 1ms)")
        self.settings = settings
        self.pattern = pattern
        self.machine_id = settings.machine_id
        self._proxy_key = proxy_key(settings)
        self.app_name = settings.app_name or (LOCAL_APP_NAME if settings.dns_server else None)
        self.bucket = bucket
        self.proxy_large_bodies = proxy_large_bodies
        self.replay_cache_ttl = replay_cache_ttl
        self.replay_timeout = replay_timeout
        self.cache_ttl = cache_ttl
        self.negative_cache_ttl = negative_cache_ttl
        self.failure_ttl = failure_ttl
        self.dns_timeout = dns_timeout
        self.lookup_timeout = lookup_timeout
        self.max_entries = max_entries
        self.metrics = metrics or Metrics()
        self._answers = Answers(
            self.metrics, replay_timeout=replay_timeout, replay_cache_ttl=replay_cache_ttl
        )
        self.machine_url: MachineURL = machine_url or machine_urls(
            settings.proxy_url, app=self.app_name or LOCAL_APP_NAME, port=settings.port
        )
        # The pattern part before the tenant must be a plain path to go into a cache glob.
        self._cacheable = bool(_CACHE_PATH_RE.fullmatch(pattern.prefix("x")))
        self._resources: _Resources | None = None

    def __repr__(self) -> str:
        return f"Router(app={self.app_name!r}, machine={self.machine_id!r})"

    @property
    def enabled(self) -> bool:
        """True when foreign tenants are routed: on Fly, or locally with a DNS server."""
        return self.app_name is not None

    @property
    def can_replay(self) -> bool:
        """True when a fly-replay answer can reach another machine (on Fly or emulated)."""
        return self.enabled

    async def __aenter__(self) -> Self:
        if self._resources is not None:
            raise RuntimeError("Router is already open")
        if self.app_name is None:
            return self
        async with AsyncExitStack() as stack:
            locator = MachineLocator(
                self.app_name,
                self.settings.metadata_key,
                self.settings.dns_server,
                timeout=self.dns_timeout,
                positive_ttl=self.cache_ttl,
                negative_ttl=self.negative_cache_ttl,
                failure_ttl=self.failure_ttl,
                prefer_region=self.settings.fly_region if self.settings.replica_reads else None,
            )
            bucket = self.bucket
            if bucket is None:
                bucket = await stack.enter_async_context(open_bucket(self.settings))
            machines = None
            if self.settings.fly_api_token is not None:
                machines = await stack.enter_async_context(
                    MachinesClient(
                        self.app_name,
                        self.settings.fly_api_token,
                        self.settings.machines_api_url,
                        timeout=self.lookup_timeout,
                    )
                )
            proxy = None
            if self.proxy_large_bodies:
                proxy = await stack.enter_async_context(
                    BodyProxy(self.machine_url, machine_id=self.machine_id, key=self._proxy_key)
                )
            resolver = MachineResolver(
                self.settings,
                locator,
                bucket,
                machines,
                cache_ttl=self.cache_ttl,
                negative_ttl=self.negative_cache_ttl,
                failure_ttl=self.failure_ttl,
                lookup_timeout=self.lookup_timeout,
                max_entries=self.max_entries,
                metrics=self.metrics,
            )
            await check_machine_setup(self.settings, locator, machines)
            self._resources = _Resources(stack.pop_all(), resolver, proxy)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        resources, self._resources = self._resources, None
        if resources is not None:
            resources.resolver.clear()
            await resources.stack.aclose()

    async def locate(self, tenant: str, *, use_cache: bool = True) -> Resolution:
        """Find the machine serving ``tenant`` (see ``MachineResolver.locate``)."""
        if self._resources is None:
            raise RuntimeError("use Router in 'async with' (the ASGI lifespan) before routing")
        return await self._resources.resolver.locate(tenant, use_cache=use_cache)

    def invalidate(self, tenant: str) -> None:
        """Forget what is cached about ``tenant``."""
        if self._resources is not None:
            self._resources.resolver.invalidate(tenant)

    # -- answering --------------------------------------------------------------------------

    async def forward(self, scope: Scope, receive: Receive, send: Send, tenant: str) -> None:
        """Route a request for ``tenant``, which this machine does not serve."""
        if not self.enabled:
            served = (
                f"this machine serves tenant {self.settings.tenant}"
                if self.settings.tenant
                else f"this machine serves no tenant (TENANT_ID={tenant} would serve this one)"
            )
            self.metrics.routed("404")
            await send_error(
                scope,
                receive,
                send,
                404,
                f"tenant {tenant} is not served here: {served}; routing other tenants to "
                "their machines needs Fly.io (FLY_APP_NAME) or a DNS server "
                "(TENANTDB_DNS_SERVER, as `tenantdb dev` sets)",
            )
            return
        if self._resources is None:
            await self._answers.unavailable(scope, receive, send, _NOT_STARTED)
            return
        arrival = arrival_of(scope, self._proxy_key)
        if arrival.how == "failed":
            # Fly does not replay a request that came back through a replay fallback; the
            # stale answer goes (once a second at most: a client can send the header), so
            # the client's retry is resolved afresh.
            if self._resources is not None:
                self._resources.resolver.invalidate(tenant, limited=True)
            await self._answers.unavailable(
                scope,
                receive,
                send,
                f"Fly could not deliver this request to the machine of tenant {tenant} "
                f"(fly-replay-failed: {arrival.detail}); retry shortly",
            )
            return
        # A request that was already routed once is not routed again on cached knowledge.
        fresh = arrival.how != "direct"
        try:
            found = await self.locate(tenant, use_cache=not fresh)
        except LOOKUP_ERRORS as exc:
            message = str(exc) or f"the lookup timed out after {self.lookup_timeout:g}s"
            log.warning("routing tenant %s failed: %s", tenant, message)
            problem = Problem(
                503, f"the machine of tenant {tenant} cannot be found right now: {message}"
            )
            await self._answers.refuse(scope, receive, send, arrival, problem)
            return
        target = found.machine_id
        if arrival.how in ("replayed", "proxied") and target in (
            None,
            self.machine_id,
            arrival.source,
        ):
            if target is None:
                points = "no machine"
            elif target == self.machine_id:
                points = "this machine"
            else:
                points = f"machine {target} again"
            via = "fly-replay" if arrival.how == "replayed" else "the tenantdb body proxy"
            await self._answers.unavailable(
                scope,
                receive,
                send,
                f"tenant {tenant} is not served by this machine ({self.machine_id}), which got "
                f"this request from machine {arrival.source} through {via}; a fresh lookup "
                f"points at {points}, so it is not sent on (the routing data is changing); "
                "retry shortly",
            )
            return
        if target is None:
            problem = Problem(404, f"no machine serves tenant {tenant}: {found.detail}")
            await self._answers.refuse(scope, receive, send, arrival, problem)
            return
        if target == self.machine_id:
            problem = Problem(
                503,
                f"routing data names this machine ({self.machine_id}) for tenant {tenant}, but "
                f"it serves {self.settings.tenant or 'no tenant'}: check the machine's metadata "
                f"{self.settings.metadata_key!r} and TENANT_ID",
            )
            await self._answers.refuse(scope, receive, send, arrival, problem)
            return
        # Only direct requests set a replay cache: Fly looks up its cache one step deep, and
        # only running machines (found in DNS) are worth pinning requests to. A cached
        # replay gives up the fallback, which later requests through the cache never have
        # anyway; it only matters if the machine stops in the moment after the lookup.
        cacheable = arrival.how == "direct" and self._pinnable(found)
        cache = self._cache_pattern(scope, tenant) if cacheable else None
        await self._deliver(
            scope, receive, send, tenant, target, cache=cache, extra=invalidation(arrival)
        )

    def handed_back(self, scope: Scope, holder: str | None) -> bool:
        """True when the lease holder did not take this request: a replay to it failed
        (``fly-replay-failed``: it is stopping, say) or it sent the request here itself."""
        arrival = arrival_of(scope, self._proxy_key)
        if arrival.how == "failed":
            return True
        return (
            arrival.how in ("replayed", "proxied")
            and holder is not None
            and (arrival.source == holder)
        )

    async def replay_to(
        self, scope: Scope, receive: Receive, send: Send, machine_id: str, tenant: str
    ) -> None:
        """Send a request for this machine's own tenant to ``machine_id``, the lease holder."""
        arrival = arrival_of(scope, self._proxy_key)
        problem = ""
        if not is_machine_id(machine_id):
            problem = f"its lease holder {machine_id[:80]!r} is not a Fly machine id"
        elif arrival.how == "failed":
            problem = f"Fly could not deliver it to machine {machine_id} ({arrival.detail})"
        elif arrival.how in ("replayed", "proxied") and arrival.source == machine_id:
            problem = (
                f"machine {machine_id} holds its lease but sent this request here, so it "
                "is not sent back (the lease is changing hands)"
            )
        elif machine_id == self.machine_id:
            problem = "this machine is named as its lease holder but does not serve it"
        if problem:
            message = f"tenant {tenant} is unavailable here: {problem}; retry shortly"
            await self._answers.refuse(scope, receive, send, arrival, Problem(503, message))
            return
        await self._deliver(
            scope, receive, send, tenant, machine_id, cache=None, extra=invalidation(arrival)
        )

    def _pinnable(self, found: Resolution) -> bool:
        """Whether later requests may go straight to ``found`` (a cached replay).

        Never with replica reads: DNS lists a tenant's replicas beside its holder, and a
        cached replay would send writes too to whichever it named (a replica replays
        them once more, but a cache must not pin writes to a replica). Uncached, a read
        lands on a machine that can serve it and a write goes on to the holder.
        """
        return found.source == "dns" and not self.settings.replica_reads

    def _cache_pattern(self, scope: Scope, tenant: str) -> str | None:
        """The fly-replay-cache glob for this request, or None when none may be set."""
        if not self.replay_cache_ttl or not self._cacheable:
            return None
        prefix = self.pattern.prefix(tenant) + "/"
        # Fly requires the pattern to match the request itself, so the bare tenant path
        # ("/customers/acme", without a slash) is replayed uncached.
        return prefix + "*" if scope["path"].startswith(prefix) else None

    async def _deliver(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        tenant: str,
        machine_id: str,
        *,
        cache: str | None,
        extra: Mapping[str, str],
    ) -> None:
        """Replay to ``machine_id``, or stream the request there if its body is too large."""
        try:
            body = await measure(scope, receive)
        except ClientDisconnect:
            return  # nobody is left to answer
        if body.replayable:
            await self._answers.replay(scope, receive, send, machine_id, cache, extra)
            return
        if self._resources is None:
            await self._answers.unavailable(scope, receive, send, _NOT_STARTED)
            return
        proxy = self._resources.proxy
        if proxy is None:
            await self._answers.too_large(scope, receive, send, tenant, body, extra)
            return
        await self._answers.proxy_body(
            scope, receive, send, proxy, tenant, machine_id, body, self.invalidate
        )
