"""Settings: one frozen value built from keyword arguments or the environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from tenantdb.crypto import Keyring, parse_keyring
from tenantdb.errors import ConfigurationError, InvalidTenantError
from tenantdb.tenants import TENANT_ID_RULE, validate_tenant

__all__ = [
    "RETENTION_FLOOR_LEASES",
    "Addressing",
    "BucketConsistency",
    "Durability",
    "Secret",
    "Settings",
    "is_tigris_endpoint",
    "parse_duration",
]

# When a write is acknowledged: once committed locally (and shipped within the sync
# interval), or once the bucket has it (the output gate holds the response until then).
Durability = Literal["async", "bucket"]
# How S3 requests name the bucket: "auto" picks virtual-hosted style for Tigris and path
# style for every other endpoint (https://www.tigrisdata.com/docs/sdks/s3/aws-python-sdk/).
Addressing = Literal["auto", "virtual", "path"]
# What the operator declares about the bucket's consistency across regions: "regional"
# (Tigris's Global and Dual-region location types: strong only within a region), "strong"
# (Single-region, Multi-region, or a store that is strongly consistent everywhere, as S3 is),
# or "auto": regional for a Tigris endpoint, strong for any other.
BucketConsistency = Literal["auto", "regional", "strong"]

# Tigris's S3 endpoints: Fly's name for it, and Tigris's own (every region behind one name).
TIGRIS_HOSTS = ("fly.storage.tigris.dev", "t3.storage.dev")
TIGRIS_DOMAINS = ("tigris.dev", "t3.storage.dev")


def is_tigris_endpoint(endpoint_url: str | None) -> bool:
    """True when ``endpoint_url`` is one of Tigris's S3 endpoints (by host name, not substring)."""
    host = (urlsplit(endpoint_url).hostname or "").lower() if endpoint_url else ""
    return host in TIGRIS_HOSTS or any(host.endswith("." + d) for d in TIGRIS_DOMAINS)


# Where request bodies too large for fly-replay are streamed. On Fly, the app's Flycast
# address: Fly's proxy there honours fly-force-instance-id, starts a stopped machine and
# reaches apps bound to 0.0.0.0 (https://fly.io/docs/networking/flycast/); a machine's 6PN
# name reaches running machines listening on it only. Needs `fly ips allocate-v6 --private`.
FLYCAST_PROXY_URL = "http://{app}.flycast"
INTERNAL_PROXY_URL = "http://{machine_id}.vm.{app}.internal:{port}"


class Secret:
    """A string that never shows itself in a repr, a str() or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value, for the one place that sends it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled: that would write its value out")

    def __copy__(self) -> Secret:
        return self  # immutable: copies (dataclasses.asdict, replace) share it

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _invalid(name: str, raw: str, problem: str, allowed: str) -> ConfigurationError:
    """The error for a variable's bad value: one line with the name, the value, the rule."""
    return ConfigurationError(f"{name}={raw[:80]!r} {problem}; allowed: {allowed}", variable=name)


def _number(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float,
    what: str = "a number of seconds",
) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    allowed = f"{what}, at least {minimum:g}"
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(name, raw, "is not a number", allowed) from None
    if not minimum <= value < float("inf"):
        raise _invalid(name, raw, "is out of range", allowed)
    return value


_COUNT = "a whole number"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``24h`` or ``30d``."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    allowed = "a duration of 0 or more: seconds, or a number with s, m, h or d (15m, 24h)"
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise _invalid(name, raw, str(exc), allowed) from None


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``24h`` or ``30d``; ValueError otherwise."""
    raw = text.strip()
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in _UNITS else (raw, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError("is not a duration") from None
    if not 0 <= value < float("inf"):
        raise ValueError("is out of range")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port, or 0 for none."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) > 65535:
        raise _invalid(name, raw, "is not a port", "a TCP port from 1 to 65535, or 0 for none")
    return int(raw)


def _durability(raw: str | None) -> Durability:
    value = (raw or "bucket").strip().lower()
    if value == "async":
        return "async"
    if value == "bucket":
        return "bucket"
    raise _invalid("TENANTDB_DURABILITY", raw or "", "is not a durability", "'bucket' or 'async'")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    if raw.lower() not in choices:
        raise _invalid(name, raw, "is not a choice", " or ".join(repr(c) for c in choices))
    return raw.lower()


def _switch(env: Mapping[str, str], name: str, *, default: bool = False) -> bool:
    """An on/off variable: 1/true/yes/on or 0/false/no/off (unset: ``default``)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    raise _invalid(name, raw, "is not on or off", "1 or 0 (true/false, yes/no, on/off)")


