"""Checks of a machine's Fly setup: warnings at startup, lines of `tenantdb doctor`.

- The stop timeout: Fly sends the kill signal, waits the machine's stop timeout, then kills
  it (https://fly.io/docs/reference/configuration/, ``kill_timeout``; a machine made with
  the Machines API or ``fly machine run`` has its own ``stop_config``). Shorter than
  ``TENANTDB_KILL_TIMEOUT``, it cuts the final publish short and leaves the lease held until
  its TTL. Read from the Machines API, so only with ``FLY_API_TOKEN``.
- ``autostop = "suspend"``: "Fly Proxy instead suspends Machines if possible"
  (https://fly.io/docs/machines/api/machines-resource/, ``services.autostop``), and a resumed
  machine carries on from memory as if no time had passed, on a lease that may have expired
  and been taken meanwhile. tenantdb does not re-validate its lease on resume, so it asks
  for ``stop``.
- ``config.metrics``: Fly's Prometheus scrapes only machines whose config names a metrics
  port (https://fly.io/docs/monitoring/metrics/); ``[metrics]`` in fly.toml reaches only the
  machines ``fly deploy`` makes.
- The restart policy: ``always`` restarts a machine that exited cleanly, so an idle machine
  never stays stopped (https://fly.io/docs/machines/guides-examples/machine-restart-policy/).
- The metadata key: Fly's DNS finds a tenant's machine by ``<tenant>.<key>.kv._metadata``
  (https://fly.io/docs/networking/private-networking/), so the machine's metadata must name
  its tenant under ``TENANTDB_METADATA_KEY``.
- The Flycast address: bodies too large for fly-replay are streamed through
  ``http://<app>.flycast`` by default, which needs a private IPv6
  (``fly ips allocate-v6 --private``, https://fly.io/docs/networking/flycast/). Without one,
  the name does not resolve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tenantdb.config import Settings
from tenantdb.errors import RoutingError
from tenantdb.routing.dns import MachineLocator
from tenantdb.routing.machines import Machine
from tenantdb.routing.machines_api import MachinesClient

__all__ = ["Finding", "check_flycast", "check_machine_config", "check_machine_setup"]

log = logging.getLogger("tenantdb.routing")


@dataclass(frozen=True)
class Finding:
    """One check's result: what was found, and what to do when it is not ``ok``."""

    check: str
    ok: bool
    detail: str
    fix: str = ""


def check_machine_config(machine: Machine, settings: Settings) -> list[Finding]:
    """Check one machine's config (from the Machines API) against what tenantdb needs."""
    name = f"machine {machine.id}"
    findings = [_stop_timeout(machine, settings, name)]
    suspends = "suspend" in machine.autostop
    autostop = "suspend" if suspends else ", ".join(machine.autostop) or "off"
    findings.append(
        Finding(
            "autostop",
            not suspends,
            f"{name} has autostop {autostop}",
            ""
            if not suspends
            else "set the service's autostop to 'stop' (fly machine update "
            f"{machine.id} --autostop=stop): a resumed machine would serve on a lease that may "
            "have expired meanwhile",
        )
    )
    metrics = machine.metrics
    expected = settings.metrics_port
    metrics_ok = (
        (metrics is None) if not expected else (metrics is not None and metrics.port == expected)
    )
    findings.append(
        Finding(
            "metrics",
            metrics_ok,
            f"{name} is scraped at "
            + (f":{metrics.port}{metrics.path}" if metrics else "no port (no config.metrics)"),
            ""
            if metrics_ok
            else f"set config.metrics to port {expected}, path /metrics (tenantdb machines "
            "create does; fly.toml's [metrics] reaches only fly deploy machines)",
        )
    )
    policy = machine.restart_policy or "on-failure (default)"
    findings.append(
        Finding(
            "restart policy",
            machine.restart_policy != "always",
            f"{name} restart policy {policy}",
            ""
            if machine.restart_policy != "always"
            else f"fly machine update {machine.id} --restart on-fail: 'always' restarts a "
            "machine that stopped when idle",
        )
    )
    key = settings.metadata_key
    tenant = machine.tenant(key)
    findings.append(
        Finding(
            "metadata key",
            tenant is not None,
            f"{name} metadata {key}={machine.metadata.get(key)!r}",
            ""
            if tenant is not None
            else f"set metadata {settings.metadata_key}=<tenant> on the machine (fly machine "
            f"update {machine.id} --metadata {settings.metadata_key}=<tenant>), or "
            "TENANTDB_METADATA_KEY to the key its metadata uses",
        )
    )
    return findings


def _stop_timeout(machine: Machine, settings: Settings, name: str) -> Finding:
    timeout = machine.stop_timeout
    # Unset, Fly's default grace is 5 seconds.
    seconds = 5.0 if timeout is None else timeout
    ok = seconds >= settings.kill_timeout
    return Finding(
        "stop timeout",
        ok,
        f"{name} stops with a {seconds:g}s timeout"
        + (" (Fly's default)" if timeout is None else "")
        + f", TENANTDB_KILL_TIMEOUT={settings.kill_timeout:g}s",
        ""
        if ok
        else "raise its stop_config timeout (kill_timeout) to at least "
        f"{settings.kill_timeout:g}s: an autostop or a deploy may kill it before the final "
        "publish and the lease release",
    )


async def check_flycast(settings: Settings, locator: MachineLocator) -> Finding:
    """Whether ``<app>.flycast`` resolves (raises ``RoutingError`` when DNS cannot tell)."""
    name = f"{settings.app_name}.flycast."
    found = await locator.has_address(name)
    return Finding(
        "flycast",
        found,
        f"{name} {'resolves' if found else 'does not resolve'}",
        ""
        if found
        else "give the app a private IPv6 (fly ips allocate-v6 --private): requests with "
        "bodies over 1 MB for other tenants need it",
    )


async def check_machine_setup(
    settings: Settings, locator: MachineLocator, machines: MachinesClient | None
) -> None:
    """Warn about Fly settings that would break tenantdb (see the module's list)."""
    if not settings.app_name:
        return  # local emulation: tenantdb dev sets both right
    if machines is not None:
        try:
            machine = await machines.get_machine(settings.machine_id)
        except RoutingError as exc:
            log.info("could not read this machine's config: %s", exc)
        else:
            for finding in check_machine_config(machine, settings):
                if not finding.ok:
                    log.warning("%s: %s", finding.detail, finding.fix)
    if ".flycast" in settings.proxy_url:
        try:
            flycast = await check_flycast(settings, locator)
        except RoutingError as exc:
            log.info("could not check the Flycast address: %s", exc)
            return
        if not flycast.ok:
            log.warning("%s: %s", flycast.detail, flycast.fix)
