"""The holder: this machine holds the lease and serves the tenant's database.

It keeps the lease renewed (from restoring), ships the log and checkpoints (the shipper's
loop), collects garbage, and stops the machine after ``idle_stop`` seconds without a
request. Its loops run on through the final publish (stopping.py) until the machine stops.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterator

from tenantdb.connections.pool import ConnectionPool
from tenantdb.machine.context import MachineRole
from tenantdb.machine.stopping import final_publish
from tenantdb.replication.shipper import Shipper

__all__ = ["Holder"]

log = logging.getLogger("tenantdb")


class Holder(MachineRole):
    """Serves requests from the pool that restoring opened, and ships what they commit."""

    state = "serving"
    required = ("renewal", "shipper")

    def inherits(self, task: str) -> bool:
        return task == "renewal"  # the lease is renewed from the moment it was taken

    def enter(self) -> None:
        machine, settings = self.machine, self.machine.settings
        machine.holder = None
        shipper = self.shipper()
        # Fail stop in both durabilities: after an unexpected exception its position and
        # page hashes cannot be trusted, and a segment built on them could be wrong.
        self.spawn(
            "shipper",
            functools.partial(shipper.run, settings.sync_interval, settings.checkpoint_interval),
            "fail_stop",
        )
        self.spawn(
            "gc",
            functools.partial(shipper.collect_garbage_when_due, settings.sync_interval),
            "restart",
        )
        if settings.idle_stop > 0:
            # Restarted if it dies: it holds no state, and without it the tenant stays awake.
            machine.activity.count_from_now()
            self.spawn("idle", self._watch_idle, "restart")
        record = machine.lease.record
        log.info(
            "tenant %s: serving (generation %s)",
            machine.tenant,
            record.generation if record else "?",
        )

    def pool(self) -> ConnectionPool:
        if self.machine.pool is None:
            raise self.not_served()
        return self.machine.pool

    def shipper(self) -> Shipper:
        return self.machine.open_shipper(self)

    def reasons(self) -> Iterator[str]:
        # Requests could not be lent a connection in time lately.
        pool = self.machine.pool
        if pool is not None and (stalled := pool.stalled()):
            yield stalled
        # For longer than the durability timeout, a commit has waited or a log object's
        # upload has failed (a failure it retries but cannot get past, such as a foreign
        # object at the key): red although the shipper runs.
        shipper = self.machine.shipper
        if shipper is not None:
            stuck = max(shipper.lag(), shipper.upload_failing_for())
            if stuck > self.machine.settings.durability_timeout:
                yield f"log shipping has been stuck for {stuck:.0f}s (see the log)"

    async def wind_down(self, deadline: float) -> None:
        """Publish everything committed here, then release the lease."""
        await final_publish(self.machine, deadline=deadline)

    async def _watch_idle(self) -> None:
        """Set the idle event once no request has come for ``idle_stop`` seconds."""
        machine = self.machine
        limit = machine.settings.idle_stop
        while (idle_for := machine.activity.idle_for()) < limit:
            # While requests run, look again after a whole period: one may end meanwhile.
            await asyncio.sleep(limit - idle_for)
        log.info(
            "tenant %s: no request for %gs; stopping this machine (TENANTDB_IDLE_STOP)",
            machine.tenant,
            limit,
        )
        machine.activity.idle.set()
