"""Prometheus metrics: every tenantdb metric, in a registry of the middleware's own.

The only module that imports ``prometheus_client``. The rest of tenantdb calls the small
methods of ``Metrics`` (a counter here, a timer there); gauges that describe a state (the
lease, the log lag) are read from the tenant's ``TenantDB`` when scraped, so they cannot go
stale. Labels take bounded values only: ``tenant`` (one per machine), an outcome, a state,
an object kind or a kind of error (``error_kind``).

Served by ``MetricsServer`` on its own port (``TENANTDB_METRICS_PORT``) and the app's interface
(``TENANTDB_METRICS_HOST``, else ``HOST``, else loopback), which Fly scrapes when ``fly.toml``
declares it in ``[metrics]`` (https://fly.io/docs/monitoring/metrics/).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tenantdb.protocol.usage import Usage

__all__ = [
    "Direction",
    "Metrics",
    "MetricsServer",
    "RequestClass",
    "ReplicaReadOutcome",
    "RoutingOutcome",
    "WatchedTenant",
    "error_kind",
]

log = logging.getLogger("tenantdb")

RoutingOutcome = Literal["local", "replay", "cached_replay", "proxied_body", "404", "413", "503"]
Lookup = Literal["dns", "api"]
# What became of a read request on a replica (tenantdb/asgi/replica_reads.py).
ReplicaReadOutcome = Literal["served", "replayed_refused", "replayed_write", "write_after_answer"]
Uploaded = Literal["segment", "snapshot"]
# Tigris bills requests in two classes (https://www.tigrisdata.com/docs/pricing/): A for
# PUT, COPY, POST, LIST (and multipart uploads), B for GET, HEAD and the rest; DELETE is
# free, and so are refused or unchanged answers (304, 400, 403, 409, 412).
RequestClass = Literal["A", "B", "free"]
Direction = Literal["in", "out"]

# From a local-disk round trip to a slow S3 upload or restore.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class WatchedTenant(Protocol):
    """What the scrape reads from the tenant's database (``TenantDB`` is one)."""

    @property
    def tenant(self) -> str: ...
    @property
    def state(self) -> str: ...
    def generation(self) -> int: ...
    def log_lag(self) -> float: ...


class _TenantCollector(Collector):
    """Lease state, generation and log lag, read at scrape time."""

    def __init__(self, tdb: WatchedTenant, states: Sequence[str]) -> None:
        self._tdb = tdb
        self._states = states

    def collect(self) -> Iterable[Metric]:
        tdb = self._tdb
        state = GaugeMetricFamily(
            "tenantdb_lease_state",
            "1 for the state the tenant is in on this machine, 0 for the others",
            labels=["tenant", "state"],
        )
        for name in self._states:
            state.add_metric([tdb.tenant, name], 1.0 if tdb.state == name else 0.0)
        yield state
        generation = GaugeMetricFamily(
            "tenantdb_lease_generation",
            "generation (fencing token) of the lease this machine holds or last held, 0 if none",
            labels=["tenant"],
        )
        generation.add_metric([tdb.tenant], float(tdb.generation()))
        yield generation
        lag = GaugeMetricFamily(
            "tenantdb_log_lag_seconds",
            "age of the oldest commit not yet published in the bucket, 0 when none",
            labels=["tenant"],
        )
        lag.add_metric([tdb.tenant], tdb.log_lag())
        yield lag


