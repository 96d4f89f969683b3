"""The machines behind the dev proxy: what the proxy knows of each, and the ``Backends``
interface the cluster runner (or a test double) gives it to reach and start them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "STARTABLE",
    "Backends",
    "MachineInfo",
    "MachineState",
    "MachineUnavailableError",
    "held_down",
]

MachineState = Literal["starting", "started", "stopping", "stopped", "failed"]
# With no started machine to pick, load balancing starts one of these (autostart). A
# stopping machine is not one: it takes no requests until it has stopped.
STARTABLE: tuple[MachineState, ...] = ("starting", "stopped")


@dataclass(frozen=True)
class MachineInfo:
    """One machine of the app, as the proxy sees it."""

    machine_id: str
    region: str
    state: MachineState
    # The autostart flag of the machine's service: off, requests never start the machine.
    autostart: bool = True


class MachineUnavailableError(Exception):
    """A machine cannot take a request: unknown, failed, or it would not start."""


class Backends(Protocol):
    """The machines behind the proxy, and the power to start them (Fly's autostart)."""

    @property
    def app_name(self) -> str:
        """The Fly app the machines belong to."""
        ...

    def machines(self) -> Sequence[MachineInfo]:
        """Return every machine of the app."""
        ...

    def use(self, machine_id: str) -> contextlib.AbstractAsyncContextManager[str]:
        """Hold a machine busy for one request (starting it if stopped); yield its base URL.

        Raises ``MachineUnavailableError`` when the machine cannot serve.
        """
        ...


def held_down(machine: MachineInfo) -> bool:
    """True when a request may not start ``machine``, which is not running (autostart off)."""
    return not machine.autostart and machine.state != "started"