def _dns_server(raw: str | None) -> tuple[str, int] | None:
    if not raw:
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise _invalid(
            "TENANTDB_DNS_SERVER",
            raw,
            "is not host:port",
            "host:port, such as 127.0.0.1:5353 or [fdaa::3]:53",
        )
    return host.strip("[]"), int(port)


def _tenant(env: Mapping[str, str]) -> str | None:
    for name in ("TENANT_ID", "CUSTOMER_ID"):
        raw = env.get(name)
        if raw:
            try:
                return validate_tenant(raw)
            except InvalidTenantError as exc:
                raise _invalid(
                    name, raw, f"is not a tenant id ({exc.reason})", TENANT_ID_RULE
                ) from None
    return None


def _keyring(env: Mapping[str, str]) -> Keyring | None:
    """The key-encryption keys: TENANTDB_ENCRYPTION_KEY or the file TENANTDB_ENCRYPTION_KEY_FILE."""
    text, file = env.get("TENANTDB_ENCRYPTION_KEY"), env.get("TENANTDB_ENCRYPTION_KEY_FILE")
    if text is not None and file:
        raise ConfigurationError(
            "TENANTDB_ENCRYPTION_KEY and TENANTDB_ENCRYPTION_KEY_FILE are both set: set one",
            variable="TENANTDB_ENCRYPTION_KEY_FILE",
        )
    if text is not None:  # set but empty is a mistake, never "no encryption"
        return parse_keyring(text, variable="TENANTDB_ENCRYPTION_KEY")
    if file:
        try:
            content = Path(file).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
            raise ConfigurationError(
                f"TENANTDB_ENCRYPTION_KEY_FILE={file!r} cannot be read: {reason or exc}",
                variable="TENANTDB_ENCRYPTION_KEY_FILE",
            ) from None
        return parse_keyring(content, variable="TENANTDB_ENCRYPTION_KEY_FILE")
    return None


# The shortest retention, in lease TTLs (see the check in Settings.__post_init__).
RETENTION_FLOOR_LEASES = 4
# The longest lease: a holder that dies unannounced keeps its tenant unserved for one TTL, so
# a TTL of hours is a mistake (a unit slip, say), not a choice.
MAX_LEASE_TTL = 3600.0


