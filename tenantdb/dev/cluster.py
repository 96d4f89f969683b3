"""The local Fly emulation behind ``tenantdb dev``: machines as processes, DNS and a proxy.

``Cluster`` runs, on loopback only:

- a ``DevDNSServer`` answering Fly's internal DNS names for the machines that run;
- one process per machine (uvicorn serving ``app_module``, or ``command``) with its own
  ``FLY_MACHINE_ID`` (14 hex digits, kept in ``<state dir>/dev/<app>/machines.json`` so that a
  restart brings the same machines back), ``FLY_REGION`` (``ClusterConfig.regions``, spread as
  ``dev.regions`` says), ``TENANTDB_HINT_URL`` (tail hints through ``dev.private_network``),
  ``FLY_APP_NAME``, ``TENANT_ID``; a tenant's first machine (in the first region) starts
  first and takes the lease, its others once it listens,
  data directory, ``TENANTDB_DNS_SERVER``, its own metrics port on loopback (shown on the
  dashboard; several machines cannot share one), and the embedded bucket
  ``<state dir>/bucket`` unless ``BUCKET_NAME`` names an S3 bucket;
- a ``FlyProxy`` in front, which starts stopped machines when requests need them, unless the
  machines' service has autostart off (``ClusterConfig.autostart``, `tenantdb dev
  --no-autostart`); its port also serves the dashboard at ``/_dev/`` (``DevEdge``).

A machine stops itself as on Fly: after ``TENANTDB_IDLE_STOP`` seconds without a request
(``idle_stop`` sets it for every machine; None leaves each machine's own, 300 by default)
its server releases the lease and exits 0, and the machine is shown stopped until a request
starts it again (autostart). Fly's restart policy ``on-failure`` leaves a machine that
exited 0 stopped (https://fly.io/docs/machines/guides-examples/machine-restart-policy/).
``stop_machine`` stops one as Fly does: ``SIGINT``, then ``SIGKILL`` after ``kill_timeout``.

Every machine runs in its own process group (``dev.processes``). ``stop()`` (also run when
``start()`` fails) stops them all gracefully, and an ``atexit`` hook kills whatever a crash
left behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import uvicorn

from tenantdb.config import Settings
from tenantdb.dev.backends import MachineInfo, MachineUnavailableError
from tenantdb.dev.cluster_config import FORCE_HTTPS, ClusterConfig
from tenantdb.dev.dashboard import DevEdge
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.dev.ports import free_port
from tenantdb.dev.private_network import PrivateNetwork, hint_url
from tenantdb.dev.processes import (
    LOOPBACK,
    DevMachine,
    MachineStatus,
    load_machines,
    signal_group,
)
from tenantdb.dev.proxy import FlyProxy, ReplayRecord
from tenantdb.errors import ConfigurationError
from tenantdb.storage import describe_bucket

__all__ = ["Cluster", "ClusterConfig", "MachineStatus", "serve"]

log = logging.getLogger("tenantdb.dev")

# For machines run with uvicorn: tenantdb's own INFO lines (lease, restore, publish) are what
# the demo is about, and uvicorn alone would show only its own loggers.
_MACHINE_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # The format of TENANTDB_LOG_FORMAT (key=value, or JSON), as on Fly.
    "formatters": {"plain": {"()": "tenantdb.logs.formatter"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": "INFO", "handlers": ["stderr"]},
}
# Not handed down from the developer's shell: a real token would let the machines' router
# fall back to the real Machines API, for an app that only exists on this laptop.
_NOT_INHERITED = ("FLY_API_TOKEN", "CUSTOMER_ID")


class _ProxyServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the cluster decides what a signal means."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Cluster:
    """The local Fly emulation: a DNS responder, one process per machine, a proxy in front.

    ``async with Cluster(config) as cluster:`` starts everything and stops it all at the end.
    The proxy calls ``machines()`` and ``use()``; tests may stop, start and kill machines.

    Why ~300 lines: it is the one place that decides when a machine starts or stops (the
    lock, DNS and the proxy follow from it); the processes themselves are ``dev.processes``'.
    """

    def __init__(
        self, config: ClusterConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or ClusterConfig()
        config = self.config
        self.dns = DevDNSServer(config.app_name, host=LOOPBACK, region=config.regions[0])
        self.proxy = FlyProxy(
            self, force_https=FORCE_HTTPS, edge_region=config.regions[0], latency=config.latency
        )
        self.private_network = PrivateNetwork(self.status, latency=config.latency)
        self.stopped_cleanly = True
        self._clock = clock
        self._running = False
        self._machines: dict[str, DevMachine] = {}
        self._server: _ProxyServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._port = 0
        self._proxy_port = 0  # where the proxy listens, known before it serves
        self._env: dict[str, str] = {}
        self._log_config = Path()
        self._socket: socket.socket | None = None
        # Where the machines keep their data, for people to read; known once started.
        self.bucket_description = ""

    # -- what the proxy and tests see ---------------------------------------------------------

    @property
    def app_name(self) -> str:
        """The emulated Fly app's name (``FLY_APP_NAME`` of every machine)."""
        return self.config.app_name

    @property
    def url(self) -> str:
        """The proxy's base URL, where clients send requests."""
        if not self._port:
            raise RuntimeError("the cluster is not running")
        return f"http://{LOOPBACK}:{self._port}"

    @property
    def replay_log(self) -> list[ReplayRecord]:
        """Every replay the proxy made, oldest first."""
        return self.proxy.replay_log

    def machines(self) -> list[MachineInfo]:
        """Return every machine as the proxy sees it."""
        autostart = self.config.autostart
        return [
            MachineInfo(m.machine_id, m.region, m.state, autostart) for m in self._machines.values()
        ]

    @property
    def tenants(self) -> tuple[str, ...]:
        """The tenants the machines serve."""
        return self.config.tenants

    def status(self) -> list[MachineStatus]:
        """Return every machine with its tenant, state, port and process id."""
        return [m.status() for m in self._machines.values()]

    def bucket_settings(self) -> Settings:
        """Settings naming the bucket and key prefix the machines use (once started)."""
        if not self._env:
            raise RuntimeError("the cluster is not running")
        return Settings.from_env(self._env)

    def machine_ids(self, tenant: str) -> list[str]:
        """Return the ids of ``tenant``'s machines, in creation order."""
        return [m.machine_id for m in self._machines.values() if m.tenant == tenant]

    @contextlib.asynccontextmanager
    async def use(self, machine_id: str) -> AsyncIterator[str]:
        """Hold a machine busy for one request, starting it first if it is stopped (autostart)."""
        machine = self._machine(machine_id)
        if machine.state != "started":
            if machine.state == "failed":
                raise MachineUnavailableError(
                    f"machine {machine.label} has failed; requests do not start it"
                )
            log.info("autostart: machine %s is %s, starting it", machine.label, machine.state)
            await self._start(machine)
        yield machine.url

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the DNS responder, every machine, then the proxy; undo it all on failure."""
        if self._running:
            raise RuntimeError("the cluster is already started")
        self._running = True
        try:
            root = self.config.state_dir.resolve()
            home = root / "dev" / self.config.app_name
            self._machines = load_machines(
                self.config.tenants, self.config.machines_per_tenant, self.config.regions, home
            )
            self._log_config = home / "logging.json"
            self._log_config.write_text(json.dumps(_MACHINE_LOGGING, indent=2) + "\n")
            await self.dns.start()
            self._socket = sock = _listen(self.config.port)
            self._proxy_port = sock.getsockname()[1]
            self._env = self._base_env(root, self._proxy_port)
            self.bucket_description = describe_bucket(Settings.from_env(self._env))
            await self.proxy.__aenter__()
            await self.private_network.__aenter__()
            atexit.register(self.kill_all)
            # Each tenant's first machine (in the first region) starts alone and takes the
            # lease; the others start once it listens, and stand by (or serve reads) in
            # their regions. Started together, whichever came first would hold the tenant.
            firsts: dict[str, DevMachine] = {}
            for machine in self._machines.values():
                firsts.setdefault(machine.tenant, machine)
            await self._start_all(firsts.values())
            await self._start_all(m for m in self._machines.values() if firsts[m.tenant] is not m)
            await self._serve_proxy(sock)
        except BaseException:
            await self.stop()
            raise

    async def _start_all(self, machines: Iterable[DevMachine]) -> None:
        """Start ``machines`` in parallel; every start runs to its end (success or failure)
        before the first failure is raised."""
        results = await asyncio.gather(
            *(self._start(m, explicit=True) for m in machines), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def stop(self) -> None:
        """Stop the proxy, then every machine gracefully (in parallel), then the DNS responder."""
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await asyncio.gather(self._serving, return_exceptions=True)
            self._server = self._serving = None
        if self._socket is not None:
            self._socket.close()  # already closed if the proxy served on it
            self._socket = None
        self._port = 0
        await asyncio.gather(
            *(self._stop(m, reason="the cluster is stopping") for m in self._machines.values()),
            return_exceptions=True,
        )
        await self.proxy.__aexit__(None, None, None)
        await self.private_network.__aexit__(None, None, None)
        await self.dns.stop()
        self.kill_all()
        atexit.unregister(self.kill_all)
        self._running = False

    async def start_machine(self, machine_id: str) -> None:
        """Start a stopped (or failed) machine and wait until it listens."""
        await self._start(self._machine(machine_id), explicit=True)

    async def stop_machine(self, machine_id: str) -> None:
        """Stop a machine as Fly does: SIGINT, then SIGKILL after the kill timeout."""
        await self._stop(self._machine(machine_id), reason="stop requested")

    async def kill_machine(self, machine_id: str) -> None:
        """SIGKILL a machine, like a host failure: it is "failed" and requests never start it."""
        machine = self._machine(machine_id)
        async with machine.lock:
            machine.state = "failed"
            self._announce_dns(machine)
            if machine.process is not None:
                signal_group(machine.process, signal.SIGKILL)
                await machine.reap(machine.process)
            log.warning("machine %s killed (SIGKILL): failed", machine.label)

    def kill_all(self) -> None:
        """SIGKILL every machine process group at once: the last resort, writes may be lost."""
        for machine in self._machines.values():
            machine.kill_now()

    # -- internals ----------------------------------------------------------------------------

    def _machine(self, machine_id: str) -> DevMachine:
        machine = self._machines.get(machine_id)
        if machine is None:
            raise MachineUnavailableError(f"no machine {machine_id} in app {self.app_name}")
        return machine

    def _base_env(self, root: Path, proxy_port: int) -> dict[str, str]:
        """The environment every machine shares; ``_spawn`` adds each one's identity."""
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        env.update(
            {
                "FLY_APP_NAME": self.app_name,
                "TENANTDB_DNS_SERVER": "{}:{}".format(*self.dns.address),
                # Bodies too big for fly-replay go to the owner through the proxy, which
                # honours fly-force-instance-id as Fly's does for Flycast addresses.
                "TENANTDB_PROXY_URL": f"http://{LOOPBACK}:{proxy_port}",
                # Signs the body proxy's tenantdb-proxied-by (a local bucket has no secret
                # key to derive it from): shared by this run's machines only.
                "TENANTDB_PROXY_SECRET": secrets.token_hex(16),
                "TENANTDB_METADATA_KEY": self.config.metadata_key,
                "TENANTDB_KILL_TIMEOUT": f"{self.config.kill_timeout:g}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.config.idle_stop is not None:
            env["TENANTDB_IDLE_STOP"] = f"{self.config.idle_stop:g}"
        env.update(self.config.env)
        if not env.get("BUCKET_NAME"):
            env.setdefault("TENANTDB_LOCAL_BUCKET", str(root / "bucket"))
        return env

    async def _serve_proxy(self, sock: socket.socket) -> None:
        config = uvicorn.Config(
            DevEdge(self, private_network=self.private_network),
            lifespan="off",
            log_level="warning",
            access_log=False,
            # The proxy is the edge: X-Forwarded-For from clients must not replace their address.
            proxy_headers=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=5,
        )
        server = _ProxyServer(config)
        self._server = server
        self._serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._serving.done():
                await self._serving
                raise RuntimeError("the proxy server stopped while starting")
            await asyncio.sleep(0.01)
        self._port = sock.getsockname()[1]

    async def _start(self, machine: DevMachine, *, explicit: bool = False) -> None:
        async with machine.lock:
            if machine.state == "started":
                return
            if machine.state == "failed" and not explicit:
                raise MachineUnavailableError(f"machine {machine.label} has failed")
            await self._spawn(machine)

    async def _spawn(self, machine: DevMachine) -> None:
        """Run the machine's process and wait until it listens (the caller holds the lock)."""
        machine.state = "starting"
        machine.exit_code = None
        machine.port = free_port()
        # Each machine its own metrics port, as each Fly Machine has its own address: on one
        # shared default port only the first would listen, and a scrape would read its numbers.
        # (A port set in the cluster's own env, 0 say, is passed on as it is.)
        chosen = "TENANTDB_METRICS_PORT" not in self.config.env
        machine.metrics_port = free_port() if chosen else 0
        machine.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **self._env,
            "FLY_MACHINE_ID": machine.machine_id,
            "FLY_REGION": machine.region,
            # Tail hints reach a holder at its private address, one per machine on Fly; here
            # the machines share 127.0.0.1, so they go through the emulated private network.
            "TENANTDB_HINT_URL": hint_url(self._proxy_port, machine.region),
            "TENANT_ID": machine.tenant,
            "TENANTDB_DATA_DIR": str(machine.data_dir),
            "HOST": LOOPBACK,
            "PORT": str(machine.port),
            "TENANTDB_METRICS_HOST": LOOPBACK,
        }
        if chosen:
            env["TENANTDB_METRICS_PORT"] = str(machine.metrics_port)
        argv = self.config.command or (
            sys.executable,
            "-m",
            "uvicorn",
            self.config.app_module,
            "--host",
            LOOPBACK,
            "--port",
            str(machine.port),
            "--lifespan",
            "on",
            "--log-config",
            str(self._log_config),
            # As on Fly.io, where the proxy's address is not a trusted forwarder: trusting
            # the local proxy's X-Forwarded-For would log every client as 127.0.0.1:0.
            "--no-proxy-headers",
        )
        await machine.run(
            argv,
            env,
            start_timeout=self.config.start_timeout,
            clock=self._clock,
            on_exit=self._announce_dns,
        )
        self._announce_dns(machine)

    async def _stop(self, machine: DevMachine, *, reason: str) -> None:
        async with machine.lock:
            if machine.state != "started" or machine.process is None:
                return
            process = machine.process
            machine.state = "stopping"
            self._announce_dns(machine)
            log.info("stopping machine %s: %s", machine.label, reason)
            began = self._clock()
            if not await machine.interrupt(process, self.config.kill_timeout):
                self.stopped_cleanly = False
            machine.state = "stopped"
            log.info(
                "machine %s stopped in %.1fs (exit code %s)",
                machine.label,
                self._clock() - began,
                process.returncode,
            )

    def _announce_dns(self, machine: DevMachine) -> None:
        """Tell the DNS responder whether the machine runs (Fly DNS lists running ones only)."""
        self.dns.set_machine(
            machine.machine_id,
            {self.config.metadata_key: machine.tenant},
            running=machine.state == "started",
            region=machine.region,
        )


def _listen(port: int) -> socket.socket:
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says so, and without it every response waits out a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
        # Listening at once: the machines' tail hints come here while they start, before
        # the proxy serves, and wait in the backlog rather than being refused.
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"the proxy cannot listen on {LOOPBACK}:{port} ({exc.strerror}): choose another "
            "port with `tenantdb dev --port N` (or `make demo PORT=N`)"
        ) from None
    return sock


