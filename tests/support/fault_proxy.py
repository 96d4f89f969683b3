"""A fault-injecting HTTP proxy between tenantdb and the test S3 server, on loopback.

``FaultProxy(upstream)`` listens on 127.0.0.1 and forwards every request to ``upstream``
(the moto server), unless a ``Fault`` matches it. An ``S3Bucket`` simply points its
``endpoint_url`` at ``proxy.url`` (an IP address, so botocore uses path-style addressing:
``/<bucket>/<key>``, which is how the proxy learns the key). Faults match on the HTTP method,
the object key (an ``fnmatch`` pattern), the S3 operation name (``GetObject``,
``PutObject``, ``UploadPart``...), let the first ``skip`` matches through, fire with a
probability (from a seeded RNG, so a run can be repeated) and at most ``count`` times, and
do one of:

- ``error``: answer ``status`` with an S3 XML error body (500 InternalError, 503 SlowDown,
  412 PreconditionFailed, 409 ConditionalRequestConflict...). With ``after_upstream=True``
  the request is forwarded first, so it takes effect and only its answer is lost.
- ``delay``: hold the request ``seconds`` (past the client's read timeout), then forward it.
- ``cut``: forward, then send the answer's headers and ``cut_fraction`` of its body and
  close the connection mid-body.
- ``reset``: close the connection without answering (RST).
- ``stall``: read the request head, then answer nothing at all (not even ``100 Continue``)
  for ``seconds``, as a hung load balancer would; then reset.

The proxy runs its own event loop in a daemon thread, so it keeps serving while a test
blocks (subprocess servers, ``time.sleep``) and while the test's own loop is busy. Each
client connection carries one request (answers say ``Connection: close``); ``Expect:
100-continue`` is answered by the proxy itself, as S3 does, before it reads the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import random
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Fault", "FaultProxy", "Seen", "s3_operation", "transient_mix"]

Action = Literal["error", "delay", "cut", "reset", "stall"]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
)
_MESSAGES = {
    500: "We encountered an internal error. Please try again.",
    503: "Please reduce your request rate.",
    412: "At least one of the pre-conditions you specified did not hold",
    409: "A conflicting conditional operation is currently in progress against this resource.",
}


@dataclass
class Fault:
    """One rule: which requests it matches, how often it fires, and what it does."""

    action: Action
    method: str | None = None
    key: str | None = None
    operation: str | None = None
    probability: float = 1.0
    count: int | None = None
    skip: int = 0
    status: int = 503
    code: str = "SlowDown"
    after_upstream: bool = False
    seconds: float = 0.0
    cut_fraction: float = 0.5
    fired: int = 0
    matched: int = 0

    @classmethod
    def error(cls, status: int, code: str, **match: object) -> Fault:
        """Answer ``status`` with an S3 error ``code`` (an XML body like S3's)."""
        return cls("error", status=status, code=code, **match)  # type: ignore[arg-type]

    @classmethod
    def slow_down(cls, **match: object) -> Fault:
        """503 SlowDown: S3's throttling answer."""
        return cls.error(503, "SlowDown", **match)

    @classmethod
    def internal_error(cls, **match: object) -> Fault:
        """500 InternalError."""
        return cls.error(500, "InternalError", **match)

    @classmethod
    def precondition_failed(cls, **match: object) -> Fault:
        """412 PreconditionFailed, as a lost compare-and-swap gets it."""
        return cls.error(412, "PreconditionFailed", **match)

    @classmethod
    def conflict(cls, **match: object) -> Fault:
        """409 ConditionalRequestConflict: a concurrent conditional write."""
        return cls.error(409, "ConditionalRequestConflict", **match)

    @classmethod
    def delay(cls, seconds: float, **match: object) -> Fault:
        """Hold the request ``seconds`` before forwarding it."""
        return cls("delay", seconds=seconds, **match)  # type: ignore[arg-type]

    @classmethod
    def cut(cls, fraction: float = 0.5, **match: object) -> Fault:
        """Send the headers and ``fraction`` of the body, then close the connection."""
        return cls("cut", cut_fraction=fraction, **match)  # type: ignore[arg-type]

    @classmethod
    def stall(cls, seconds: float, **match: object) -> Fault:
        """Accept the request and answer nothing, not even ``100 Continue``, for ``seconds``."""
        return cls("stall", seconds=seconds, **match)  # type: ignore[arg-type]

    @classmethod
    def reset(cls, **match: object) -> Fault:
        """Close the connection without any answer."""
        return cls("reset", **match)  # type: ignore[arg-type]

    def matches(self, method: str, key: str, operation: str) -> bool:
        """Whether this rule applies to a request (ignoring probability and count)."""
        return (
            (self.method is None or self.method == method)
            and (self.operation is None or self.operation == operation)
            and (self.key is None or fnmatch.fnmatchcase(key, self.key))
        )

    def describe(self) -> str:
        """A short name for logs and assertions: ``error 503``, ``cut``, ``delay 2.0s``."""
        if self.action == "error":
            return f"error {self.status}" + (" after upstream" if self.after_upstream else "")
        if self.action in ("delay", "stall"):
            return f"{self.action} {self.seconds}s"
        return self.action


def transient_mix(rate: float, *, delay: float = 0.0, **match: object) -> list[Fault]:
    """Rules failing ``rate`` of the matching requests, spread evenly over transient kinds.

    The kinds: 500, 503 SlowDown, a 500 after the request took effect upstream (a lost
    answer), a connection cut mid-body, a reset, and (if ``delay`` > 0) a stall of ``delay``
    seconds. Rules are tried in order, so each gets the conditional probability that makes
    every kind equally likely and the total ``rate``.
    """
    kinds = [
        Fault.internal_error(**match),
        Fault.slow_down(**match),
        Fault.error(500, "InternalError", after_upstream=True, **match),
        Fault.cut(0.5, **match),
        Fault.reset(**match),
    ]
    if delay > 0:
        kinds.append(Fault.delay(delay, **match))
    share = rate / len(kinds)
    for index, fault in enumerate(kinds):
        fault.probability = share / (1 - share * index)
    return kinds


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it, and what it did with it."""

    method: str
    key: str
    operation: str
    fault: str | None


def s3_operation(method: str, key: str, query: dict[str, list[str]]) -> str:
    """Name the S3 operation of a path-style request."""
    if method == "GET":
        if not key:
            return "ListObjectsV2" if "list-type" in query else "ListObjects"
        return "ListParts" if "uploadId" in query else "GetObject"
    if method == "HEAD":
        return "HeadObject" if key else "HeadBucket"
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "UploadPart"
        return "PutObject" if key else "CreateBucket"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in query else "Post"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteObject" if key else "DeleteBucket"
    return method


def _error_body(code: str, status: int, key: str) -> bytes:
    message = _MESSAGES.get(status, "Injected failure.")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message} (injected)</Message>"
        f"<Key>{key}</Key><RequestId>fault-proxy</RequestId></Error>"
    ).encode()


class _Request:
    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = b""
        parts = urlsplit(target)
        path = unquote(parts.path).lstrip("/")
        _bucket, _, self.key = path.partition("/")
        self.operation = s3_operation(method, self.key, parse_qs(parts.query, True))

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return ""


class FaultProxy:
    """The proxy: ``start()`` it (or use it as a context manager), add faults, read ``seen``."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self._upstream = (parts.hostname, parts.port)
        self._rng = random.Random(seed)
        self._faults: list[Fault] = []
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """The endpoint URL to give an S3 client."""
        return f"http://127.0.0.1:{self.port}"

    # -- control, from any thread ----------------------------------------------------------

    def add(self, *faults: Fault) -> None:
        """Add rules; the first matching rule that fires decides a request's fate."""
        with self._lock:
            self._faults.extend(faults)

    def clear(self) -> None:
        """Remove every rule: from now on every request is forwarded untouched."""
        with self._lock:
            self._faults.clear()

    @contextlib.contextmanager
    def faults(self, *faults: Fault) -> Iterator[None]:
        """Apply ``faults`` for the duration of a ``with`` block."""
        self.add(*faults)
        try:
            yield
        finally:
            with self._lock:
                for fault in faults:
                    self._faults.remove(fault)

    def seen(
        self, *, operation: str | None = None, key: str | None = None, faulted: bool | None = None
    ) -> list[Seen]:
        """The requests seen so far, optionally filtered (``key`` is an fnmatch pattern)."""
        with self._lock:
            return [
                s
                for s in self._seen
                if (operation is None or s.operation == operation)
                and (key is None or fnmatch.fnmatchcase(s.key, key))
                and (faulted is None or (s.fault is not None) == faulted)
            ]

    def reset_log(self) -> None:
        """Forget the requests seen so far."""
        with self._lock:
            self._seen.clear()

    def _choose(self, request: _Request) -> Fault | None:
        with self._lock:
            chosen = None
            for fault in self._faults:
                if not fault.matches(request.method, request.key, request.operation):
                    continue
                fault.matched += 1
                if fault.matched <= fault.skip:
                    continue
                if fault.count is not None and fault.fired >= fault.count:
                    continue
                if self._rng.random() >= fault.probability:
                    continue
                fault.fired += 1
                chosen = fault
                break
            self._seen.append(
                Seen(
                    request.method,
                    request.key,
                    request.operation,
                    chosen.describe() if chosen else None,
                )
            )
            return chosen

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start serving in a daemon thread; return once the socket listens."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, limit=1 << 20, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listener and every open connection, then stop the thread."""
        loop = self._loop
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)
        loop.close()
        self._loop = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one connection -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            request = await self._read_head(reader)
            fault = self._choose(request)
            if fault is not None and fault.action == "stall":
                # Not even "100 Continue": the client is left waiting on its own timeouts.
                await asyncio.sleep(fault.seconds)
                self._reset(writer)
                return
            await self._read_body(request, reader, writer)
            await self._serve(request, fault, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # the proxy is stopping: end quietly
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> _Request:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
        return _Request(method, target, version, headers)

    @staticmethod
    async def _read_body(
        request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if request.header("expect").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if request.header("transfer-encoding").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers are sent to S3
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            request.body = b"".join(chunks)
        else:
            length = int(request.header("content-length") or 0)
            request.body = await reader.readexactly(length) if length else b""

    async def _serve(
        self, request: _Request, fault: Fault | None, writer: asyncio.StreamWriter
    ) -> None:
        if fault is None:
            await self._relay(await self._forward(request), request, writer)
            return
        if fault.action == "delay":
            await asyncio.sleep(fault.seconds)
            answer = await self._forward(request)
            if not writer.is_closing():
                await self._relay(answer, request, writer)
            return
        if fault.action == "error":
            if fault.after_upstream:
                await self._forward(request)
            await self._send_error(request, fault, writer)
            return
        if fault.action == "reset":
            if fault.after_upstream:
                await self._forward(request)
            self._reset(writer)
            return
        # cut: the real answer, truncated mid-body.
        head, body = await self._forward(request)
        if request.method == "HEAD" or not body:
            self._reset(writer)
            return
        writer.write(head + body[: int(len(body) * fault.cut_fraction)])
        await writer.drain()
        writer.transport.abort()

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER 0: close with an RST, as a dying load balancer would.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _forward(self, request: _Request) -> tuple[bytes, bytes]:
        """Send the request upstream; return the answer's head (rewritten) and body."""
        reader, writer = await asyncio.open_connection(*self._upstream)
        try:
            lines = [f"{request.method} {request.target} HTTP/1.1"]
            for name, value in request.headers:
                lowered = name.lower()
                if lowered in _HOP_BY_HOP or lowered in ("transfer-encoding", "content-length"):
                    continue
                lines.append(f"{name}: {value}")
            if request.body or request.method in ("PUT", "POST"):
                lines.append(f"Content-Length: {len(request.body)}")
            lines.append("Connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), timeout=60)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        kept = [
            line
            for line in header_lines
            if line.partition(":")[0].strip().lower() not in _HOP_BY_HOP
        ]
        names = {line.partition(":")[0].strip().lower() for line in kept}
        if "content-length" not in names and request.method != "HEAD":
            kept.append(f"Content-Length: {len(body)}")
        kept.append("Connection: close")
        new_head = "\r\n".join([status_line, *kept]) + "\r\n\r\n"
        return new_head.encode("latin-1"), body

    @staticmethod
    async def _relay(
        answer: tuple[bytes, bytes], request: _Request, writer: asyncio.StreamWriter
    ) -> None:
        head, body = answer
        writer.write(head if request.method == "HEAD" else head + body)
        await writer.drain()

    @staticmethod
    async def _send_error(request: _Request, fault: Fault, writer: asyncio.StreamWriter) -> None:
        body = _error_body(fault.code, fault.status, request.key)
        reason = {500: "Internal Server Error", 503: "Slow Down", 412: "Precondition Failed"}
        head = (
            f"HTTP/1.1 {fault.status} {reason.get(fault.status, 'Error')}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            "x-amz-request-id: fault-proxy\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + (b"" if request.method == "HEAD" else body))
        await writer.drain()
