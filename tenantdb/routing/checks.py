"""Startup checks of a machine's Fly setup: warnings in the log, never a failed startup.

- The stop timeout: Fly sends the kill signal, waits the machine's stop timeout, then kills
  it (https://fly.io/docs/reference/configuration/, ``kill_timeout``; a machine made with
  the Machines API or ``fly machine run`` has its own ``stop_config``). Shorter than
  ``TENANTDB_KILL_TIMEOUT``, it cuts the final publish short and leaves the lease held until
  its TTL. Read from the Machines API, so only with ``FLY_API_TOKEN``.
- The Flycast address: bodies too large for fly-replay are streamed through
  ``http://<app>.flycast`` by default, which needs a private IPv6
  (``fly ips allocate-v6 --private``, https://fly.io/docs/networking/flycast/). Without one,
  the name does not resolve.
"""

from __future__ import annotations

import logging

from tenantdb.config import Settings
from tenantdb.errors import RoutingError
from tenantdb.routing.dns import MachineLocator
from tenantdb.routing.machines_api import MachinesClient

__all__ = ["check_machine_setup"]

log = logging.getLogger("tenantdb.routing")


async def check_machine_setup(
    settings: Settings, locator: MachineLocator, machines: MachinesClient | None
) -> None:
    """Warn about Fly settings that would break tenantdb (stop timeout, Flycast address)."""
    if not settings.app_name:
        return  # local emulation: tenantdb dev sets both right
    if machines is not None:
        await _check_stop_timeout(settings, machines)
    if ".flycast" in settings.proxy_url:
        await _check_flycast(settings, locator)


async def _check_stop_timeout(settings: Settings, machines: MachinesClient) -> None:
    try:
        machine = await machines.get_machine(settings.machine_id)
    except RoutingError as exc:
        log.info("could not read this machine's stop timeout: %s", exc)
        return
    timeout = machine.stop_timeout
    if timeout is not None and timeout < settings.kill_timeout:
        log.warning(
            "machine %s stops with a %gs timeout, shorter than TENANTDB_KILL_TIMEOUT=%gs: an "
            "autostop or a deploy may kill it before the final publish and the lease release; "
            "raise its stop_config timeout (kill_timeout) to at least %gs",
            machine.id,
            timeout,
            settings.kill_timeout,
            settings.kill_timeout,
        )


async def _check_flycast(settings: Settings, locator: MachineLocator) -> None:
    name = f"{settings.app_name}.flycast."
    try:
        found = await locator.has_address(name)
    except RoutingError as exc:
        log.info("could not check the Flycast address %s: %s", name, exc)
        return
    if not found:
        log.warning(
            "%s does not resolve: requests with bodies over 1 MB for other tenants will fail "
            "(give the app a private IPv6: fly ips allocate-v6 --private)",
            name,
        )
