"""Fly internal DNS lookups of the machine serving a tenant, with a small cache.

Fly's internal DNS answers two questions that together route a foreign tenant
(https://fly.io/docs/networking/private-networking/, the tables of ``.internal`` names)::

    AAAA <tenant>.<metadata key>.kv._metadata.<app>.internal   6PN addresses of running machines
    TXT  _instances.internal                                   "instance=<id>,app=<app>,
                                                                ip=<6PN>,region=<r>;..." for
                                                                every started machine of the org

The address of a tenant's machine is matched to its id through ``_instances.internal``, the
documented record (reverse DNS, PTR, answers too but is not documented). Its cost: the
record lists every started machine of the organisation, about 90 bytes each, so it is
fetched once for all tenants and kept ``positive_ttl`` seconds; it is fetched again at once
when an address is missing from it (a machine that just started). A large answer goes over
EDNS (4096 bytes, about 45 machines) and beyond that over TCP, which dnspython switches to
on a truncated answer.

This is the only module of tenantdb proper that imports dnspython.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.AAAA import AAAA

from tenantdb.errors import ConfigurationError, DNSLookupError
from tenantdb.tenants import validate_tenant

if TYPE_CHECKING:
    from tenantdb.config import Settings

__all__ = ["MachineLocator"]

# Fly machine ids are 14 lowercase hex digits; local emulation ids such as "m100a" also pass.
# Anything outside this alphabet could smuggle bytes into a fly-replay header, so it is dropped.
_MACHINE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_INSTANCES = dns.name.from_text("_instances.internal.")
# EDNS lets a UDP answer carry about 45 machines of _instances.internal instead of 5.
_EDNS_PAYLOAD = 4096
_APP_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")


@dataclass(frozen=True, slots=True)
class _Instances:
    """The machines of this app in ``_instances.internal``: address to machine id."""

    ids: dict[ipaddress.IPv6Address, str]
    expires_at: float
    regions: dict[str, str] = field(default_factory=dict)  # machine id -> region


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    """One cached answer: a machine id, or None for "no running machine"."""

    machine_id: str | None
    expires_at: float


class MachineLocator:
    """Find the running machine serving a tenant through Fly's internal DNS, with a cache.

    Positive answers are cached for ``positive_ttl`` seconds and "no machine" answers for
    ``negative_ttl``. A failure (timeout, SERVFAIL, REFUSED) makes every lookup, of any
    tenant, fail at once for ``failure_ttl`` seconds: a DNS server that does not answer costs
    one timeout per ``failure_ttl``, not one per request. Concurrent lookups of one uncached
    tenant share a single DNS lookup. One instance is meant to be shared by every request of
    a process.

    Why ~260 lines: the three caches and the shared lookups are one policy over one
    resolver; splitting them would spread it.
    """

    def __init__(
        self,
        app_name: str,
        metadata_key: str = "customer_id",
        nameserver: tuple[str, int] | None = None,
        *,
        timeout: float = 1.0,
        positive_ttl: float = 5.0,
        negative_ttl: float = 1.0,
        failure_ttl: float = 1.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        prefer_region: str | None = None,
    ) -> None:
        if not _APP_RE.fullmatch(app_name):
            raise ConfigurationError(f"app name {app_name!r} is not a lowercase DNS label")
        if not _METADATA_KEY_RE.fullmatch(metadata_key):
            raise ConfigurationError(
                f"metadata key {metadata_key!r} must be 1-63 letters, digits, '_' or '-'"
            )
        if timeout <= 0 or min(positive_ttl, negative_ttl, failure_ttl) < 0 or max_entries < 1:
            raise ConfigurationError("DNS timeout must be > 0, TTLs >= 0 and max_entries >= 1")
        self.app_name = app_name
        self.metadata_key = metadata_key
        self.nameserver = nameserver
        self.timeout = timeout
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.failure_ttl = failure_ttl
        self.max_entries = max_entries
        self.prefer_region = prefer_region
        self._clock = clock
        self._resolver = _make_resolver(nameserver, timeout)
        self._instances: _Instances | None = None
        self._instances_inflight: asyncio.Task[_Instances] | None = None
        self._cache: dict[str, _CacheEntry] = {}
        self._inflight: dict[str, asyncio.Task[str | None]] = {}
        # The last failure and until when it answers for the server: (expires_at, error).
        self._failure: tuple[float, DNSLookupError] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        timeout: float = 1.0,
        positive_ttl: float = 5.0,
        negative_ttl: float = 1.0,
    ) -> MachineLocator:
        """Build a locator from ``Settings`` (app name, metadata key, DNS server)."""
        if not settings.app_name:
            raise ConfigurationError("routing other tenants needs FLY_APP_NAME (the app name)")
        return cls(
            settings.app_name,
            settings.metadata_key,
            settings.dns_server,
            timeout=timeout,
            positive_ttl=positive_ttl,
            negative_ttl=negative_ttl,
        )

    def __repr__(self) -> str:
        server = "resolv.conf" if self.nameserver is None else "{}:{}".format(*self.nameserver)
        return f"MachineLocator(app={self.app_name!r}, key={self.metadata_key!r}, dns={server})"

    def metadata_name(self, tenant: str) -> str:
        """Return the DNS name listing the machines whose metadata names ``tenant``."""
        validate_tenant(tenant)
        return f"{tenant}.{self.metadata_key}.kv._metadata.{self.app_name}.internal."

    async def lookup(self, tenant: str, *, use_cache: bool = True) -> str | None:
        """Return the id of a running machine serving ``tenant``, or None if DNS lists none.

        Raises ``InvalidTenantError`` for a bad id and ``DNSLookupError`` when the DNS server
        times out or fails, or failed less than ``failure_ttl`` ago. ``use_cache=False`` skips
        cached answers (it still joins a lookup already in flight, which is at most
        ``timeout`` old) and refreshes the cache.
        """
        validate_tenant(tenant)
        if self._failure is not None:
            expires_at, error = self._failure
            if expires_at > self._clock():
                raise DNSLookupError(
                    f"{error} (less than {self.failure_ttl:g}s ago; not asked again yet)",
                    tenant=tenant,
                )
            self._failure = None
        if use_cache:
            entry = self._cache.get(tenant)
            if entry is not None:
                if entry.expires_at > self._clock():
                    return entry.machine_id
                del self._cache[tenant]
        task = self._inflight.get(tenant)
        loop = asyncio.get_running_loop()
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._resolve(tenant), name=f"tenantdb-dns-{tenant}")
            self._inflight[tenant] = task
            task.add_done_callback(functools.partial(self._finished, tenant))
        # shield: one caller giving up must not cancel the lookup the other callers wait on.
        return await asyncio.shield(task)

    def invalidate(self, tenant: str) -> None:
        """Forget the cached answer for ``tenant``; a lookup in flight will not be cached."""
        self._cache.pop(tenant, None)
        self._inflight.pop(tenant, None)

    def clear(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()
        self._inflight.clear()
        self._instances = None

    def _finished(self, tenant: str, task: asyncio.Task[str | None]) -> None:
        # Reading the exception marks it retrieved, even when every waiter was cancelled.
        error = None if task.cancelled() else task.exception()
        if isinstance(error, DNSLookupError) and self.failure_ttl > 0:
            self._failure = (self._clock() + self.failure_ttl, error)
        if self._inflight.get(tenant) is not task:
            return  # invalidated while in flight: the answer may predate the invalidation
        del self._inflight[tenant]
        if task.cancelled() or error is not None:
            return  # not cached per tenant: the failure above answers for the server
        machine_id = task.result()
        ttl = self.positive_ttl if machine_id is not None else self.negative_ttl
        self._cache.pop(tenant, None)  # re-insert at the end: the dict stays oldest-first
        if len(self._cache) >= self.max_entries:
            # Bounded memory under a flood of distinct tenant ids: drop the oldest entry.
            del self._cache[next(iter(self._cache))]
        self._cache[tenant] = _CacheEntry(machine_id, self._clock() + ttl)

    async def _resolve(self, tenant: str) -> str | None:
        deadline = time.monotonic() + self.timeout
        name = dns.name.from_text(self.metadata_name(tenant))
        rrset = await self._query(tenant, name, dns.rdatatype.AAAA, deadline)
        if rrset is None:
            return None
        # The rule: the lowest machine id among the running machines listed, whatever order
        # the answers come in and whatever their addresses, so that every machine of the app
        # picks the same one (a tenant normally has one machine; several are a migration).
        addresses = {ipaddress.IPv6Address(r.address) for r in rrset if isinstance(r, AAAA)}
        instances = self._instances
        if (
            instances is None
            or instances.expires_at <= self._clock()
            or not addresses <= instances.ids.keys()
        ):
            # Expired, or missing a machine newer than the list: ask again.
            instances = await self._fetch_shared(tenant, deadline)
        # A machine that stopped between the two queries is in neither: it is skipped.
        listed = [instances.ids[a] for a in addresses if a in instances.ids]
        # With replica reads, any machine of the tenant serves reads (and sends writes on):
        # the lowest id in this machine's region first.
        near = [m for m in listed if instances.regions.get(m) == self.prefer_region]
        return min(near or listed, default=None)

    async def _fetch_shared(self, tenant: str, deadline: float) -> _Instances:
        """Fetch ``_instances.internal``, or join the fetch already in flight."""
        loop = asyncio.get_running_loop()
        task = self._instances_inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._fetch_instances(tenant, deadline))
            # Read the outcome even when every waiter gave up, so it is never "unretrieved".
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._instances_inflight = task
        # shield: one caller giving up must not cancel the query the other callers wait on.
        return await asyncio.shield(task)

    async def _fetch_instances(self, tenant: str, deadline: float) -> _Instances:
        rrset = await self._query(tenant, _INSTANCES, dns.rdatatype.TXT, deadline)
        ids: dict[ipaddress.IPv6Address, str] = {}
        regions: dict[str, str] = {}
        for rdata in rrset if rrset is not None else ():
            if isinstance(rdata, TXT):
                # A long record comes as several strings of at most 255 bytes: one text.
                ids.update(self._parse_instances(b"".join(rdata.strings), regions))
        instances = _Instances(ids, self._clock() + self.positive_ttl, regions)
        self._instances = instances
        return instances

    def _parse_instances(
        self, text: bytes, regions: dict[str, str]
    ) -> dict[ipaddress.IPv6Address, str]:
        """This app's ``ip -> machine id`` from ``instance=..,app=..,ip=..,region=..;...``;
        each machine's region goes into ``regions``.

        Entries that are malformed, of other apps or with an id that could smuggle bytes
        into a fly-replay header are skipped.
        """
        found: dict[ipaddress.IPv6Address, str] = {}
        for entry in text.decode("ascii", "replace").split(";"):
            fields = dict(part.partition("=")[::2] for part in entry.strip().split(","))
            machine_id, ip = fields.get("instance", "").lower(), fields.get("ip", "")
            app = fields.get("app", "").lower()
            if app != self.app_name or not _MACHINE_ID_RE.fullmatch(machine_id):
                continue
            try:
                found[ipaddress.IPv6Address(ip)] = machine_id
            except ValueError:
                continue
            region = fields.get("region", "").lower()
            if _MACHINE_ID_RE.fullmatch(region):
                regions[machine_id] = region
        return found

    async def has_address(self, name: str) -> bool:
        """Return True if ``name`` has an AAAA record; raise ``DNSLookupError`` if DNS fails."""
        deadline = time.monotonic() + self.timeout
        return (
            await self._query(name, dns.name.from_text(name), dns.rdatatype.AAAA, deadline)
            is not None
        )

    async def _query(
        self,
        tenant: str,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        deadline: float,
    ) -> dns.rrset.RRset | None:
        what = f"{dns.rdatatype.to_text(rdtype)} {name}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DNSLookupError(self._timed_out(tenant, what), tenant=tenant)
        try:
            # The hard cap keeps dnspython's retry backoff from overrunning the budget.
            async with asyncio.timeout(remaining):
                answer = await self._resolver.resolve(
                    name, rdtype, raise_on_no_answer=False, lifetime=remaining, search=False
                )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.Timeout, TimeoutError):
            raise DNSLookupError(self._timed_out(tenant, what), tenant=tenant) from None
        except dns.resolver.NoNameservers as exc:
            errors = "; ".join(
                f"{server} answered {error}" for server, _, _, error, _ in exc.kwargs["errors"]
            )
            raise DNSLookupError(
                f"DNS lookup for tenant {tenant} failed: {what}: {errors or 'no nameserver'}",
                tenant=tenant,
            ) from None
        except (dns.exception.DNSException, OSError) as exc:
            raise DNSLookupError(
                f"DNS lookup for tenant {tenant} failed: {what}: {exc}", tenant=tenant
            ) from exc
        return answer.rrset

    def _timed_out(self, tenant: str, what: str) -> str:
        server = "the resolv.conf nameserver" if self.nameserver is None else self.nameserver[0]
        return (
            f"DNS lookup for tenant {tenant} timed out after {self.timeout:g}s: "
            f"{what} got no answer from {server}"
        )


def _make_resolver(
    nameserver: tuple[str, int] | None, timeout: float
) -> dns.asyncresolver.Resolver:
    if nameserver is None:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            raise ConfigurationError(
                "no nameserver in /etc/resolv.conf: set TENANTDB_DNS_SERVER=host:port"
            ) from None
    else:
        host, port = nameserver
        resolver = dns.asyncresolver.Resolver(configure=False)
        try:
            resolver.nameservers = [host]
        except ValueError:
            raise ConfigurationError(f"DNS server {host!r} is not an IP address") from None
        resolver.port = port
    # Several attempts per lookup: one lost UDP datagram costs a retry, not the whole budget.
    resolver.timeout = timeout / 3
    resolver.lifetime = timeout
    resolver.cache = None
    resolver.use_edns(0, 0, _EDNS_PAYLOAD)
    return resolver