class Metrics:
    """tenantdb's metrics for one middleware (or one ``TenantDB``); no I/O until ``serve``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The billed requests and bytes since the last usage record took them (see
        # machine/usage.py): the counters below only ever grow.
        self._usage = Usage()
        self._shipped_bytes = Counter(
            "tenantdb_shipped_bytes", "bytes of log segments published", registry=r
        )
        self._shipped_segments = Counter(
            "tenantdb_shipped_segments", "log segments published", registry=r
        )
        self._publish = Histogram(
            "tenantdb_publish_seconds",
            "duration of each conditional write (CAS) of lock.json",
            buckets=_BUCKETS,
            registry=r,
        )
        self._upload = Histogram(
            "tenantdb_upload_seconds",
            "duration of each upload of a log segment or a snapshot",
            ["object"],
            buckets=_BUCKETS,
            registry=r,
        )
        self._restore = Histogram(
            "tenantdb_restore_seconds", "duration of each restore", buckets=_BUCKETS, registry=r
        )
        self._checkpoint = Histogram(
            "tenantdb_checkpoint_seconds",
            "duration of each checkpoint (full snapshot published as the log's base)",
            buckets=_BUCKETS,
            registry=r,
        )
        self._held = Gauge(
            "tenantdb_gate_held_responses",
            "responses held by the output gate until their writes are in the bucket",
            registry=r,
        )
        self._gate_wait = Histogram(
            "tenantdb_gate_wait_seconds",
            "how long the output gate held a response",
            buckets=_BUCKETS,
            registry=r,
        )
        self._gate_outcomes = Counter(
            "tenantdb_gate_responses",
            "responses held by the output gate, by outcome (durable or 503)",
            ["outcome"],
            registry=r,
        )
        self._routing = Counter(
            "tenantdb_routing_decisions",
            "requests for a tenant path, by what the middleware did with them",
            ["outcome"],
            registry=r,
        )
        self._routed: dict[RoutingOutcome, Counter] = {}
        self._replica_reads = Counter(
            "tenantdb_replica_reads",
            "read requests a replica took, by outcome (served from its copy, sent to the "
            "holder because the copy could not serve or the request wrote, or a write after "
            "the answer began: a route to mark as a write)",
            ["outcome"],
            registry=r,
        )
        self._lookup = Histogram(
            "tenantdb_lookup_seconds",
            "duration of each lookup of a tenant's machine, by source (dns, api)",
            ["source"],
            buckets=_BUCKETS,
            registry=r,
        )
        self._bucket_errors = Counter(
            "tenantdb_bucket_errors",
            "failed bucket requests, by kind of error (a missing lock.json is no error: it is "
            "how a tenant that never ran looks)",
            ["kind"],
            registry=r,
        )
        self._bucket_requests = Counter(
            "tenantdb_bucket_requests",
            "bucket requests this machine made, by the tenant it serves and Tigris's price "
            "class (A: writes and lists, B: reads, free: deletes and refused or unchanged "
            "answers)",
            ["tenant", "class"],
            registry=r,
        )
        self._bucket_bytes = Counter(
            "tenantdb_bucket_bytes",
            "object bytes this machine sent to the bucket (in) or read from it (out)",
            ["tenant", "direction"],
            registry=r,
        )
        self._task_failures = Counter(
            "tenantdb_task_failures",
            "background tasks ended by an unexpected exception, by task (see supervisor.py)",
            ["task"],
            registry=r,
        )

    def watch(self, tdb: WatchedTenant, states: Sequence[str]) -> None:
        """Report ``tdb``'s lease state (one of ``states``), generation and log lag."""
        self.registry.register(_TenantCollector(tdb, states))

    def text(self) -> str:
        """The metrics in Prometheus's text format (what a scrape gets)."""
        return generate_latest(self.registry).decode()

    def shipped(self, size: int, segments: int) -> None:
        """Count segments (and their bytes) that a CAS of lock.json published."""
        self._shipped_bytes.inc(size)
        self._shipped_segments.inc(segments)

    @contextmanager
    def timing(
        self, what: Literal["publish", "restore", "checkpoint"] | Uploaded
    ) -> Iterator[None]:
        """Time a publication, an upload, a restore or a checkpoint (failed ones too)."""
        histogram = {
            "publish": self._publish,
            "restore": self._restore,
            "checkpoint": self._checkpoint,
        }.get(what)
        timer = (histogram or self._upload.labels(what)).time()
        with timer:
            yield

    @contextmanager
    def lookup(self, source: Lookup) -> Iterator[None]:
        """Time a lookup of a tenant's machine."""
        with self._lookup.labels(source).time():
            yield

    @contextmanager
    def gate_holding(self) -> Iterator[None]:
        """Count a response as held (and time it) while the output gate waits."""
        self._held.inc()
        started = time.monotonic()
        try:
            yield
        finally:
            self._held.dec()
            self._gate_wait.observe(time.monotonic() - started)

    def gate_outcome(self, durable: bool) -> None:
        """Count a held response released (durable) or refused (503)."""
        self._gate_outcomes.labels("durable" if durable else "503").inc()

    def routed(self, outcome: RoutingOutcome) -> None:
        """Count a routing decision."""
        # Once per request: the labelled child is looked up once per outcome, not each time.
        counter = self._routed.get(outcome)
        if counter is None:
            counter = self._routed[outcome] = self._routing.labels(outcome)
        counter.inc()

    def replica_read(self, outcome: ReplicaReadOutcome) -> None:
        """Count a read request a replica took, by what became of it."""
        self._replica_reads.labels(outcome).inc()

    def bucket_error(self, exc: BaseException) -> None:
        """Count a failed bucket request by its ``StorageError`` subclass, in snake case."""
        self._bucket_errors.labels(error_kind(exc)).inc()

    def bucket_request(self, tenant: str, price_class: RequestClass, requests: int = 1) -> None:
        """Count requests to the bucket by the price class they are billed in."""
        self._bucket_requests.labels(tenant, price_class).inc(requests)
        if price_class == "A":
            self._usage += Usage(class_a=requests)
        elif price_class == "B":
            self._usage += Usage(class_b=requests)

    def bucket_bytes(self, tenant: str, direction: Direction, size: int) -> None:
        """Count object bytes sent to the bucket (in) or read from it (out)."""
        self._bucket_bytes.labels(tenant, direction).inc(size)
        self._usage += Usage(bytes_in=size) if direction == "in" else Usage(bytes_out=size)

    def take_usage(self) -> Usage:
        """The billed usage counted since the last call (or ``restore_usage``)."""
        usage, self._usage = self._usage, Usage()
        return usage

    def restore_usage(self, usage: Usage) -> None:
        """Count ``usage`` (taken, but not recorded) again."""
        self._usage += usage

    def task_failed(self, task: str) -> None:
        """Count a background task ended by an unexpected exception."""
        self._task_failures.labels(task).inc()


