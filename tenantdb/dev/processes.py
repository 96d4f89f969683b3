"""The emulated machines as processes: one per machine, in its own process group, started,
watched, stopped as Fly stops a machine (SIGINT, then SIGKILL after the kill timeout), killed.

The cluster runner (``dev.cluster``) decides when; this module knows how.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tenantdb.dev.backends import MachineState, MachineUnavailableError
from tenantdb.dev.regions import region_of

__all__ = ["LOOPBACK", "DevMachine", "MachineStatus", "load_machines", "signal_group"]

log = logging.getLogger("tenantdb.dev")
machine_log = logging.getLogger("tenantdb.dev.machine")

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class MachineStatus:
    """One machine of the cluster: who it serves, its state, and its process while it runs."""

    machine_id: str
    tenant: str
    region: str
    state: MachineState
    port: int | None
    pid: int | None
    # Where its Prometheus metrics are served while it runs (None: not running, or none).
    metrics_port: int | None = None
    # How its last process ended (None: it runs, or never ended on its own).
    exit_code: int | None = None


class DevMachine:
    """One emulated machine: identity, state, and its process while it runs."""

    def __init__(self, machine_id: str, tenant: str, region: str, data_dir: Path) -> None:
        self.machine_id = machine_id
        self.tenant = tenant
        self.region = region
        self.data_dir = data_dir
        self.state: MachineState = "stopped"
        self.process: asyncio.subprocess.Process | None = None
        self.output: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port = 0
        self.exit_code: int | None = None
        # Starting and stopping one machine never overlap.
        self.lock = asyncio.Lock()

    @property
    def url(self) -> str:
        """The base URL of the machine's server."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def label(self) -> str:
        """The machine for people: its id and tenant."""
        return f"{self.machine_id} (tenant {self.tenant})"

    def status(self) -> MachineStatus:
        """The machine as the dashboard and the CLI show it."""
        process = self.process
        running = process is not None and process.returncode is None
        return MachineStatus(
            self.machine_id,
            self.tenant,
            self.region,
            self.state,
            self.port if running else None,
            process.pid if running and process is not None else None,
            self.metrics_port if running and self.metrics_port else None,
            self.exit_code,
        )

    async def run(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        *,
        start_timeout: float,
        clock: Callable[[], float],
        on_exit: Callable[[DevMachine], None],
    ) -> None:
        """Run the process and wait until it listens (the caller holds the lock).

        ``on_exit`` is told when the machine, started, exits on its own.
        """
        began = clock()
        try:
            # Its own session, so a Ctrl-C in the terminal reaches the cluster alone, and
            # one killpg() reaches everything the machine started.
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self.state = "stopped"
            raise MachineUnavailableError(
                f"machine {self.label}: cannot run {argv[0]}: {exc}"
            ) from None
        self.process = process
        self.output = asyncio.create_task(self._pump(process, on_exit))
        try:
            await self._wait_listening(process, start_timeout, clock)
        except BaseException:
            signal_group(process, signal.SIGKILL)
            await self.reap(process)
            self.state = "stopped"
            raise
        self.state = "started"
        log.info(
            "machine %s started on port %d (pid %d) in %.1fs",
            self.label,
            self.port,
            process.pid,
            clock() - began,
        )

    async def _wait_listening(
        self, process: asyncio.subprocess.Process, timeout: float, clock: Callable[[], float]
    ) -> None:
        deadline = clock() + timeout
        while True:
            if process.returncode is not None:
                raise MachineUnavailableError(
                    f"machine {self.label} exited with code {process.returncode} while "
                    "starting (its output is in the log above)"
                )
            try:
                _, writer = await asyncio.open_connection(LOOPBACK, self.port)
            except OSError:
                if clock() > deadline:
                    raise MachineUnavailableError(
                        f"machine {self.label} did not listen on port {self.port} "
                        f"within {timeout:g}s"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def _pump(
        self, process: asyncio.subprocess.Process, on_exit: Callable[[DevMachine], None]
    ) -> None:
        """Log the machine's output line by line; notice when it exits on its own."""
        assert process.stdout is not None
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:
                raw = b"(a line too long to show)"  # readline() has dropped it already
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            machine_log.info("%s %s | %s", self.tenant, self.machine_id, line)
        code = await process.wait()
        if self.process is process and self.state == "started":
            # Stopped by itself (idle: exit 0) or crashed: Fly marks the machine stopped,
            # and the next request starts it again.
            self.state = "stopped"
            self.exit_code = code
            on_exit(self)
            if code == 0:
                log.info("machine %s stopped itself (exit code 0)", self.label)
            else:
                log.warning("machine %s exited on its own with code %s", self.label, code)

    async def interrupt(self, process: asyncio.subprocess.Process, kill_timeout: float) -> bool:
        """Stop the process as Fly does: SIGINT, SIGKILL after ``kill_timeout``; True if clean."""
        signal_group(process, signal.SIGINT)
        clean = True
        try:
            await asyncio.wait_for(process.wait(), kill_timeout)
        except TimeoutError:
            clean = False
            log.error(
                "machine %s still running after the %gs kill timeout: SIGKILL",
                self.label,
                kill_timeout,
            )
            signal_group(process, signal.SIGKILL)
        await self.reap(process)
        return clean

    async def reap(self, process: asyncio.subprocess.Process) -> None:
        """Wait for the process, kill what is left of its group, drain its output."""
        await process.wait()
        signal_group(process, signal.SIGKILL)
        if self.output is not None:
            # Output ends when the last holder of the pipe is gone: bounded, just in case.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.output), 5)
        self.process = None

    def kill_now(self) -> None:
        """SIGKILL the machine's process group, if it runs (nothing is awaited)."""
        if self.process is not None and self.process.returncode is None:
            signal_group(self.process, signal.SIGKILL)


def signal_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Send ``sig`` to the process's whole group."""
    # The process leads its own group (start_new_session), so its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def load_machines(
    tenants: Sequence[str], per_tenant: int, regions: Sequence[str], root: Path
) -> dict[str, DevMachine]:
    """Reuse the machines of earlier runs (same ids, same data dirs), create the missing ones.

    A tenant's machines go to ``regions`` as ``region_of`` says.
    """
    registry = root / "machines.json"
    known: list[dict[str, str]] = []
    if registry.exists():
        known = json.loads(registry.read_text())["machines"]
    machines: dict[str, DevMachine] = {}
    for tenant in tenants:
        ids = [m["machine_id"] for m in known if m["tenant"] == tenant]
        while len(ids) < per_tenant:
            # Fly machine ids are 14 hex digits, and DNS labels.
            ids.append(secrets.token_hex(7))
            known.append({"machine_id": ids[-1], "tenant": tenant})
        for index, machine_id in enumerate(ids[:per_tenant]):
            data_dir = root / machine_id / "data"
            region = region_of(regions, index)
            machines[machine_id] = DevMachine(machine_id, tenant, region, data_dir)
    root.mkdir(parents=True, exist_ok=True)
    registry.write_text(json.dumps({"machines": known}, indent=2) + "\n")
    return machines
