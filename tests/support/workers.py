"""Start ``tenant_worker`` processes and talk to them from tests."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """One machine process (``env`` is its whole environment); a thread collects its lines."""

    def __init__(self, env: Mapping[str, str], *, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.tenant_worker"],
            cwd=ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._queue.put(json.loads(line))
            except ValueError:
                continue

    def _drain(self) -> None:
        while True:
            try:
                self.events.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        """Return the first event (old or new) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            self._drain()
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching event; got {self.events}; see {self.log_path}")
            time.sleep(0.02)

    @property
    def state(self) -> str | None:
        """The last state the worker reported."""
        self._drain()
        states = [e["state"] for e in self.events if "state" in e]
        return states[-1] if states else None

    def command(self, line: str, timeout: float = 20) -> dict[str, Any]:
        """Send a command and wait for its answer."""
        self._drain()
        mark = len(self.events)
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        verb = line.split()[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain()
            for event in self.events[mark:]:
                if event.get("ok") == verb or "error" in event:
                    return event
            time.sleep(0.02)
        raise TimeoutError(f"no answer to {line!r}; see {self.log_path}")

    def stop(self, timeout: float = 30) -> None:
        """Ask for a graceful stop and wait for the process to exit."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal (SIGKILL by default) and, for SIGKILL, reap the process."""
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)

    def close(self) -> None:
        """Make sure the process is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
