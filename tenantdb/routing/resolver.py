"""Finding the machine that serves a tenant: the fallback chain, top to bottom.

``MachineResolver.locate(tenant)`` asks, in order, until one source names a machine:

1. its own cache: found answers for ``cache_ttl``, "nowhere" for ``negative_ttl``, failures
   for ``failure_ttl`` (a broken source costs one attempt per ``failure_ttl``, not one per
   request);
2. Fly's internal DNS, which lists running machines only
   (https://fly.io/docs/networking/private-networking/). A DNS failure (timeout, SERVFAIL,
   REFUSED, of the AAAA or the ``_instances.internal`` TXT query) is not the end of the
   chain: the next sources are asked;
3. the tenant's ``lock.json``: ``owner``, else ``last_owner`` (a replay to a stopped machine
   makes Fly's proxy start it);
4. the Machines API, when a token is set: one app-wide list, shared by every tenant, cached
   for ``cache_ttl`` and fetched by one request at a time, because the API allows about one
   list request per second (https://fly.io/docs/machines/api/working-with-machines-api/).
   A 429 stops the asking, for every tenant of the process, until its ``Retry-After`` has
   passed plus a random part of up to half as long again: machines that fell through to
   the API together (a DNS outage, a deploy) must not all come back in the same second.

Nothing found: ``Resolution(None, "none", why)``; but when DNS failed and nothing else named a
machine, the DNS error is raised: "no machine" would be a guess. Concurrent lookups of one
tenant share one resolution. Tenant ids reach this module validated (the middleware answers
400 first), so a mistyped id never costs a lookup of any kind.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from tenantdb.config import Settings
from tenantdb.errors import (
    DNSLookupError,
    LockFileCorruptError,
    MachinesAPIError,
    ObjectNotFoundError,
    RoutingError,
    StorageError,
)
from tenantdb.metrics import Metrics
from tenantdb.protocol.lockfile import LOCK_MAX_BYTES, LockRecord
from tenantdb.routing.dns import MachineLocator
from tenantdb.routing.machines import Machine, validate_machine_id
from tenantdb.routing.machines_api import MachinesClient
from tenantdb.storage import Bucket

__all__ = ["LOOKUP_ERRORS", "MachineResolver", "Resolution", "Source"]

log = logging.getLogger("tenantdb.routing")

Source = Literal["dns", "lock", "api", "none"]

# What a failed lookup raises; each is answered 503 "retry shortly".
LOOKUP_ERRORS = (RoutingError, StorageError, LockFileCorruptError, TimeoutError)
# The shortest time between two fresh lookups of one tenant asked for by requests.
REFRESH_INTERVAL = 1.0
# Machines in these states serve nothing and never will again.
_GONE_STATES = frozenset({"destroying", "destroyed"})


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a tenant's requests go: a machine id (None: nowhere) and how it was found.

    ``detail`` is the lock.json field that named the machine, the machine's state in the
    Machines API, or why nothing was found.
    """

    machine_id: str | None
    source: Source
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Cached:
    """A remembered outcome of a lookup: a resolution, or the error it raised."""

    outcome: Resolution | BaseException
    expires_at: float


@dataclass(frozen=True, slots=True)
class _MachineList:
    """The app's machines by tenant, as one Machines API list call saw them."""

    by_tenant: Mapping[str, Machine]
    expires_at: float


K = TypeVar("K")
V = TypeVar("V")


class _SingleFlight(Generic[K, V]):
    """At most one task per key; callers of a key in flight wait on the same task."""

    def __init__(self, on_done: Callable[[K, asyncio.Task[V]], None]) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}
        self._on_done = on_done

    async def run(self, key: K, start: Callable[[], Coroutine[Any, Any, V]]) -> V:
        task = self._tasks.get(key)
        loop = asyncio.get_running_loop()
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(start())
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        # shield: one caller giving up must not cancel the lookup the others wait on.
        return await asyncio.shield(task)

    def forget(self, key: K) -> None:
        """Let a task in flight finish unheard: its answer may predate an invalidation."""
        self._tasks.pop(key, None)

    def clear(self) -> None:
        self._tasks.clear()

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if not task.cancelled():
            task.exception()  # marks it retrieved, even when every waiter was cancelled
        if self._tasks.get(key) is task:
            del self._tasks[key]
            self._on_done(key, task)


