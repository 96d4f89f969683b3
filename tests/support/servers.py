"""Serve ASGI apps for tests: in this process on a free loopback port, or as a uvicorn process.

- ``serve_in_thread(app)``: uvicorn in a thread of this process, for the ``with`` block; yields
  the base URL.
- ``LoopbackServer``: the uvicorn server behind it, for a test that must serve an app from its
  own event loop (an app bound to that loop).
- ``UvicornProcess``: ``uvicorn <app>`` in its own process, with its output in a log file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp

from tenantdb.dev.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port, not yet listening.

    IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted connections only
    then, and without it keep-alive answers wait ~40 ms for Nagle's algorithm.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


class LoopbackServer(uvicorn.Server):
    """uvicorn serving ``app`` on its own free loopback socket, leaving signals to pytest.

    ``options`` go to ``uvicorn.Config`` (defaults: ``log_level="warning"``,
    ``lifespan="off"``). Run it with ``serve(sockets=[self.socket])`` or ``run(...)``.
    """

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        super().__init__(
            uvicorn.Config(app, **{"log_level": "warning", "lifespan": "off", **options})
        )
        self.socket = loopback_socket()
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, timeout: float = 10, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread until the block ends; yield its base URL."""
    server = LoopbackServer(app, **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [server.socket]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn serving {app!r} did not start")
            time.sleep(0.01)
        yield server.url
    finally:
        server.should_exit = True
        thread.join(timeout)
        server.socket.close()


class UvicornProcess:
    """``uvicorn <app>`` in its own process, with its output in a log file."""

    def __init__(
        self,
        app: str,
        env: Mapping[str, str],
        log_path: Path,
        *,
        uvicorn_args: Sequence[str] = (),
        inherit_environ: bool = True,
        lifespan: str = "on",
        port: int | None = None,
        cwd: Path = ROOT,
    ) -> None:
        """``cwd`` is first on the child's path: the checkout whose code it runs."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        base = os.environ if inherit_environ else {}
        command = [sys.executable, "-m", "uvicorn", app, "--port", str(self.port), "--lifespan"]
        self.proc = subprocess.Popen(
            [*command, lifespan, *uvicorn_args],
            cwd=cwd,
            env={**base, **env, "PORT": str(self.port)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until /healthz answers; fail with the log if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class MachineProcesses:
    """``UvicornProcess`` machines of one test, all closed when the ``with`` block ends.

    Each machine gets its own data directory and log file under ``root``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[UvicornProcess] = []

    def __enter__(self) -> MachineProcesses:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for server in self.started:
            server.close()

    def start(
        self,
        app: str,
        machine: str,
        tenant: str,
        env: Mapping[str, str],
        *,
        ready: bool = True,
        uvicorn_args: Sequence[str] = (),
        port: int | None = None,
        cwd: Path = ROOT,
    ) -> UvicornProcess:
        """Serve ``app`` as machine ``machine`` of ``tenant`` (on ``port``, else a free one;
        the code of the checkout ``cwd``), with ``env`` on top; unless ``ready=False``, wait
        until it answers."""
        server = UvicornProcess(
            app,
            {
                "TENANT_ID": tenant,
                "FLY_MACHINE_ID": machine,
                "TENANTDB_DATA_DIR": str(self.root / machine),
                **env,
            },
            self.root / f"{machine}-{len(self.started)}.log",
            uvicorn_args=uvicorn_args,
            port=port,
            cwd=cwd,
        )
        self.started.append(server)
        if ready:
            server.wait_ready()
        return server