async def serve(config: ClusterConfig, *, announce: Callable[[str], None]) -> bool:
    """Run a cluster until SIGINT or SIGTERM, then stop every machine gracefully.

    A second signal kills every machine at once. Returns True if every machine stopped
    within its kill timeout.
    """
    cluster = Cluster(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            announce("second signal: killing every machine now (unpublished writes are lost)")
            cluster.kill_all()
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    starting = asyncio.create_task(cluster.start())
    waiting = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            await starting
            announce(_summary(cluster))
            await waiting
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        announce("stopping every machine gracefully (each publishes its data) ...")
    finally:
        waiting.cancel()
        await cluster.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return cluster.stopped_cleanly


def _summary(cluster: Cluster) -> str:
    config = cluster.config
    lines = [
        f"tenantdb dev: app {config.app_name}, regions {_regions(config)}, "
        f"{cluster.bucket_description}, DNS {cluster.dns.host}:{cluster.dns.port}",
        *(
            f"  machine {m.machine_id}  tenant {m.tenant}  region {m.region}  port {m.port}"
            f"  pid {m.pid}"
            f"  metrics {_metrics_url(m.metrics_port)}"
            for m in cluster.status()
        ),
        f"  idle machines stop themselves: {_idle_stop(config.idle_stop)}"
        f"; kill timeout {config.kill_timeout:g}s"
        f"; requests start stopped machines: {'yes' if config.autostart else 'no (autostart off)'}",
        f"Open {cluster.url}/customers/{config.tenants[0]}  (Ctrl-C stops everything)",
        f"Dashboard: {cluster.url}/_dev/  (machines, leases, routes; stop, kill, start)",
    ]
    return "\n".join(lines)


def _regions(config: ClusterConfig) -> str:
    regions = ", ".join(config.regions)
    if len(config.regions) == 1:
        return regions
    return (
        f"{regions} ({config.latency.one_way * 1000:g} ms each way between two; requests "
        f"enter in {config.regions[0]} unless their tenantdb-dev-region header names another)"
    )


def _idle_stop(seconds: float | None) -> str:
    if seconds is None:
        return "as TENANTDB_IDLE_STOP says (default: after 300s)"
    return f"after {seconds:g}s" if seconds else "never"


def _metrics_url(port: int | None) -> str:
    return f"http://{LOOPBACK}:{port}/metrics" if port else "none"
