"""This machine's usage records: its billed bucket requests and bytes, written to the bucket.

Once every ``USAGE_INTERVAL`` and when the machine stops, what ``Metrics`` counted since the
previous record becomes one empty object (``protocol.usage``), so that ``tenantdb status``
can show what a tenant cost in its last day, from any laptop, without asking the machines.
A record is a meter's reading, not data: one that cannot be written is logged and its
counts wait for the next one, and the machine serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from types import TracebackType
from typing import Self

from tenantdb.errors import TenantDBError
from tenantdb.metrics import Metrics
from tenantdb.protocol.lockfile import now_ms
from tenantdb.protocol.usage import Usage, UsageRecord, usage_key
from tenantdb.storage.base import Bucket

__all__ = ["USAGE_INTERVAL", "UsageReporter"]

log = logging.getLogger("tenantdb")

# Records a machine writes: 24 a day while it runs (a class A request each, $0.0036 a month
# at Tigris's list price), and one when it stops.
USAGE_INTERVAL = 3600.0
_ONE_WRITE = Usage(class_a=1)
# The longest a stopping machine waits for its last record.
_FINAL_TIMEOUT = 5.0


class UsageReporter:
    """Writes ``metrics``' usage of ``tenant`` as a record every ``interval`` and at exit."""

    def __init__(
        self,
        bucket: Bucket,
        metrics: Metrics,
        *,
        tenant: str,
        prefix: str,
        interval: float = USAGE_INTERVAL,
    ) -> None:
        self.bucket = bucket
        self.metrics = metrics
        self.tenant = tenant
        self.prefix = prefix
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.get_running_loop().create_task(self._every_interval())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(self.record(final=True), _FINAL_TIMEOUT)
        except TimeoutError:
            log.warning("tenant %s: the last usage record was not written in time", self.tenant)

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.record()
            except Exception:  # a bug: said loudly, counted; the meter goes on, and serving
                log.exception("tenant %s: the usage record failed unexpectedly", self.tenant)
                self.metrics.task_failed("usage")

    async def record(self, *, final: bool = False) -> None:
        """Write what was counted since the last record, if anything (a failure is logged).

        One class A request alone (the previous record's own PUT, on an idle machine) waits
        for more, or for the ``final`` record: an idle meter would else record itself
        forever."""
        usage = self.metrics.take_usage()
        if not usage or (usage == _ONE_WRITE and not final):
            self.metrics.restore_usage(usage)
            return
        record = UsageRecord(now_ms(), usage)
        key = usage_key(self.prefix, self.tenant, record, secrets.token_hex(6))
        try:
            await self.bucket.put(key, b"", if_none_match="*")
        except (TenantDBError, asyncio.CancelledError) as exc:
            # Counted again, into the next record. (A write that landed unheard counts
            # twice: a meter's error, never a lost one.)
            self.metrics.restore_usage(usage)
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("tenant %s: writing a usage record failed: %s", self.tenant, exc)