class MachineResolver:
    """Finds the machine serving a tenant: cache, DNS, lock.json, then the Machines API.

    Built without I/O from open parts (the Router opens them); one instance serves every
    request of a process.
    """

    def __init__(
        self,
        settings: Settings,
        locator: MachineLocator,
        bucket: Bucket,
        machines: MachinesClient | None,
        *,
        cache_ttl: float,
        negative_ttl: float,
        failure_ttl: float,
        lookup_timeout: float,
        max_entries: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.locator = locator
        self.bucket = bucket
        self.machines = machines
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.failure_ttl = failure_ttl
        self.lookup_timeout = lookup_timeout
        self.max_entries = max_entries
        self._clock = clock
        self.metrics = metrics
        self._cache: dict[str, _Cached] = {}
        self._lookups: _SingleFlight[tuple[str, bool], Resolution] = _SingleFlight(self._store)
        self._api_list: _MachineList | None = None
        self._api_fetch: _SingleFlight[None, _MachineList] = _SingleFlight(self._keep_list)
        self._api_paused_until = 0.0
        self._rng = rng or random.Random()
        self.refresh_interval = REFRESH_INTERVAL
        self._refreshed: dict[str, float] = {}  # when each tenant was last looked up afresh

    async def locate(self, tenant: str, *, use_cache: bool = True) -> Resolution:
        """Find the machine serving ``tenant``; raise one of ``LOOKUP_ERRORS`` if that fails.

        ``use_cache=False`` forgets what was cached about ``tenant`` and asks every source
        again (the app-wide Machines API list is still reused while fresh).
        """
        if not use_cache:
            if self._refresh_due(tenant):
                self.invalidate(tenant)
            else:
                use_cache = True  # looked up afresh less than a second ago: that answer holds
        entry = self._cache.get(tenant)
        if entry is not None:
            if entry.expires_at > self._clock():
                if isinstance(entry.outcome, BaseException):
                    # A fresh traceback each time: the cached error must not grow one.
                    raise entry.outcome.with_traceback(None)
                return entry.outcome
            del self._cache[tenant]
        fresh = not use_cache
        return await self._lookups.run((tenant, fresh), lambda: self._resolve(tenant, fresh))

    def _refresh_due(self, tenant: str) -> bool:
        """Whether ``tenant`` may be looked up afresh now; at most once per ``refresh_interval``.

        Requests ask for fresh lookups through headers any client can send (fly-replay-src,
        fly-replay-failed): without this, each such request would cost a DNS query and a
        lock.json GET.
        """
        now = self._clock()
        last = self._refreshed.get(tenant)
        if last is not None and now - last < self.refresh_interval:
            return False
        self._refreshed.pop(tenant, None)
        if len(self._refreshed) >= self.max_entries:
            del self._refreshed[next(iter(self._refreshed))]  # the oldest
        self._refreshed[tenant] = now
        return True

    def invalidate(self, tenant: str, *, limited: bool = False) -> None:
        """Forget what is cached about ``tenant``, here and in the DNS locator; with
        ``limited`` (a request asks for it), only if it was not refreshed a moment ago."""
        if limited and not self._refresh_due(tenant):
            return
        self._cache.pop(tenant, None)
        self._lookups.forget((tenant, False))
        self.locator.invalidate(tenant)

    def clear(self) -> None:
        """Forget everything cached and in flight (the Router is closing)."""
        self._cache.clear()
        self._lookups.clear()
        self._api_fetch.clear()
        self._api_list = None

    # -- the chain ------------------------------------------------------------------------------

    async def _resolve(self, tenant: str, fresh: bool) -> Resolution:
        dns_error: DNSLookupError | None = None
        try:
            with self.metrics.lookup("dns"):
                machine_id = await self.locator.lookup(tenant, use_cache=not fresh)
        except DNSLookupError as exc:
            dns_error = exc
            log.warning("tenant %s: %s; asking lock.json and the Machines API", tenant, exc)
            reasons = [f"DNS failed ({exc})"]
        else:
            if machine_id is not None:
                return Resolution(machine_id, "dns")
            reasons = ["DNS lists no running machine for it"]
        found = await self._from_lock(tenant, reasons)
        if found is None and self.machines is not None:
            found = await self._from_api(tenant, reasons)
        if found is not None:
            return found
        if dns_error is not None:
            raise dns_error
        return Resolution(None, "none", ", ".join(reasons))

    async def _from_lock(self, tenant: str, reasons: list[str]) -> Resolution | None:
        key = f"{self.settings.prefix}{tenant}/lock.json"
        try:
            async with asyncio.timeout(self.lookup_timeout):
                lock = await self.bucket.get(key, max_size=LOCK_MAX_BYTES)
        except ObjectNotFoundError:
            reasons.append("the bucket has no lock.json for it")
            return None
        record = LockRecord.parse(lock.body, tenant=tenant, key=key)
        for field, value in (("owner", record.owner), ("last_owner", record.last_owner)):
            if value is None:
                continue
            try:
                return Resolution(validate_machine_id(value), "lock", field)
            except ValueError:
                log.warning("tenant %s: lock.json %s %r is no machine id", tenant, field, value)
        reasons.append("its lock.json names no machine")
        return None

    async def _from_api(self, tenant: str, reasons: list[str]) -> Resolution | None:
        listed = self._api_list
        if listed is None or listed.expires_at <= self._clock():
            listed = await self._api_fetch.run(None, self._list_machines)
        machine = listed.by_tenant.get(tenant)
        if machine is None:
            reasons.append("the Machines API lists no machine for it")
            return None
        return Resolution(machine.id, "api", machine.state)

    async def _list_machines(self) -> _MachineList:
        assert self.machines is not None  # only called with a client
        wait = self._api_paused_until - self._clock()
        if wait > 0:
            raise MachinesAPIError(
                f"the Machines API is rate limiting this app: not asked again for {wait:.1f}s",
                status=429,
            )
        try:
            with self.metrics.lookup("api"):
                async with asyncio.timeout(self.lookup_timeout):
                    machines = await self.machines.list_machines()
        except MachinesAPIError as exc:
            if exc.retry_after is not None:
                jitter = self._rng.uniform(0, max(exc.retry_after, 1.0) / 2)
                self._api_paused_until = self._clock() + exc.retry_after + jitter
            raise
        key = self.settings.metadata_key
        by_tenant: dict[str, Machine] = {}
        # Sorted by id, first one kept: every machine of the app picks the same one.
        for machine in sorted(machines, key=lambda m: m.id):
            tenant = machine.tenant(key)
            if tenant is not None and machine.state not in _GONE_STATES:
                by_tenant.setdefault(tenant, machine)
        return _MachineList(by_tenant, self._clock() + self.cache_ttl)

    # -- remembering ----------------------------------------------------------------------------

    def _keep_list(self, key: None, task: asyncio.Task[_MachineList]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._api_list = task.result()

    def _store(self, key: tuple[str, bool], task: asyncio.Task[Resolution]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        outcome: Resolution | BaseException
        if error is None:
            outcome = task.result()
            ttl = self.cache_ttl if outcome.machine_id else self.negative_ttl
        elif isinstance(error, LOOKUP_ERRORS):
            outcome, ttl = error, self.failure_ttl
        else:
            return  # a bug, not a lookup failure: never replayed from the cache
        tenant = key[0]
        self._cache.pop(tenant, None)  # re-insert at the end: the dict stays oldest-first
        if len(self._cache) >= self.max_entries:
            # Bounded memory under a flood of distinct tenant ids: drop the oldest entry.
            del self._cache[next(iter(self._cache))]
        self._cache[tenant] = _Cached(outcome, self._clock() + ttl)
