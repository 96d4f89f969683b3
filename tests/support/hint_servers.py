"""Stand-ins on a holder's tail hint address, for tests of a standby's hint streams.

A machine's hint address is ``http://127.0.0.1:{machine_id}`` in the tests, so a holder
started with one of these servers' ports as its machine id has its standbys ask the server:

- ``CountingRelay(port)`` forwards every connection to the holder's real ``port`` and counts
  the hint requests that pass (``requests``).
- ``HostileHintServer(how)`` answers every hint request itself, badly: ``"cut"`` starts a
  stream and closes it in the middle of a line, ``"malformed"`` sends one whole line that is
  not a holder's, ``"trickle"`` sends a byte every 0.2 s and never a whole line.

Each runs its own event loop in a daemon thread, so it keeps serving while a test blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Literal, Self
from urllib.parse import parse_qs, urlsplit

from tenantdb.dev.ports import free_port

__all__ = ["CountingRelay", "HostileHintServer", "ThreadServer"]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ThreadServer:
    """A TCP server on 127.0.0.1 (``port``, a free one by default) whose handler runs on a
    loop of its own thread (``bench_replicas``' relay is one too)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        listening = asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(listening, self._loop).result(10)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Cancelled at the end (``__exit__``): a connection task that ended cancelled would
        # be logged as an error by asyncio's stream machinery.
        with contextlib.suppress(asyncio.CancelledError):
            await self.handle(reader, writer)

    def __exit__(self, *exc_info: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class CountingRelay(ThreadServer):
    """Forwards to 127.0.0.1:``target``; counts the hint requests on their way there."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except ConnectionError:  # the holder is not up yet
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await src.read(65536):
                    if count:
                        # A request head comes whole in one read on loopback.
                        self.requests += chunk.count(b"GET /.tenantdb/tail/")
                    dst.write(chunk)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


class HostileHintServer(ThreadServer):
    """Answers every hint request as ``how`` says (see the module's docstring)."""

    def __init__(self, how: Literal["cut", "malformed", "trickle"]) -> None:
        super().__init__()
        self.how = how
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:  # each request of a keep-alive connection
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                target = head.split(b" ", 2)[1].decode()
                after = parse_qs(urlsplit(target).query).get("after", ["1.1"])[0]
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                if self.how == "trickle":
                    while True:
                        writer.write(b"1\r\n \r\n")
                        await writer.drain()
                        await asyncio.sleep(0.2)
                line = f'{{"holding": true, "position": "{after}"'.encode()
                if self.how == "cut":
                    writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                    await writer.drain()
                    break
                line = line.replace(b"true", b'"yes"') + b"}\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
                await writer.drain()
        writer.close()
