"""MachineLocator against the real dev DNS responder, over real UDP on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tenantdb.config import Settings
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.errors import ConfigurationError, DNSLookupError, InvalidTenantError, RoutingError
from tenantdb.routing import MachineLocator

APP = "myapp"
KEY = "customer_id"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[DevDNSServer]:
    async with DevDNSServer(APP, host="127.0.0.1", port=0) as srv:
        yield srv


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def locator(server: DevDNSServer, clock: FakeClock) -> MachineLocator:
    return MachineLocator(
        APP,
        KEY,
        ("127.0.0.1", server.port),
        timeout=0.5,
        positive_ttl=5.0,
        negative_ttl=1.0,
        clock=clock,
    )


def meta_name(tenant: str) -> str:
    return f"{tenant}.{KEY}.kv._metadata.{APP}.internal."


async def test_running_machine_is_found(server: DevDNSServer, locator: MachineLocator) -> None:
    server.set_machine("e784079b449483", {KEY: "acme"})
    server.set_machine("m100b", {KEY: "other"})
    assert await locator.lookup("acme") == "e784079b449483"
    assert await locator.lookup("other") == "m100b"
    # One AAAA query per tenant; one _instances.internal TXT query serves both (cached).
    # Reverse DNS, which Fly does not document, is never asked.
    assert server.query_count(meta_name("acme"), "AAAA") == 1
    assert server.query_count("_instances.internal.", "TXT") == 1
    assert server.query_count(rdtype="PTR") == 0
    assert server.query_count() == 3


async def test_a_machine_newer_than_the_cached_instances_list_is_found_at_once(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    server.set_machine("m1", {KEY: "acme"})
    assert await locator.lookup("acme") == "m1"
    server.set_machine("m2", {KEY: "beta"})  # started after the list was fetched
    assert await locator.lookup("beta") == "m2"
    assert server.query_count("_instances.internal.", "TXT") == 2


async def test_unknown_tenant_is_none(server: DevDNSServer, locator: MachineLocator) -> None:
    server.set_machine("m1", {KEY: "acme"})
    assert await locator.lookup("nobody") is None
    assert server.query_count(meta_name("nobody"), "AAAA") == 1
    assert server.query_count(rdtype="PTR") == 0


async def test_stopped_machine_is_not_listed(server: DevDNSServer, locator: MachineLocator) -> None:
    server.set_machine("m1", {KEY: "acme"}, running=False)
    assert await locator.lookup("acme") is None


async def test_other_metadata_key_does_not_match(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    server.set_machine("m1", {"region_id": "acme"})
    assert await locator.lookup("acme") is None


async def test_several_machines_pick_is_stable(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    ids = ["m300", "m100", "m200", "m050"]
    for n, machine_id in enumerate(ids):
        # Addresses in an order unrelated to the ids, so "lowest address" is a real choice.
        server.set_machine(machine_id, {KEY: "shared"}, address=f"fdaa:0:1::{9 - n}")
    # The responder shuffles the answer order (tests/dev checks that); the pick must not move.
    picks = {await locator.lookup("shared", use_cache=False) for _ in range(20)}
    assert server.query_count(meta_name("shared"), "AAAA") == 20
    lowest = min(ids, key=lambda m: ipaddress.IPv6Address(server.address_of(m)))
    assert picks == {lowest} == {"m050"}


async def test_silent_server_raises_within_timeout(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    server.mode = "silent"
    started = time.monotonic()
    with pytest.raises(DNSLookupError) as info:
        await locator.lookup("acme")
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.0
    assert info.value.tenant == "acme"
    assert "timed out" in str(info.value)
    assert "acme" in str(info.value)
    assert isinstance(info.value, RoutingError)


async def test_servfail_raises(server: DevDNSServer, locator: MachineLocator) -> None:
    server.set_machine("m1", {KEY: "acme"})
    server.mode = "servfail"
    started = time.monotonic()
    with pytest.raises(DNSLookupError, match=r"tenant acme failed: AAAA .*SERVFAIL"):
        await locator.lookup("acme")
    assert time.monotonic() - started < 0.45  # an answer, not the 0.5 s timeout


async def test_refused_port_raises() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: ICMP port unreachable
    locator = MachineLocator(APP, KEY, ("127.0.0.1", port), timeout=0.5)
    with pytest.raises(DNSLookupError, match="acme"):
        await locator.lookup("acme")


async def test_a_failure_answers_for_every_tenant_for_a_moment(
    server: DevDNSServer, locator: MachineLocator, clock: FakeClock
) -> None:
    server.set_machine("m1", {KEY: "acme"})
    server.set_machine("m2", {KEY: "bravo"})
    server.mode = "servfail"
    with pytest.raises(DNSLookupError, match="SERVFAIL"):
        await locator.lookup("acme")
    server.mode = "normal"
    server.reset_counters()
    # Within the failure TTL no tenant's lookup reaches the server: a broken or slow
    # server costs one timeout per TTL, not one per request.
    clock.now += 0.9
    for tenant in ("acme", "bravo"):
        with pytest.raises(DNSLookupError, match="not asked again yet"):
            await locator.lookup(tenant)
    assert server.query_count() == 0
    clock.now += 0.2  # past the 1 s failure TTL
    assert await locator.lookup("acme") == "m1"


async def test_the_lowest_machine_id_wins_whatever_the_addresses(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    # The machine with the higher id has the lower address: the pick is by id.
    server.set_machine("m9", {KEY: "acme"}, address="fdaa:0:1::1")
    server.set_machine("m1", {KEY: "acme"}, address="fdaa:0:1::9")
    for _ in range(5):  # the responder shuffles the answers
        locator.invalidate("acme")
        assert await locator.lookup("acme") == "m1"


async def test_cache_hit_sends_no_query(
    server: DevDNSServer, locator: MachineLocator, clock: FakeClock
) -> None:
    server.set_machine("m1", {KEY: "acme"})
    assert await locator.lookup("acme") == "m1"
    assert server.query_count() == 2
    server.remove_machine("m1")  # the cache still answers, as designed, until the TTL ends
    clock.now += 4.9
    for _ in range(100):
        assert await locator.lookup("acme") == "m1"
    assert server.query_count() == 2
    clock.now += 0.2  # past the 5 s positive TTL
    assert await locator.lookup("acme") is None
    assert server.query_count() == 3


async def test_negative_cache_expires(
    server: DevDNSServer, locator: MachineLocator, clock: FakeClock
) -> None:
    assert await locator.lookup("acme") is None
    server.set_machine("m1", {KEY: "acme"})
    clock.now += 0.9
    assert await locator.lookup("acme") is None  # still the cached "nobody"
    assert server.query_count() == 1
    clock.now += 0.2  # past the 1 s negative TTL
    assert await locator.lookup("acme") == "m1"
    assert server.query_count() == 3


async def test_use_cache_false_asks_again(server: DevDNSServer, locator: MachineLocator) -> None:
    server.set_machine("m1", {KEY: "acme"})
    assert await locator.lookup("acme") == "m1"
    server.remove_machine("m1")
    server.set_machine("m2", {KEY: "acme"})
    assert await locator.lookup("acme") == "m1"
    assert await locator.lookup("acme", use_cache=False) == "m2"
    assert await locator.lookup("acme") == "m2"  # the fresh answer replaced the cached one


async def test_invalidate(server: DevDNSServer, locator: MachineLocator) -> None:
    server.set_machine("m1", {KEY: "acme"})
    assert await locator.lookup("acme") == "m1"
    server.set_machine("m1", {KEY: "acme"}, running=False)
    locator.invalidate("acme")
    assert await locator.lookup("acme") is None
    assert server.query_count(meta_name("acme"), "AAAA") == 2


async def test_invalidate_during_lookup_is_not_cached(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    server.set_machine("m1", {KEY: "acme"})
    pending = asyncio.create_task(locator.lookup("acme"))
    await asyncio.sleep(0)  # the lookup is in flight
    locator.invalidate("acme")
    assert await pending == "m1"
    assert await locator.lookup("acme") == "m1"
    assert server.query_count(meta_name("acme"), "AAAA") == 2


async def test_burst_of_concurrent_misses_makes_one_lookup(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    """1,000 concurrent lookups of one uncached tenant: at most 2 DNS queries in total.

    One lookup is an AAAA query plus a TXT query, so "one shared lookup" is exactly 2 queries
    counted at the responder; without single-flight it would be 2,000.
    """
    server.set_machine("m1", {KEY: "acme"})
    results = await asyncio.gather(*(locator.lookup("acme") for _ in range(1000)))
    assert results == ["m1"] * 1000
    assert server.query_count(meta_name("acme"), "AAAA") == 1
    assert server.query_count() <= 2


async def test_burst_of_failures_shares_one_error(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    server.mode = "servfail"
    results = await asyncio.gather(
        *(locator.lookup("acme") for _ in range(200)), return_exceptions=True
    )
    assert all(isinstance(r, DNSLookupError) for r in results)
    assert server.query_count() == 1


async def test_cancelled_caller_does_not_cancel_others(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    server.set_machine("m1", {KEY: "acme"})
    first = asyncio.create_task(locator.lookup("acme"))
    second = asyncio.create_task(locator.lookup("acme"))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == "m1"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert server.query_count() == 2


def instances_entry(machine_id: str, ip: str = "fdaa:0:1::99", app: str = APP) -> str:
    """One ``_instances.internal`` TXT record, quoted for ``add_record``."""
    return f'"instance={machine_id},app={app},ip={ip},region=ams"'


@pytest.mark.parametrize(
    "entry",
    [
        instances_entry("evil\\013\\010set-cookie:x"),  # header injection attempt
        instances_entry("m1", app="otherapp"),  # another app's machine
        instances_entry("-m1"),  # not a valid id shape
        instances_entry("m_1"),
        instances_entry("m1", ip="not-an-address"),
        '"instance=m1,app=myapp,region=ams"',  # no address at all
        '"garbage"',
    ],
)
async def test_bad_instances_entries_are_ignored(
    server: DevDNSServer, locator: MachineLocator, entry: str
) -> None:
    server.add_record(meta_name("acme"), "AAAA", "fdaa:0:1::99")
    server.add_record("_instances.internal.", "TXT", entry)
    assert await locator.lookup("acme") is None


async def test_a_bad_entry_falls_back_to_the_next_address(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    bad = "fdaa:0:1::1"  # the lowest address
    server.add_record(meta_name("acme"), "AAAA", bad)
    server.add_record("_instances.internal.", "TXT", instances_entry("m1", ip=bad, app="other"))
    server.set_machine("m9", {KEY: "acme"}, address="fdaa:0:1::9")
    assert await locator.lookup("acme") == "m9"


async def test_instances_entry_case_is_normalised(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    address = "fdaa:0:1::42"
    server.add_record(meta_name("acme"), "AAAA", address)
    server.add_record(
        "_instances.internal.", "TXT", instances_entry("E784079B449483", ip=address, app="MyApp")
    )
    assert await locator.lookup("acme") == "e784079b449483"


async def test_an_organisation_of_many_machines_is_read_from_one_long_record(
    server: DevDNSServer, locator: MachineLocator
) -> None:
    # 40 machines: about 3 KB of text in 255-byte strings, over the 512 bytes of plain UDP.
    for n in range(40):
        server.set_machine(f"m{n:02d}", {KEY: f"t{n:02d}"})
    assert await locator.lookup("t37") == "m37"


@pytest.mark.parametrize("tenant", ["", "Acme", "a.b", "-x", "x" * 64, "acme\r\n"])
async def test_invalid_tenant_is_refused_without_a_query(
    server: DevDNSServer, locator: MachineLocator, tenant: str
) -> None:
    with pytest.raises(InvalidTenantError):
        await locator.lookup(tenant)
    assert server.query_count() == 0


def test_configuration_is_validated() -> None:
    with pytest.raises(ConfigurationError):
        MachineLocator("My App", KEY, ("127.0.0.1", 53))
    with pytest.raises(ConfigurationError):
        MachineLocator(APP, "a.b", ("127.0.0.1", 53))
    with pytest.raises(ConfigurationError):
        MachineLocator(APP, KEY, ("not-an-ip", 53))
    with pytest.raises(ConfigurationError):
        MachineLocator(APP, KEY, ("127.0.0.1", 53), timeout=0)


def test_from_settings() -> None:
    settings = Settings(app_name=APP, metadata_key="tenant", dns_server=("::1", 5353))
    locator = MachineLocator.from_settings(settings)
    assert (locator.app_name, locator.metadata_key, locator.nameserver) == (
        APP,
        "tenant",
        ("::1", 5353),
    )
    assert locator.metadata_name("acme") == f"acme.tenant.kv._metadata.{APP}.internal."
    with pytest.raises(ConfigurationError, match="FLY_APP_NAME"):
        MachineLocator.from_settings(Settings(dns_server=("::1", 5353)))


async def test_cache_is_bounded(server: DevDNSServer, clock: FakeClock) -> None:
    locator = MachineLocator(APP, KEY, server.address, timeout=0.5, max_entries=3, clock=clock)
    for tenant in ["t1", "t2", "t3", "t4"]:
        assert await locator.lookup(tenant) is None
    assert server.query_count() == 4
    await locator.lookup("t4")
    await locator.lookup("t2")
    assert server.query_count() == 4  # still cached
    await locator.lookup("t1")  # the oldest entry was dropped
    assert server.query_count() == 5


async def test_ipv6_loopback_nameserver() -> None:
    try:
        server = DevDNSServer(APP, host="::1")
        await server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        server.set_machine("m1", {KEY: "acme"})
        locator = MachineLocator(APP, KEY, ("::1", server.port), timeout=0.5)
        assert await locator.lookup("acme") == "m1"
    finally:
        await server.stop()