def error_kind(exc: BaseException) -> str:
    """``TransientStorageError`` -> ``transient_storage``: labels are snake case, as the others."""
    name = type(exc).__name__.removesuffix("Error") or "error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class MetricsServer:
    """The metrics endpoint (``GET /metrics``) on its own port, in a thread of its own."""

    def __init__(self, metrics: Metrics, port: int, host: str = "127.0.0.1") -> None:
        self.metrics = metrics
        self.port = port
        self.host = host
        self._server: WSGIServer | None = None

    @property
    def address(self) -> str:
        """``host:port`` as a URL writes it (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def __aenter__(self) -> MetricsServer:
        try:
            server, _thread = start_http_server(
                self.port, self.host, registry=self.metrics.registry
            )
        except OSError as exc:
            # Metrics are not worth refusing the tenant for: on one computer several
            # servers share the default port, and only the first one gets it.
            log.warning(
                "no metrics: cannot listen on %s (%s); set TENANTDB_METRICS_PORT to a free "
                "port, or 0 to serve none",
                self.address,
                exc.strerror or exc,
            )
            return self
        self._server = server
        log.info("metrics on http://%s/metrics", self.address)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() waits for the serving thread's next poll (up to half a second).
            await asyncio.to_thread(server.shutdown)
            server.server_close()
