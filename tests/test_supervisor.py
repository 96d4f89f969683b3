"""Supervisor: restart with backoff, fail stop, and what counts as a failure."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tenantdb.machine.supervisor import Supervisor


class Counted:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def task_failed(self, task: str) -> None:
        self.failed.append(task)


def critical(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.CRITICAL]


async def test_a_restart_task_runs_again_after_each_pause_and_each_death_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted, stops = Counted(), list[str]()
    supervisor = Supervisor("acme", failures=counted, on_fail_stop=stops.append, pauses=(0.05,))
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RecursionError("injected")

    task = supervisor.spawn("standby", flaky, "restart")
    await asyncio.sleep(0.01)
    assert not supervisor.running("standby")  # waiting to restart: not running
    await asyncio.wait_for(task, 1)
    assert calls == 3
    assert counted.failed == ["standby", "standby"]
    assert stops == []
    records = critical(caplog)
    assert len(records) == 2
    assert all(r.exc_info and r.exc_info[0] is RecursionError for r in records)
    assert "the standby task died (RecursionError); restarting it in" in records[0].getMessage()


async def test_a_fail_stop_task_that_dies_calls_on_fail_stop_once_and_is_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted, stops = Counted(), list[str]()
    supervisor = Supervisor("acme", failures=counted, on_fail_stop=stops.append)
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise MemoryError

    await asyncio.wait_for(supervisor.spawn("shipper", broken, "fail_stop"), 1)
    assert calls == 1
    assert stops == ["the shipper task died (MemoryError)"]
    assert counted.failed == ["shipper"]
    [record] = critical(caplog)
    assert "this machine fails stop" in record.getMessage()
    assert not supervisor.running("shipper")


async def test_a_cancelled_task_has_ended_without_failing() -> None:
    counted, stops = Counted(), list[str]()
    supervisor = Supervisor("acme", failures=counted, on_fail_stop=stops.append)
    supervisor.spawn("renewal", lambda: asyncio.sleep(60), "fail_stop")
    await asyncio.sleep(0)
    assert supervisor.running("renewal")
    await supervisor.cancel()
    assert supervisor.tasks == set()
    assert (counted.failed, stops) == ([], [])
