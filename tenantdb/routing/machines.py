"""Fly Machines as values: parsed totally from the Machines API, and the config tenantdb
creates a tenant's machine with (https://fly.io/docs/machines/api/machines-resource/).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from tenantdb.errors import ConfigurationError, InvalidTenantError
from tenantdb.tenants import validate_tenant

__all__ = [
    "GONE_STATES",
    "Autostop",
    "CPUKind",
    "Machine",
    "MetricsConfig",
    "is_dns_label",
    "tenant_machine_body",
    "tenant_service",
    "validate_machine_id",
]

Autostop = Literal["off", "stop", "suspend"]
CPUKind = Literal["shared", "performance"]

# Machine ids and app names end up in URL paths, fly-replay headers and
# `<id>.vm.<app>.internal` DNS names, so anything but a plain DNS label is refused,
# whatever the API (or the environment) says.
_DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Env names the tenant machine derives from the tenant id; a caller may not contradict them.
_TENANT_ENV_NAMES = ("TENANT_ID", "CUSTOMER_ID")
# States of a machine that is going away: useless for routing, nothing left to destroy.
GONE_STATES = frozenset({"destroying", "destroyed"})
# Go duration units, for stop_config.timeout written as a string ("60s", "1m30s").
_GO_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def is_dns_label(value: str) -> bool:
    """Whether ``value`` is a plain lowercase DNS label (a machine id or app name)."""
    return _DNS_LABEL_RE.fullmatch(value) is not None


def validate_machine_id(machine_id: str) -> str:
    """Return ``machine_id`` if it is a plain lowercase DNS label, else raise ValueError."""
    if not _DNS_LABEL_RE.fullmatch(machine_id):
        raise ValueError(f"not a Fly machine id: {machine_id[:80]!r}")
    return machine_id


@dataclass(frozen=True)
class Machine:
    """One Fly Machine as the Machines API describes it (the fields tenantdb uses)."""

    id: str
    name: str
    state: str
    region: str
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    private_ip: str | None = None
    instance_id: str | None = None
    stop_timeout: float | None = None
    # From the machine's config, for the checks of tenantdb.routing.checks and doctor.
    image: str | None = None
    autostop: tuple[str, ...] = ()  # each service's autostop ("off", "stop", "suspend")
    metrics: MetricsConfig | None = None
    restart_policy: str | None = None

    def tenant(self, metadata_key: str) -> str | None:
        """Return the tenant named by ``metadata_key``, or None if absent or not a valid id."""
        value = self.metadata.get(metadata_key)
        if value is None:
            return None
        try:
            return validate_tenant(value)
        except InvalidTenantError:
            return None

    def to_json(self) -> dict[str, Any]:
        """Return a plain JSON-ready dict of this machine."""
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "metadata": dict(self.metadata),
            "private_ip": self.private_ip,
            "instance_id": self.instance_id,
            "stop_timeout": self.stop_timeout,
            "image": self.image,
            "autostop": list(self.autostop),
            "metrics": None if self.metrics is None else self.metrics.to_json(),
            "restart_policy": self.restart_policy,
        }

    @classmethod
    def from_api(cls, data: object) -> Machine:
        """Build a Machine from one API object; raise ValueError if it cannot be trusted."""
        if not isinstance(data, Mapping):
            raise ValueError("a machine is not a JSON object")
        raw_id = data.get("id")
        if not isinstance(raw_id, str):
            raise ValueError("a machine has no id")
        machine_id = validate_machine_id(raw_id)
        config = data.get("config")
        # Metadata lives in the machine config; values are strings by contract, so
        # anything else is dropped rather than guessed at.
        raw_metadata = config.get("metadata") if isinstance(config, Mapping) else None
        metadata = (
            {k: v for k, v in raw_metadata.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(raw_metadata, Mapping)
            else {}
        )
        private_ip = data.get("private_ip")
        instance_id = data.get("instance_id")
        config = config if isinstance(config, Mapping) else {}
        stop_config = config.get("stop_config")
        raw_timeout = stop_config.get("timeout") if isinstance(stop_config, Mapping) else None
        services = config.get("services")
        restart = config.get("restart")
        image = config.get("image")
        return cls(
            id=machine_id,
            name=_text(data.get("name")),
            state=_text(data.get("state")),
            region=_text(data.get("region")),
            metadata=MappingProxyType(metadata),
            private_ip=private_ip if isinstance(private_ip, str) and private_ip else None,
            instance_id=instance_id if isinstance(instance_id, str) and instance_id else None,
            stop_timeout=_seconds(raw_timeout),
            image=image if isinstance(image, str) and image else None,
            autostop=tuple(
                _autostop(service.get("autostop"))
                for service in (services if isinstance(services, list) else [])
                if isinstance(service, Mapping)
            ),
            metrics=MetricsConfig.from_api(config.get("metrics")),
            restart_policy=(
                _text(restart.get("policy")) or None if isinstance(restart, Mapping) else None
            ),
        )


@dataclass(frozen=True)
class MetricsConfig:
    """A machine's ``config.metrics``: where Fly's Prometheus scrapes it."""

    port: int
    path: str

    def to_json(self) -> dict[str, Any]:
        """The object the Machines API takes."""
        return {"port": self.port, "path": self.path}

    @classmethod
    def from_api(cls, value: object) -> MetricsConfig | None:
        """The metrics config of an API object, or None when absent or unusable."""
        if not isinstance(value, Mapping):
            return None
        port, path = value.get("port"), value.get("path")
        if isinstance(port, bool) or not isinstance(port, int) or not isinstance(path, str):
            return None
        return cls(port, path)


def _autostop(value: object) -> str:
    """A service's autostop as one word: the API takes ``true``/``false`` for stop/off."""
    if value is True:
        return "stop"
    if value is False or value is None:
        return "off"
    return value if isinstance(value, str) else "off"


