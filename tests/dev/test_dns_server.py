"""The dev DNS responder, queried with plain dnspython over real UDP on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.reversename
import pytest

from tenantdb.dev.dns_server import DevDNSServer

APP = "myapp"


@pytest.fixture
async def server() -> AsyncIterator[DevDNSServer]:
    async with DevDNSServer(APP, host="127.0.0.1", port=0) as srv:
        yield srv


async def ask(server: DevDNSServer, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(query, server.host, timeout=2, port=server.port)


def texts(response: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in response.answer for rdata in rrset)


async def test_metadata_aaaa_lists_running_machines(server: DevDNSServer) -> None:
    server.set_machine("m1", {"customer_id": "acme"})
    server.set_machine("m2", {"customer_id": "acme", "plan": "gold"})
    server.set_machine("m3", {"customer_id": "acme"}, running=False)
    server.set_machine("m4", {"customer_id": "other"})
    response = await ask(server, "acme.customer_id.kv._metadata.myapp.internal.", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert texts(response) == sorted([server.address_of("m1"), server.address_of("m2")])
    assert response.answer[0].ttl == server.ttl
    gold = await ask(server, "gold.plan.kv._metadata.myapp.internal.", "AAAA")
    assert texts(gold) == [server.address_of("m2")]


async def test_ptr_and_vm_names(server: DevDNSServer) -> None:
    server.set_machine("e784079b449483", {"customer_id": "acme"})
    address = server.address_of("e784079b449483")
    assert address.startswith("fdaa:0:1::")
    reverse = dns.reversename.from_address(address).to_text()
    ptr = await ask(server, reverse, "PTR")
    assert texts(ptr) == ["e784079b449483.vm.myapp.internal."]
    vm = await ask(server, "e784079b449483.vm.myapp.internal.", "AAAA")
    assert texts(vm) == [address]
    app = await ask(server, "myapp.internal.", "AAAA")
    assert texts(app) == [address]


async def test_instances_txt_lists_running_machines_as_fly_does(server: DevDNSServer) -> None:
    server.set_machine("e784079b449483", {"customer_id": "acme"})
    server.set_machine("m2", {"customer_id": "beta"})
    server.set_machine("m3", {"customer_id": "gamma"}, running=False)
    response = await ask(server, "_instances.internal.", "TXT")
    [rrset] = response.answer
    [rdata] = rrset
    text = b"".join(rdata.strings).decode()
    assert text.split(";") == [
        f"instance=e784079b449483,app=myapp,ip={server.address_of('e784079b449483')},region=dev",
        f"instance=m2,app=myapp,ip={server.address_of('m2')},region=dev",
    ]


async def test_a_long_instances_record_is_cut_into_255_byte_strings(server: DevDNSServer) -> None:
    for n in range(10):
        server.set_machine(f"m{n}", {"customer_id": f"t{n}"})
    query = dns.message.make_query("_instances.internal.", "TXT", use_edns=0, payload=4096)
    response = await dns.asyncquery.udp(query, server.host, timeout=2, port=server.port)
    [rdata] = response.answer[0]
    assert len(rdata.strings) > 1
    assert all(len(piece) <= 255 for piece in rdata.strings)
    assert b"".join(rdata.strings).count(b"instance=") == 10


async def test_unknown_names_are_nxdomain(server: DevDNSServer) -> None:
    server.set_machine("m1", {"customer_id": "acme"})
    for name, rdtype in [
        ("nobody.customer_id.kv._metadata.myapp.internal.", "AAAA"),
        ("acme.customer_id.kv._metadata.otherapp.internal.", "AAAA"),
        ("m9.vm.myapp.internal.", "AAAA"),
        (dns.reversename.from_address("fdaa:0:1::99").to_text(), "PTR"),
        ("example.com.", "A"),
    ]:
        response = await ask(server, name, rdtype)
        assert response.rcode() == dns.rcode.NXDOMAIN, name
        assert response.answer == []


async def test_known_name_other_type_is_nodata(server: DevDNSServer) -> None:
    server.set_machine("m1", {"customer_id": "acme"})
    response = await ask(server, "acme.customer_id.kv._metadata.myapp.internal.", "A")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []


async def test_names_are_case_insensitive(server: DevDNSServer) -> None:
    server.set_machine("m1", {"customer_id": "acme"})
    response = await ask(server, "ACME.Customer_ID.kv._metadata.MyApp.internal.", "AAAA")
    assert texts(response) == [server.address_of("m1")]


async def test_stopped_then_started_and_removed(server: DevDNSServer) -> None:
    name = "acme.customer_id.kv._metadata.myapp.internal."
    server.set_machine("m1", {"customer_id": "acme"}, running=False)
    assert (await ask(server, name, "AAAA")).rcode() == dns.rcode.NXDOMAIN
    server.set_machine("m1", {"customer_id": "acme"}, running=True)
    assert texts(await ask(server, name, "AAAA")) == [server.address_of("m1")]
    server.remove_machine("m1")
    assert (await ask(server, name, "AAAA")).rcode() == dns.rcode.NXDOMAIN
    assert [m.machine_id for m in server.machines()] == []


def test_addresses_are_stable_per_machine() -> None:
    server = DevDNSServer(APP)
    first = server.set_machine("m1", {"customer_id": "a"}).address
    second = server.set_machine("m2", {"customer_id": "b"}).address
    assert first != second
    assert server.set_machine("m1", {"customer_id": "c"}, running=False).address == first
    server.remove_machine("m1")
    assert server.set_machine("m1", {"customer_id": "a"}).address == first
    assert server.set_machine("m3").address not in {first, second}
    assert server.set_machine("m4", address="fdaa:0:1::beef").address == "fdaa:0:1::beef"


def test_machine_ids_must_be_labels() -> None:
    server = DevDNSServer(APP)
    for bad in ["", "M1", "a.b", "a b", "-m1", "x" * 64]:
        with pytest.raises(ValueError, match="machine id"):
            server.set_machine(bad, {"customer_id": "acme"})


async def test_answer_order_is_shuffled(server: DevDNSServer) -> None:
    for n in range(4):
        server.set_machine(f"m{n}", {"customer_id": "shared"})
    orders = set()
    for _ in range(20):
        response = await ask(server, "shared.customer_id.kv._metadata.myapp.internal.", "AAAA")
        orders.add(tuple(rdata.to_text() for rdata in response.answer[0]))
    # 24 possible orders: 20 identical answers in a row would mean no shuffling at all.
    assert len(orders) > 1


async def test_extra_records(server: DevDNSServer) -> None:
    name = "acme.customer_id.kv._metadata.myapp.internal."
    server.add_record(name, "AAAA", "fdaa:0:1::77")
    reverse = dns.reversename.from_address("fdaa:0:1::77").to_text()
    server.add_record(reverse, "PTR", "evil\\013.vm.myapp.internal.")
    assert texts(await ask(server, name, "AAAA")) == ["fdaa:0:1::77"]
    assert texts(await ask(server, reverse, "PTR")) == ["evil\\013.vm.myapp.internal."]
    server.clear_records()
    assert (await ask(server, name, "AAAA")).rcode() == dns.rcode.NXDOMAIN


async def test_servfail_mode(server: DevDNSServer) -> None:
    server.set_machine("m1", {"customer_id": "acme"})
    server.mode = "servfail"
    response = await ask(server, "acme.customer_id.kv._metadata.myapp.internal.", "AAAA")
    assert response.rcode() == dns.rcode.SERVFAIL
    server.mode = "normal"
    response = await ask(server, "acme.customer_id.kv._metadata.myapp.internal.", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR


async def test_silent_mode_counts_but_never_answers(server: DevDNSServer) -> None:
    server.set_machine("m1", {"customer_id": "acme"})
    server.mode = "silent"
    with pytest.raises(dns.exception.Timeout):
        await ask_with_timeout(server, 0.3)
    assert server.query_count() == 1
    assert server.answered == 0


async def ask_with_timeout(server: DevDNSServer, timeout: float) -> dns.message.Message:
    query = dns.message.make_query("acme.customer_id.kv._metadata.myapp.internal.", "AAAA")
    return await dns.asyncquery.udp(query, server.host, timeout=timeout, port=server.port)


def test_unknown_mode_is_refused() -> None:
    server = DevDNSServer(APP)
    with pytest.raises(ValueError, match="mode"):
        server.mode = "broken"  # type: ignore[assignment]
    assert server.mode == "normal"


async def test_query_counters(server: DevDNSServer) -> None:
    name = "acme.customer_id.kv._metadata.myapp.internal."
    for _ in range(3):
        await ask(server, name, "AAAA")
    await ask(server, name, "A")
    await ask(server, "other.example.", "AAAA")
    assert server.query_count() == 5
    assert server.query_count(name) == 4
    assert server.query_count(name.upper(), "AAAA") == 3
    assert server.query_count(rdtype="AAAA") == 4
    assert server.answered == 5
    server.reset_counters()
    assert server.query_count() == 0
    assert server.answered == 0


async def test_garbage_is_dropped_and_server_survives(server: DevDNSServer) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(b"\x00\x01not dns at all", (server.host, server.port))
    finally:
        sock.close()
    await asyncio.sleep(0.05)
    server.set_machine("m1", {"customer_id": "acme"})
    response = await ask(server, "m1.vm.myapp.internal.", "AAAA")
    assert texts(response) == [server.address_of("m1")]
    assert server.query_count() == 1


async def test_port_before_start_and_double_start() -> None:
    server = DevDNSServer(APP)
    with pytest.raises(RuntimeError):
        _ = server.port
    async with server:
        assert server.port > 0
        with pytest.raises(RuntimeError):
            await server.start()
    with pytest.raises(RuntimeError):
        _ = server.port


def test_run_in_thread_serves_sync_callers() -> None:
    server = DevDNSServer(APP)
    with server.run_in_thread() as running:
        assert running is server
        server.set_machine("m1", {"customer_id": "acme"})
        query = dns.message.make_query("acme.customer_id.kv._metadata.myapp.internal.", "AAAA")
        response = dns.query.udp(query, server.host, timeout=2, port=server.port)
        assert texts(response) == [server.address_of("m1")]
        port = server.port
    assert server.query_count() == 1
    # Stopped: the port is closed, nothing answers any more.
    with pytest.raises((dns.exception.Timeout, ConnectionRefusedError)):
        dns.query.udp(query, "127.0.0.1", timeout=0.3, port=port)


def test_run_in_thread_reports_bind_errors() -> None:
    with DevDNSServer(APP).run_in_thread() as first:
        clash = DevDNSServer(APP, port=first.port)
        with pytest.raises(OSError, match="in use"), clash.run_in_thread():
            pass
