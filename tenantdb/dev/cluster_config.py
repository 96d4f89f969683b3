"""What ``tenantdb dev`` runs: tenants and machines, the app, the proxy's port, Fly's timings,
and the HTTP service the machines get (the one ``tenantdb machines create`` gives real ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tenantdb.dev.regions import NO_LATENCY, RegionLatency, validate_regions
from tenantdb.errors import ConfigurationError
from tenantdb.routing.machines import tenant_service
from tenantdb.tenants import validate_tenant

__all__ = ["FORCE_HTTPS", "SERVICE", "ClusterConfig"]

_APP_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# The machines get the HTTP service `tenantdb machines create` gives real ones: whether its
# port 80 redirects plain HTTP to HTTPS decides it here too, for the public edge and for the
# Flycast address the body proxy uses alike.
SERVICE = tenant_service(8080)
FORCE_HTTPS = any(port.get("force_https", False) for port in SERVICE["ports"] if port["port"] == 80)


@dataclass(frozen=True)
class ClusterConfig:
    """What to run: tenants and machines, regions, the app, the proxy's port, Fly's timings."""

    tenants: tuple[str, ...] = ("100", "200", "300")
    machines_per_tenant: int = 1
    app_name: str = "tenantdb-dev"
    # The machines' regions: a tenant's first machine in the first, its others spread over
    # them all in turn (dev.regions); requests enter in the first unless they name another.
    regions: tuple[str, ...] = ("dev",)
    # What a hop between two different regions waits, each way.
    latency: RegionLatency = NO_LATENCY
    port: int = 8080
    app_module: str = "example_app:app"
    command: tuple[str, ...] = ()
    state_dir: Path = Path(".tenantdb")
    # TENANTDB_IDLE_STOP of every machine (0: never); None: the machines' own setting.
    idle_stop: float | None = None
    kill_timeout: float = 30.0
    start_timeout: float = 30.0
    metadata_key: str = "customer_id"
    # The service's autostart flag; off, the proxy never starts a stopped machine (as on Fly).
    autostart: bool = bool(SERVICE["autostart"])
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ConfigurationError("at least one tenant is needed")
        for tenant in self.tenants:
            validate_tenant(tenant)
        if len(set(self.tenants)) != len(self.tenants):
            raise ConfigurationError(f"tenants repeat: {', '.join(self.tenants)}")
        if self.machines_per_tenant < 1:
            raise ConfigurationError("each tenant needs at least one machine")
        validate_regions(self.regions)
        if not _APP_RE.fullmatch(self.app_name):
            raise ConfigurationError(f"app name {self.app_name!r} is not a lowercase DNS label")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port {self.port} is not a TCP port (0 = any free port)")
        if (self.idle_stop or 0) < 0 or self.kill_timeout <= 0 or self.start_timeout <= 0:
            raise ConfigurationError("idle stop must be >= 0 (0 = never), timeouts > 0")
