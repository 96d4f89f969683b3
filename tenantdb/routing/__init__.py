"""Routing: finding the machine that serves another tenant."""

from tenantdb.routing.dns import MachineLocator

__all__ = ["MachineLocator"]