@dataclass(frozen=True)
class Settings:
    """Everything tenantdb needs to know about its surroundings, validated once."""

    tenant: str | None = None
    bucket_name: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: Secret | None = None
    app_name: str | None = None
    machine_id: str = field(default_factory=lambda: f"local-{socket.gethostname()}")
    fly_region: str = "local"
    data_dir: Path = Path(".tenantdb/data")
    local_bucket_dir: Path = Path(".tenantdb/bucket")
    prefix: str = "tenants/"
    lease_ttl: float = 15.0
    checkpoint_interval: float = 86400.0
    sync_interval: float = 1.0
    durability: Durability = "bucket"
    durability_timeout: float = 10.0
    snapshot_retention: int = 5
    retention: float = 86400.0
    kill_timeout: float = 30.0
    # A standby's poll of lock.json (a conditional GET): how soon it sees a release.
    follow_interval: float = 0.5
    # Tail hints (TENANTDB_TAIL_HINTS): the holder tells a standby's stream each move of
    # lock.json and the standby reads it then, or once per two TTLs, instead of every
    # follow_interval.
    tail_hints: bool = True
    # Where a standby asks the holder ({machine_id}, {app}, {port}): its private address.
    hint_url: str = INTERNAL_PROXY_URL
    # How long a standby holds a request for its tenant while the lease changes hands.
    handoff_wait: float = 5.0
    # Read replicas (TENANTDB_REPLICA_READS): a standby whose copy is current serves reads.
    replica_reads: bool = False
    # The oldest copy a replica serves a read without a bookmark from, in seconds.
    max_replica_lag: float = 5.0
    # How long a replica waits for its copy to reach a request's bookmark before it
    # replays the request to the holder.
    read_wait: float = 1.0
    # Seconds without a request after which a holder releases the lease ("idle") and its
    # server exits 0, so that the platform stops the machine; 0 = never.
    idle_stop: float = 300.0
    pool_size: int = 8
    metadata_key: str = "customer_id"
    dns_server: tuple[str, int] | None = None
    fly_api_token: Secret | None = None
    machines_api_url: str = "https://api.machines.dev"
    port: int = 8080
    metrics_port: int = 9091  # 0: no metrics endpoint
    # The metrics' interface: TENANTDB_METRICS_HOST, else the app's own (HOST), else loopback
    # (0.0.0.0 on Fly).
    metrics_host: str = "127.0.0.1"
    s3_addressing: Addressing = "auto"
    # A lease is taken from another region than its last holder's only on a bucket that is
    # consistent across regions (see tenantdb.protocol.lease): not Tigris's default location.
    bucket_consistency: BucketConsistency = "auto"
    # "" picks the default: Flycast on Fly (FLY_APP_NAME), else the 6PN name.
    proxy_url: str = ""
    # Signs the body proxy's tenantdb-proxied-by header (default: derived from the bucket's
    # secret access key, which every machine of the app has and no client does).
    proxy_secret: Secret | None = None
    # Encryption at rest: the key-encryption keys (TENANTDB_ENCRYPTION_KEY); None: off.
    encryption_keys: Keyring | None = None
    # The prices `tenantdb status` estimates a month with, in USD: per 1,000 class A
    # requests (writes, lists), per 1,000 class B requests (reads), per GB stored a month.
    # The defaults are Tigris's list prices (https://www.tigrisdata.com/docs/pricing/).
    price_class_a: float = 0.005
    price_class_b: float = 0.0005
    price_storage: float = 0.02

    def __post_init__(self) -> None:
        if self.tenant is not None:
            validate_tenant(self.tenant)
        if self.lease_ttl < 3:
            raise ConfigurationError(f"lease TTL {self.lease_ttl}s is too short (minimum 3s)")
        if self.lease_ttl > MAX_LEASE_TTL:
            raise ConfigurationError(
                f"lease TTL {self.lease_ttl:g}s is too long (maximum {MAX_LEASE_TTL:g}s): after a "
                "crash the tenant waits one TTL before another machine may serve it"
            )
        if self.checkpoint_interval < 0:
            raise ConfigurationError("checkpoint interval must be >= 0 (0 = no periodic snapshot)")
        if self.sync_interval <= 0:
            raise ConfigurationError("sync interval must be positive")
        if self.durability not in get_args(Durability):
            raise ConfigurationError(f"durability {self.durability!r} must be 'bucket' or 'async'")
        if self.durability_timeout <= 0:
            raise ConfigurationError("durability timeout must be positive")
        if self.follow_interval <= 0:
            raise ConfigurationError("follow interval must be positive")
        if self.handoff_wait < 0:
            raise ConfigurationError("handoff wait must be >= 0 (0 = never hold a request)")
        if self.max_replica_lag <= 0:
            raise ConfigurationError("max replica lag must be positive")
        if self.read_wait < 0:
            raise ConfigurationError("read wait must be >= 0 (0 = never wait for a bookmark)")
        if self.idle_stop < 0:
            raise ConfigurationError("idle stop must be >= 0 (0 = never)")
        if self.snapshot_retention < 1:
            raise ConfigurationError("snapshot retention must keep at least 1 snapshot")
        floor = RETENTION_FLOOR_LEASES * self.lease_ttl
        if self.retention < floor:
            # Garbage collection judges an object unnamed by lock.json as garbage once it
            # is older than the retention. A holder paused past its lease (SIGSTOP, a
            # stalled VM) and resumed still acts on a view up to a lease old: with a short
            # retention (0 takes everything unnamed) it deletes the next holder's fresh
            # uploads before their CAS names them. A segment is named by the CAS that
            # follows its upload at once, so a few TTLs keep every such upload out of reach.
            raise ConfigurationError(
                f"retention {self.retention:g}s is below its floor of {floor:g}s "
                f"({RETENTION_FLOOR_LEASES} lease TTLs of {self.lease_ttl:g}s): a holder "
                "resumed after a pause could delete the next holder's fresh uploads",
                variable="TENANTDB_RETENTION",
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"metrics port {self.metrics_port} is not a TCP port or 0")
        if not self.metrics_host or any(c.isspace() for c in self.metrics_host):
            raise ConfigurationError(f"metrics host {self.metrics_host!r} is not an address")
        if self.s3_addressing not in get_args(Addressing):
            raise ConfigurationError(f"S3 addressing {self.s3_addressing!r}: auto, virtual or path")
        if self.bucket_consistency not in get_args(BucketConsistency):
            raise ConfigurationError(
                f"bucket consistency {self.bucket_consistency!r}: auto, regional or strong"
            )
        if self.prefix and not self.prefix.endswith("/"):
            object.__setattr__(self, "prefix", self.prefix + "/")
        if not self.proxy_url:
            default = FLYCAST_PROXY_URL if self.app_name else INTERNAL_PROXY_URL
            object.__setattr__(self, "proxy_url", default)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from environment variables (see the README), then overrides."""
        env = os.environ if environ is None else environ
        secret = env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("FLY_API_TOKEN")
        proxy_secret = env.get("TENANTDB_PROXY_SECRET")
        values: dict[str, Any] = {
            "tenant": _tenant(env),
            "bucket_name": env.get("BUCKET_NAME") or None,
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            "access_key_id": env.get("AWS_ACCESS_KEY_ID") or None,
            "secret_access_key": Secret(secret) if secret else None,
            "app_name": env.get("FLY_APP_NAME") or None,
            "data_dir": Path(env.get("TENANTDB_DATA_DIR") or ".tenantdb/data"),
            "local_bucket_dir": Path(env.get("TENANTDB_LOCAL_BUCKET") or ".tenantdb/bucket"),
            "prefix": env.get("TENANTDB_PREFIX", "tenants/"),
            "lease_ttl": _number(env, "TENANTDB_LEASE_TTL", 15.0, minimum=3),
            "checkpoint_interval": _number(env, "TENANTDB_CHECKPOINT_INTERVAL", 86400.0, minimum=0),
            "sync_interval": _number(env, "TENANTDB_SYNC_INTERVAL", 1.0, minimum=0.01),
            "durability": _durability(env.get("TENANTDB_DURABILITY")),
            "durability_timeout": _number(env, "TENANTDB_DURABILITY_TIMEOUT", 10.0, minimum=0.1),
            "snapshot_retention": int(
                _number(env, "TENANTDB_SNAPSHOT_RETENTION", 5, minimum=1, what=_COUNT)
            ),
            "retention": _duration(env, "TENANTDB_RETENTION", 86400.0),
            "kill_timeout": _number(env, "TENANTDB_KILL_TIMEOUT", 30.0, minimum=1),
            "follow_interval": _number(env, "TENANTDB_FOLLOW_INTERVAL", 0.5, minimum=0.05),
            "handoff_wait": _number(env, "TENANTDB_HANDOFF_WAIT", 5.0, minimum=0),
            "tail_hints": _switch(env, "TENANTDB_TAIL_HINTS", default=True),
            "hint_url": env.get("TENANTDB_HINT_URL") or INTERNAL_PROXY_URL,
            "idle_stop": _number(env, "TENANTDB_IDLE_STOP", 300.0, minimum=0),
            "replica_reads": _switch(env, "TENANTDB_REPLICA_READS"),
            "max_replica_lag": _number(env, "TENANTDB_MAX_REPLICA_LAG", 5.0, minimum=0.01),
            "read_wait": _number(env, "TENANTDB_READ_WAIT", 1.0, minimum=0),
            "pool_size": int(_number(env, "TENANTDB_POOL_SIZE", 8, minimum=1, what=_COUNT)),
            "metadata_key": env.get("TENANTDB_METADATA_KEY") or "customer_id",
            "dns_server": _dns_server(env.get("TENANTDB_DNS_SERVER")),
            "fly_api_token": Secret(token) if token else None,
            "machines_api_url": env.get("TENANTDB_MACHINES_API_URL") or "https://api.machines.dev",
            "port": int(_number(env, "PORT", 8080, minimum=1, what="a TCP port")),
            "proxy_url": env.get("TENANTDB_PROXY_URL") or "",
            "proxy_secret": Secret(proxy_secret) if proxy_secret else None,
            "encryption_keys": _keyring(env),
            "price_class_a": _number(env, "TENANTDB_PRICE_CLASS_A", 0.005, minimum=0),
            "price_class_b": _number(env, "TENANTDB_PRICE_CLASS_B", 0.0005, minimum=0),
            "price_storage": _number(env, "TENANTDB_PRICE_STORAGE", 0.02, minimum=0),
            "metrics_port": _port(env, "TENANTDB_METRICS_PORT", 9091),
            # On Fly, where nothing says otherwise, 0.0.0.0: Fly scrapes metrics there
            # (https://fly.io/docs/monitoring/metrics/, "Instrumentation").
            "metrics_host": (
                env.get("TENANTDB_METRICS_HOST")
                or env.get("HOST")
                or ("0.0.0.0" if env.get("FLY_APP_NAME") else "127.0.0.1")
            ).strip(),
            "s3_addressing": _choice(env, "TENANTDB_S3_ADDRESSING", get_args(Addressing), "auto"),
            "bucket_consistency": _choice(
                env, "TENANTDB_BUCKET_CONSISTENCY", get_args(BucketConsistency), "auto"
            ),
        }
        if env.get("FLY_MACHINE_ID"):
            values["machine_id"] = env["FLY_MACHINE_ID"]
        if env.get("FLY_REGION"):
            values["fly_region"] = env["FLY_REGION"]
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def consistent_across_regions(self) -> bool:
        """Whether the lease may move between regions (TENANTDB_BUCKET_CONSISTENCY)."""
        if self.bucket_consistency == "auto":
            return not self.is_tigris
        return self.bucket_consistency == "strong"

    @property
    def is_tigris(self) -> bool:
        """True when the bucket endpoint is Tigris (lease writes ask for consistency)."""
        return is_tigris_endpoint(self.endpoint_url)
