"""A real DNS responder on loopback UDP that answers like Fly's internal DNS (for dev and tests).

It serves, for the running machines of its registry::

    AAAA <value>.<key>.kv._metadata.<app>.internal   one address per machine with that metadata
    AAAA <machine_id>.vm.<app>.internal              the machine's address
    AAAA <app>.internal                              every running machine
    PTR  <reverse name of an address>                <machine_id>.vm.<app>.internal.
    TXT  _instances.internal                         instance=<id>,app=<app>,ip=<address>,
                                                     region=<region>;... (every running one)

``_instances.internal`` is documented (https://fly.io/docs/networking/private-networking/,
"comma-separated list of Machine ID, app name, 6PN address, and region for all started
Machines"); its entries are separated by ``;`` and the text is cut into strings of 255
bytes, as a TXT record must be. PTR is answered as Fly's DNS does, though Fly does not
document it. A UDP answer larger than the query's EDNS payload (512 bytes without EDNS) is
truncated (TC): this server has no TCP, so a resolver that cannot use EDNS fails.

and NXDOMAIN for every other name. Addresses are ``fdaa:0:1::<n>``, stable per machine id.
Test hooks: ``mode`` ("normal", "silent" never answers, "servfail"), extra raw records
(``add_record``) and query counters (``query_count``).

Use it inside an event loop (``async with DevDNSServer() as server``) or from sync code in a
background thread (``with DevDNSServer().run_in_thread() as server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Literal, cast, get_args

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.reversename
import dns.rrset

__all__ = ["DevDNSServer", "DevMachine", "Mode"]

Mode = Literal["normal", "silent", "servfail"]

_NETWORK = ipaddress.IPv6Address("fdaa:0:1::")
_MACHINE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_INSTANCES = dns.name.from_text("_instances.internal.")

_RecordKey = tuple[dns.name.Name, dns.rdatatype.RdataType]


@dataclass(frozen=True)
class DevMachine:
    """One machine of the emulated app, as the DNS responder sees it."""

    machine_id: str
    address: str
    running: bool
    metadata: Mapping[str, str] = field(default_factory=dict)
    region: str | None = None  # None: the server's


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DevDNSServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport on 3.11.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self._server.respond(data)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)


class DevDNSServer:
    """A Fly-style internal DNS responder on loopback UDP, fed from a registry of machines.

    Why ~280 lines: the registry, the answers to each name Fly documents and the failure
    modes tests switch on (silent, SERVFAIL) share one lock and one socket.
    """

    def __init__(
        self,
        app_name: str = "tenantdb-dev",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: int = 5,
        region: str = "dev",
    ) -> None:
        self.app_name = app_name
        self.region = region
        self.host = host
        self.ttl = ttl
        self._requested_port = port
        self._mode: Mode = "normal"
        self._lock = threading.Lock()
        self._machines: dict[str, DevMachine] = {}
        self._addresses: dict[str, ipaddress.IPv6Address] = {}
        self._extra: dict[_RecordKey, list[dns.rdata.Rdata]] = {}
        # Rebuilt on every registry change and swapped whole, so answering never takes the lock.
        self._records: dict[_RecordKey, list[dns.rdata.Rdata]] = {}
        self._names: frozenset[dns.name.Name] = frozenset()
        self._counts: Counter[_RecordKey] = Counter()
        self._answered = 0
        self._transport: asyncio.DatagramTransport | None = None

    # -- registry ---------------------------------------------------------------------------

    def set_machine(
        self,
        machine_id: str,
        metadata: Mapping[str, str] | None = None,
        running: bool = True,
        *,
        address: str | None = None,
        region: str | None = None,
    ) -> DevMachine:
        """Add or update a machine; its address stays the same for its whole life.

        ``region`` is the one ``_instances.internal`` lists it in (default: the server's).
        """
        if not _MACHINE_ID_RE.fullmatch(machine_id):
            raise ValueError(f"machine id {machine_id!r} is not a lowercase DNS label")
        with self._lock:
            if address is not None:
                self._addresses[machine_id] = ipaddress.IPv6Address(address)
            elif machine_id not in self._addresses:
                self._addresses[machine_id] = _NETWORK + len(self._addresses) + 1
            machine = DevMachine(
                machine_id,
                str(self._addresses[machine_id]),
                running,
                MappingProxyType(dict(metadata or {})),
                region,
            )
            self._machines[machine_id] = machine
            self._rebuild()
        return machine

    def remove_machine(self, machine_id: str) -> None:
        """Forget a machine (its address is not reused)."""
        with self._lock:
            self._machines.pop(machine_id, None)
            self._rebuild()

    def machines(self) -> list[DevMachine]:
        """Return the registered machines, sorted by id."""
        with self._lock:
            return sorted(self._machines.values(), key=lambda m: m.machine_id)

    def address_of(self, machine_id: str) -> str:
        """Return the 6PN-style address of a registered machine."""
        with self._lock:
            return str(self._addresses[machine_id])

    def add_record(self, name: str, rdtype: str, value: str) -> None:
        """Serve one extra raw record, e.g. a deliberately bad PTR for a test."""
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
        rdata = dns.rdata.from_text(dns.rdataclass.IN, key[1], value)
        with self._lock:
            self._extra.setdefault(key, []).append(rdata)
            self._rebuild()

    def clear_records(self) -> None:
        """Drop every record added with ``add_record``."""
        with self._lock:
            self._extra.clear()
            self._rebuild()

    def _rebuild(self) -> None:
        app = dns.name.from_text(f"{self.app_name}.internal.")
        records: dict[_RecordKey, list[dns.rdata.Rdata]] = {}

        def add(name: dns.name.Name, rdtype: dns.rdatatype.RdataType, text: str) -> None:
            rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)
            records.setdefault((name, rdtype), []).append(rdata)

        aaaa, ptr = dns.rdatatype.AAAA, dns.rdatatype.PTR
        instances: list[str] = []
        for machine in sorted(self._machines.values(), key=lambda m: m.machine_id):
            if not machine.running:
                continue  # like Fly: DNS only lists running machines
            instances.append(
                f"instance={machine.machine_id},app={self.app_name},ip={machine.address},"
                f"region={machine.region or self.region}"
            )
            vm = dns.name.from_text(f"{machine.machine_id}.vm", origin=app)
            add(vm, aaaa, machine.address)
            add(app, aaaa, machine.address)
            add(dns.reversename.from_address(machine.address), ptr, vm.to_text())
            for key, value in machine.metadata.items():
                try:
                    name = dns.name.from_text(f"{value}.{key}.kv._metadata", origin=app)
                except dns.exception.DNSException:
                    continue  # a value that is no DNS name cannot be looked up by name
                add(name, aaaa, machine.address)
        if instances:
            text = ";".join(instances).encode()
            strings = [text[i : i + 255] for i in range(0, len(text), 255)]
            records[(_INSTANCES, dns.rdatatype.TXT)] = [
                dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
            ]
        for record_key, rdatas in self._extra.items():
            records.setdefault(record_key, []).extend(rdatas)
        self._records = records
        self._names = frozenset(name for name, _ in records)

    # -- test hooks -------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        """How the responder behaves: "normal", "silent" (never answers) or "servfail"."""
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        if value not in get_args(Mode):
            raise ValueError(f"mode must be one of {get_args(Mode)}, not {value!r}")
        self._mode = value

    def query_count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """Return how many queries arrived, optionally only for one name and/or type."""
        qname = dns.name.from_text(name) if name is not None else None
        qtype = dns.rdatatype.from_text(rdtype) if rdtype is not None else None
        with self._lock:
            return sum(
                count
                for (n, t), count in self._counts.items()
                if (qname is None or n == qname) and (qtype is None or t == qtype)
            )

    def reset_counters(self) -> None:
        """Set every query counter back to zero."""
        with self._lock:
            self._counts.clear()
            self._answered = 0

    @property
    def answered(self) -> int:
        """How many responses were sent."""
        return self._answered

    # -- answering --------------------------------------------------------------------------

    def respond(self, wire: bytes) -> bytes | None:
        """Return the wire response to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: a real server would drop it too
        if len(query.question) != 1:
            return None
        question = query.question[0]
        with self._lock:
            self._counts[(question.name, question.rdtype)] += 1
        if self._mode == "silent":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self._mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
        else:
            records = self._records  # one consistent snapshot of the registry
            rdatas = records.get((question.name, question.rdtype))
            if rdatas:
                # to_wire() shuffles the records of a set, so clients see a different order
                # from one answer to the next, as with real servers.
                rrset = dns.rrset.from_rdata_list(question.name, self.ttl, rdatas)
                response.answer.append(rrset)
            elif question.name not in self._names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            # else: the name exists with other types only (NODATA: NOERROR, empty answer)
        max_size = max(512, query.payload) if query.edns >= 0 else 512
        try:
            reply = response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            reply = response.to_wire()
        with self._lock:
            self._answered += 1
        return reply

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The UDP port the responder listens on (known once started)."""
        if self._transport is None:
            raise RuntimeError("the DNS server is not running")
        port: int = self._transport.get_extra_info("sockname")[1]
        return port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to give a resolver, e.g. ``TENANTDB_DNS_SERVER``."""
        return (self.host, self.port)

    async def start(self) -> None:
        """Bind the UDP socket and start answering on the running event loop."""
        if self._transport is not None:
            raise RuntimeError("the DNS server is already running")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self._requested_port)
        )
        self._transport = transport

    async def stop(self) -> None:
        """Close the socket."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> DevDNSServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[DevDNSServer]:
        """Serve from a background thread with its own event loop, for sync callers."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the caller's thread below
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        thread = threading.Thread(target=main, name="tenantdb-dev-dns", daemon=True)
        thread.start()
        started.wait()
        if failure:
            thread.join()
            raise failure[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