def _seconds(value: object) -> float | None:
    """Seconds of an API duration: nanoseconds as a number, or a Go string such as "60s"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value / 1e9
    if not isinstance(value, str) or not value:
        return None
    parts = _GO_DURATION_RE.findall(value)
    if "".join(number + unit for number, unit in parts) != value:
        return None
    return sum(float(number) * _GO_UNITS[unit] for number, unit in parts)


def tenant_service(
    internal_port: int,
    *,
    autostop: Autostop = "stop",
    autostart: bool = True,
    min_machines_running: int = 0,
) -> dict[str, Any]:
    """The HTTP service of a tenant machine, as the Machines API takes it (and dev emulates it).

    No ``force_https`` on port 80: bodies too large for fly-replay reach the machine through
    the app's Flycast address, which is plain HTTP, and a redirect would turn every large
    upload into a 301 (https://fly.io/docs/networking/flycast/, "Flycast requirements").
    """
    return {
        "protocol": "tcp",
        "internal_port": internal_port,
        "ports": [
            {"port": 443, "handlers": ["tls", "http"]},
            {"port": 80, "handlers": ["http"]},
        ],
        # Explicit, never left to API defaults: an idle tenant machine stops (publishing
        # its snapshot on the way) and the proxy starts it again on the next request
        # replayed to it.
        "autostop": autostop,
        "autostart": autostart,
        "min_machines_running": min_machines_running,
        # The middleware's health path: red while a loop the machine needs is not running,
        # so the proxy routes around it (Fly restarts a machine on a non-zero exit, never
        # on a failing check: https://fly.io/docs/reference/health-checks/).
        "checks": [
            {
                "type": "http",
                "method": "GET",
                "path": "/healthz",
                "interval": "15s",
                "timeout": "5s",
                "grace_period": "10s",
            }
        ],
    }


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def tenant_machine_body(
    tenant: str,
    *,
    image: str,
    region: str | None = None,
    metadata_key: str = "customer_id",
    env: Mapping[str, str] | None = None,
    internal_port: int = 8080,
    memory_mb: int = 256,
    cpus: int = 1,
    cpu_kind: CPUKind = "shared",
    autostop: Autostop = "stop",
    autostart: bool = True,
    min_machines_running: int = 0,
    kill_timeout: float = 30.0,
    metrics_port: int = 9091,
    name: str | None = None,
) -> dict[str, Any]:
    """The body of a Machines API create for ``tenant``'s machine; ConfigurationError if bad.

    Its ``config.metrics`` names the port of its metrics endpoint (``TENANTDB_METRICS_PORT``
    in ``env``, else ``metrics_port``; 0: none): ``[metrics]`` in fly.toml reaches only
    the machines ``fly deploy`` makes (https://fly.io/docs/monitoring/metrics/).
    """
    validate_tenant(tenant)
    if autostop == "suspend":
        # A resumed machine carries on from its memory as if no time had passed: its
        # lease may have expired and been taken meanwhile, and nothing re-validates it.
        raise ConfigurationError(
            "autostop 'suspend' is not supported: a machine resumed from a suspend would "
            "serve on a lease that may have expired meanwhile; use 'stop' (the default)"
        )
    if not image.strip():
        raise ConfigurationError("a machine image is required")
    if not metadata_key:
        raise ConfigurationError("the metadata key naming the tenant must not be empty")
    if not 0 < internal_port < 65536:
        raise ConfigurationError(f"internal port {internal_port} is not a TCP port")
    if memory_mb <= 0 or cpus <= 0 or min_machines_running < 0 or kill_timeout <= 0:
        raise ConfigurationError(
            "memory, cpus and kill timeout must be positive, min_machines_running >= 0"
        )
    machine_env = dict(env or {})
    for env_name in _TENANT_ENV_NAMES:
        if machine_env.get(env_name, tenant) != tenant:
            raise ConfigurationError(
                f"env {env_name}={machine_env[env_name]!r} contradicts tenant {tenant!r}"
            )
    machine_env["TENANT_ID"] = tenant
    # The machine's own middleware must look tenants up under the same key.
    machine_env["TENANTDB_METADATA_KEY"] = metadata_key
    # The app listens on $PORT, which must be the port the service sends traffic to.
    if machine_env.setdefault("PORT", str(internal_port)) != str(internal_port):
        raise ConfigurationError(
            f"env PORT={machine_env['PORT']!r} contradicts internal port {internal_port}"
        )
    metrics = _metrics_config(machine_env, metrics_port)
    body: dict[str, Any] = {
        "name": name or tenant,
        "config": {
            "image": image,
            "env": machine_env,
            "metadata": {metadata_key: tenant},
            "guest": {"cpu_kind": cpu_kind, "cpus": cpus, "memory_mb": memory_mb},
            "services": [
                tenant_service(
                    internal_port,
                    autostop=autostop,
                    autostart=autostart,
                    min_machines_running=min_machines_running,
                )
            ],
            "auto_destroy": False,
            # A clean exit (the idle stop's exit 0, autostop) stays down and the proxy
            # starts it on the next request; a crash is retried up to 10 times
            # (https://fly.io/docs/machines/guides-examples/machine-restart-policy/).
            "restart": {"policy": "on-failure", "max_retries": 10},
            # Fly's default grace is 5s; shutdown publishes the final snapshot and
            # releases the lease, which must not be cut short by a SIGKILL.
            # The API takes this duration in nanoseconds.
            "stop_config": {"timeout": int(kill_timeout * 1_000_000_000)},
        },
    }
    if metrics is not None:
        body["config"]["metrics"] = metrics.to_json()
    if region:
        body["region"] = region
    return body


def _metrics_config(env: Mapping[str, str], default_port: int) -> MetricsConfig | None:
    """Where a machine with ``env`` serves its metrics, or None when it serves none."""
    raw = env.get("TENANTDB_METRICS_PORT", "").strip()
    if raw and (not raw.isdigit() or int(raw) > 65535):
        raise ConfigurationError(f"env TENANTDB_METRICS_PORT={raw[:20]!r} is not a port")
    port = int(raw) if raw else default_port
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"metrics port {port} is not a TCP port or 0")
    return MetricsConfig(port, "/metrics") if port else None
