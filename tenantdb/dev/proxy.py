"""A local stand-in for Fly Proxy: load balancing, fly-replay, the replay cache, autostart.

``FlyProxy`` is an ASGI app in front of the machines of one app (a ``Backends``: the cluster
runner, or a test double). It follows Fly's documentation
(https://fly.io/docs/networking/dynamic-request-routing/):

- Each request goes to a random started machine; when none runs, a stopped one is started
  (``auto_start_machines``). ``fly-force-instance-id: <id>`` sends a request to that machine
  (started if needed, no fallback); ``fly-prefer-instance-id: <id>`` prefers it.
- A machine whose service has autostart off is never started for a request, replays and
  forced requests included: "the proxy only routes traffic to Machines that are already
  running. If no Machines are running, the proxy does not start one and the request will
  fail" (https://fly.io/docs/reference/fly-proxy-autostop-autostart/, "How Fly Proxy behaves
  without autostart/autostop"). A replay to such a machine fails like one to a stopping machine.
- A ``fly-replay`` answer is followed: ``instance=<id>`` (started first if it is stopped),
  ``prefer_instance=<id>``, ``region=`` (comma-separated, ``any``), ``elsewhere=true`` (the
  answering machine sits out the next load balancing), ``state=``. The replayed request
  carries ``fly-replay-src: instance=<id>;region=<region>;t=<µs since epoch>[;state=<s>]``
  (the machine that asked) and ``fly-replay-cache-status: miss``. When a preferred machine
  cannot be used, ``fly-preferred-instance-unavailable: <id>`` tells the one that gets it.
- At most 1,000,000 bytes ("1MB") of a request body are held, so a request with a bigger
  body cannot be replayed (502); one request is replayed at most 10 times (502 after that).
- A replay to a machine that is stopping fails, as Fly's does with its PM08 error
  (https://fly.io/docs/reference/error-codes/), and so does one to a failed, unknown or
  unreachable machine. With ``fallback=force_self`` or ``prefer_self`` on the fly-replay
  ("Replay timeout and fallback"), the request goes back to the machine that asked (or, for
  ``prefer_self``, any machine) with a ``fly-replay-failed`` header instead
  (``instance=..;app=..;region=..;replay_source=..;reason=..;elapsed_ms=..``), and cannot be
  replayed again; without it the client gets the proxy's error. With ``timeout=<d>``, a
  target that does not start within it fails the replay with reason ``timeout``. Fly
  documents the fallback for a timeout, exhausted retries or no candidate, not for PM08:
  here PM08 takes the fallback too, and tenantdb sets a timeout so that it does not depend
  on that.
- A fly-replay that sets ``fly-replay-cache`` with a ``timeout`` or ``fallback`` field, or
  whose ``timeout`` is no duration, is answered ``PA03`` (invalid fly-replay, 502): "The
  ``timeout`` and ``fallback`` fields cannot be set in the ``fly-replay`` intended to be
  cached" (the same page, "Requirements and Limitations").
- ``fly-replay-cache: [host]/path/*`` with ``fly-replay-cache-ttl-secs`` (>= 10, and no
  ``state``) sends later requests under that path straight to the replay target, with
  ``fly-replay-cache-status: hit`` and no ``fly-replay-src``. ``fly-replay-cache: invalidate``
  on a fly-replay answer drops the entries matching its request (Fly documents it only
  there: on any other answer it is ignored); ``fly-replay-cache-control: skip`` on a request
  skips an entry set with ``fly-replay-cache-allow-bypass: yes``.
- ``force_https``: plain-HTTP requests are redirected (301) to HTTPS, as a service port with
  ``force_https`` does, Flycast included (https://fly.io/docs/networking/flycast/).
- A websocket handshake is routed and replayed like any request: the machine that upgrades
  it gets the connection, and the proxy relays messages both ways until one side closes.
  Fly's proxy replays upgrade requests too: the "Web Socket Considerations" note that
  superfly/docs pull request 2238 adds to https://fly.io/docs/networking/dynamic-request-routing/
  tells an app answering fly-replay not to negotiate the upgrade itself, leaving it to the
  machine the request is replayed to. A handshake that no machine upgrades gets the answer as
  a websocket denial response (or a close, where the server lacks that ASGI extension).

Every replay, cached ones included, is logged on one line and appended to ``replay_log``;
the last ``RECENT_ROUTES`` requests, with the machines each went through, are in ``routes``.
Fly documents these limits but not its exact error answers: here 502 means "this replay
cannot be done" and 503 "no machine can take the request". Not emulated: the JSON replay
format, replays to other apps, region aliases other than ``any``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Literal, Protocol, Self

import httpx
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, WebSocketNetworkError
from starlette.types import Message, Receive, Scope, Send
from wsproto.events import BytesMessage, TextMessage

__all__ = [
    "MAX_REPLAYS",
    "MAX_REPLAY_BODY",
    "MIN_CACHE_TTL",
    "RECENT_ROUTES",
    "Backends",
    "FlyProxy",
    "MachineInfo",
    "MachineState",
    "MachineUnavailableError",
    "ReplayDirective",
    "ReplayRecord",
    "ReplayVia",
    "RouteRecord",
    "RouteStep",
    "StepKind",
]

log = logging.getLogger("tenantdb.dev.proxy")

MAX_REPLAY_BODY = 1_000_000
MAX_REPLAYS = 10
MIN_CACHE_TTL = 10
RECENT_ROUTES = 50

MachineState = Literal["starting", "started", "stopping", "stopped", "failed"]
ReplayVia = Literal["fly-replay", "cache"]
StepKind = Literal["direct", "replayed", "cached replay", "fallback"]
_CacheStatus = Literal["miss", "hit", "bypass"]
Fallback = Literal["force_self", "prefer_self"]
# Why a replay failed, in fly-replay-failed: the reasons Fly documents.
FailReason = Literal["timeout", "retries_exhausted", "no_candidate"]
_FALLBACKS: dict[str, Fallback] = {"force_self": "force_self", "prefer_self": "prefer_self"}

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the proxy alone (a client must not forge where a request was replayed from: the
# machines' loop guard trusts it), meant for the proxy, or answered by it already (a
# 100-continue was sent to the client when the proxy read the body).
_NOT_FORWARDED = _HOP_BY_HOP | {
    b"expect",
    # A websocket handshake's own headers belong to one connection: the proxy makes its own
    # to the machine (no extensions: it relays whole messages). The subprotocols go through,
    # from the scope (servers may leave them out of its headers).
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"fly-replay-src",
    b"fly-replay-failed",
    b"fly-replay-cache-status",
    b"fly-preferred-instance-unavailable",
    b"fly-request-id",
    b"fly-client-ip",
    b"fly-force-instance-id",
    b"fly-prefer-instance-id",
    b"fly-replay-cache-control",
    b"x-forwarded-for",
}
_HTTP_SCHEMES = {"http": b"http", "https": b"https", "ws": b"http", "wss": b"https"}
# With no started machine to pick, load balancing starts one of these (autostart). A
# stopping machine is not one: it takes no requests until it has stopped.
_STARTABLE: tuple[MachineState, ...] = ("starting", "stopped")
_DURATION_RE = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


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


@dataclass(frozen=True)
class ReplayDirective:
    """A parsed ``fly-replay`` response header (or the routing headers of a request)."""

    instance: str | None = None
    prefer_instance: str | None = None
    regions: tuple[str, ...] = ()
    app: str | None = None
    elsewhere: bool = False
    state: str | None = None
    fallback: Fallback | None = None
    # Seconds the proxy tries to reach the target before the replay fails (None: no bound).
    timeout: float | None = None

    @classmethod
    def parse(cls, value: str) -> ReplayDirective:
        """Parse ``field=value;field=value``; values may be quoted, unknown fields are ignored.

        Raises ``ValueError`` for a ``timeout`` that is no duration (``10s``, ``800ms``).
        """
        fields: dict[str, str] = {}
        for part in value.split(";"):
            name, _, raw = part.partition("=")
            fields[name.strip().lower()] = raw.strip().strip('"')
        timeout = fields.get("timeout")
        return cls(
            timeout=None if timeout is None else _duration(timeout),
            instance=fields.get("instance") or None,
            prefer_instance=fields.get("prefer_instance") or None,
            regions=tuple(r.strip() for r in fields.get("region", "").split(",") if r.strip()),
            app=fields.get("app") or None,
            elsewhere=fields.get("elsewhere", "").lower() == "true",
            state=fields.get("state"),
            fallback=_FALLBACKS.get(fields.get("fallback", "")),
        )


@dataclass(frozen=True)
class ReplayRecord:
    """One replay: which request, the machine that asked for it, the machine it went to."""

    request_id: str
    method: str
    path: str
    source: str
    target: str
    via: ReplayVia


@dataclass(frozen=True)
class RouteStep:
    """One machine a request went to, how the proxy chose it, and whether it had to start it.

    ``woken`` only when the request started the machine; ``failed`` says why the machine
    could not take the request (a failed machine is never started by one).
    """

    machine_id: str
    kind: StepKind
    woken: bool
    failed: str | None = None


@dataclass(frozen=True)
class RouteRecord:
    """One client request: when, what, its answer's status, and every machine it went to."""

    request_id: str
    method: str
    path: str
    started_at: float
    status: int | None
    steps: tuple[RouteStep, ...]
    # Seconds until the answer started (a machine holding a request shows here), if any.
    answered_after: float | None = None


@dataclass
class _Trace:
    """What ``RouteRecord`` says about a request, gathered while the proxy routes it."""

    started_at: float = field(default_factory=time.time)
    status: int | None = None
    answered_at: float | None = None
    steps: list[RouteStep] = field(default_factory=list)

    def add(self, machine: MachineInfo, hop: _Hop) -> None:
        """Note the machine chosen for ``hop``: started by the request unless already running."""
        kind: StepKind
        if hop.via == "cache":
            kind = "cached replay"
        elif hop.failed is not None:
            kind = "fallback"  # back to the machine that asked for a replay that failed
        elif hop.source is not None:
            kind = "replayed"
        else:
            kind = "direct"
        self.steps.append(RouteStep(machine.machine_id, kind, machine.state in _STARTABLE))

    def failed(self, failure: _ReplayFailed) -> None:
        """Note that the last machine could not take the request (so it was not woken)."""
        self.steps[-1] = replace(self.steps[-1], woken=False, failed=str(failure))

    def watching(self, send: Send) -> Send:
        """``send``, noting the status of the answer the client gets."""

        async def watched(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                self.status = message["status"]
            elif message["type"] == "websocket.accept":
                self.status = 101
            if self.status is not None and self.answered_at is None:
                self.answered_at = time.time()
            await send(message)

        return watched


@dataclass(frozen=True)
class _CacheEntry:
    """A cached replay: requests under ``host`` + ``prefix`` go where ``directive`` says."""

    host: str
    prefix: str
    directive: ReplayDirective
    source: MachineInfo
    allow_bypass: bool
    expires_at: float

    def matches(self, host: str, path: str) -> bool:
        return host == self.host and (path == self.prefix or path.startswith(self.prefix + "/"))


@dataclass(frozen=True)
class _Hop:
    """Where the next attempt of a request goes, and what the proxy tells that machine."""

    directive: ReplayDirective
    source: MachineInfo | None = None
    via: ReplayVia = "fly-replay"
    cache_status: _CacheStatus | None = None
    # Why the replay before this hop failed: the request is on its way back (fallback).
    failed: str | None = None


class _Answer(Exception):
    """Stop routing and answer the client with this error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ReplayFailed(_Answer):
    """The proxy could not hand the request to its target: a fallback may take it back.

    ``reason`` is one of the three Fly documents for ``fly-replay-failed``; ``target`` and
    ``region`` name the machine the replay was for, when there is one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: FailReason = "no_candidate",
        target: MachineInfo | None = None,
    ) -> None:
        super().__init__(status, message)
        self.reason: FailReason = reason
        self.target = target


class _RequestBody:
    """A request body: held whole when it fits the replay limit, else streamed through once."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._buffer = bytearray()
        self._complete = False
        self._streamed = False
        self.client_gone = False

    async def load(self) -> None:
        """Read until the body ends or is bigger than the limit."""
        while not self._complete and len(self._buffer) <= self._limit:
            # A websocket's first message, websocket.connect, reads as an empty body.
            message = await self._receive()
            if message["type"] in ("http.disconnect", "websocket.disconnect"):
                self.client_gone = True
                return
            self._buffer += message.get("body", b"")
            self._complete = not message.get("more_body", False)

    @property
    def replayable(self) -> bool:
        """True when the whole body is held and within the limit: it can be sent again."""
        return self._complete and len(self._buffer) <= self._limit

    def content(self) -> bytes | AsyncIterator[bytes]:
        """The body to send: the held bytes, or (once) the held part and then the rest."""
        if self._complete:
            return bytes(self._buffer)
        if self._streamed:
            raise _Answer(502, "the request body was already streamed to a machine")
        self._streamed = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        yield bytes(self._buffer)
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return


@dataclass(frozen=True)
class _Request:
    """What every attempt of one client request shares."""

    request_id: str
    method: str
    path: str
    target: str
    host: str
    headers: list[tuple[bytes, bytes]]
    body: _RequestBody
    # A websocket handshake: the client's messages, once upgraded, come from ``receive``.
    websocket: bool
    receive: Receive
    # Sends an HTTP answer (a machine's, or the proxy's error) to the client.
    answer: Send


class FlyProxy:
    """An ASGI app routing requests to machines the way Fly Proxy does (dev and tests).

    Open it with ``async with`` (its HTTP client) before serving. ``rng`` and ``clock`` are
    there for tests: load balancing and replay cache expiry.
    """

    def __init__(
        self,
        backends: Backends,
        *,
        max_replays: int = MAX_REPLAYS,
        max_replay_body: int = MAX_REPLAY_BODY,
        force_https: bool = False,
        timeout: float = 60.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backends = backends
        self.max_replays = max_replays
        self.max_replay_body = max_replay_body
        self.force_https = force_https
        self.timeout = timeout
        self.replay_log: list[ReplayRecord] = []
        self.routes: deque[RouteRecord] = deque(maxlen=RECENT_ROUTES)
        self._rng = rng or random.Random()
        self._clock = clock
        self._cache: dict[tuple[str, str], _CacheEntry] = {}
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        # trust_env=False: an HTTP(S)_PROXY of the developer's shell must not catch loopback.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            trust_env=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Nothing to start here (the client opens in __aenter__), but servers ask.
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self._handle(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        trace = _Trace()
        send = trace.watching(send)
        answer = _answers(scope, send)
        if self.force_https and scope.get("scheme", "http") in ("http", "ws"):
            await _redirect_to_https(scope, headers, answer)
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        body = _RequestBody(receive, self.max_replay_body)
        await body.load()
        if body.client_gone:
            return  # nobody is left to answer
        request_id = secrets.token_hex(13)
        request = _Request(
            request_id=request_id,
            # A websocket handshake is a GET.
            method=scope.get("method", "GET"),
            path=scope["path"],
            target=target.decode("latin-1"),
            host=headers.get("host", "").rsplit(":", 1)[0].lower(),
            headers=_forward_headers(scope, scope["headers"], request_id, body.replayable),
            body=body,
            websocket=scope["type"] == "websocket",
            receive=receive,
            answer=answer,
        )
        try:
            await self._route(request, headers, trace, send)
        finally:
            self.routes.append(
                RouteRecord(
                    request_id,
                    request.method,
                    request.path,
                    trace.started_at,
                    trace.status,
                    tuple(trace.steps),
                    None if trace.answered_at is None else trace.answered_at - trace.started_at,
                )
            )

    async def _route(
        self, request: _Request, headers: dict[str, str], trace: _Trace, send: Send
    ) -> None:
        """Take the request from machine to machine until one answers, or answer an error."""
        body = request.body
        hop = self._first_hop(request, headers)
        # A cached route counts as the replay it stands for.
        replays = 1 if hop.via == "cache" else 0
        try:
            while True:
                attempt_started = time.monotonic()
                try:
                    machine, unavailable = self._choose(hop)
                    trace.add(machine, hop)
                    if hop.source is not None:
                        self._record(request, hop.source, machine, hop.via)
                    try:
                        directive = await self._attempt(request, machine, hop, unavailable, send)
                    except _ReplayFailed as failure:
                        trace.failed(failure)
                        raise
                except _ReplayFailed as failure:
                    elapsed = time.monotonic() - attempt_started
                    hop = _fall_back(hop, failure, self.backends.app_name, elapsed)
                    continue
                if directive is None:
                    return
                if hop.failed is not None:
                    raise _Answer(
                        502,
                        f"machine {machine.machine_id} asked to replay a request that came back "
                        "through a replay fallback: Fly does not replay it again",
                    )
                if not body.replayable:
                    raise _Answer(
                        502,
                        f"machine {machine.machine_id} asked to replay a request whose body is "
                        f"over {self.max_replay_body} bytes: Fly cannot replay it",
                    )
                if replays >= self.max_replays:
                    raise _Answer(
                        502, f"gave up after {replays} replays (the last from {machine.machine_id})"
                    )
                replays += 1
                status: _CacheStatus = "bypass" if hop.cache_status == "bypass" else "miss"
                hop = _Hop(directive, source=machine, cache_status=status)
        except _Answer as error:
            log.warning(
                "%s %s [%s]: %d %s",
                request.method,
                request.path,
                request.request_id,
                error.status,
                error,
            )
            await _send_error(request.answer, error.status, str(error), request.request_id)

    def _first_hop(self, request: _Request, headers: dict[str, str]) -> _Hop:
        """Where a new request goes: a forced or preferred machine, the cache, or anywhere."""
        forced = headers.get("fly-force-instance-id")
        if forced:
            return _Hop(ReplayDirective(instance=forced))
        plain = _Hop(ReplayDirective(prefer_instance=headers.get("fly-prefer-instance-id")))
        entry = self._cached(request.host, request.path)
        if entry is None:
            return plain
        if entry.allow_bypass and headers.get("fly-replay-cache-control") == "skip":
            return replace(plain, cache_status="bypass")
        return _Hop(entry.directive, source=entry.source, via="cache", cache_status="hit")

    async def _attempt(
        self,
        request: _Request,
        machine: MachineInfo,
        hop: _Hop,
        unavailable: str | None,
        send: Send,
    ) -> ReplayDirective | None:
        """Send the request to ``machine``; relay its answer, or return its fly-replay."""
        if self._client is None:
            raise RuntimeError("FlyProxy is not open: use `async with FlyProxy(...)`")
        headers = list(request.headers)
        if hop.source is not None and hop.via == "fly-replay":
            headers.append((b"fly-replay-src", _replay_src(hop.source, hop.directive).encode()))
        if hop.cache_status is not None:
            headers.append((b"fly-replay-cache-status", hop.cache_status.encode()))
        if unavailable is not None:
            headers.append((b"fly-preferred-instance-unavailable", unavailable.encode()))
        if hop.failed is not None:
            headers.append((b"fly-replay-failed", hop.failed.encode()))
        if request.websocket:
            key = base64.b64encode(secrets.token_bytes(16))
            headers += [
                (b"connection", b"upgrade"),
                (b"upgrade", b"websocket"),
                (b"sec-websocket-key", key),
                (b"sec-websocket-version", b"13"),
            ]
        try:
            async with contextlib.AsyncExitStack() as stack:
                base_url = await self._reach(stack, machine, hop.directive.timeout)
                upstream = self._client.build_request(
                    request.method,
                    base_url + request.target,
                    headers=headers,
                    content=request.body.content(),
                )
                response = await self._client.send(upstream, stream=True)
                try:
                    replay = response.headers.get("fly-replay")
                    if replay is None:
                        if request.websocket and response.status_code == 101:
                            await _relay_websocket(response, request.receive, send)
                        else:
                            await _relay(response, request.answer, request.request_id)
                        return None
                    if response.headers.get("fly-replay-cache") == "invalidate":
                        self._invalidate(request.host, request.path)
                    directive = _valid_replay(replay, response.headers, machine)
                    self._remember(response.headers, request, machine, directive)
                    return directive
                finally:
                    await response.aclose()
        except MachineUnavailableError as exc:
            raise _ReplayFailed(503, str(exc), target=machine) from None
        except httpx.ConnectError as exc:
            # No connection was made: the replay failed (a fallback may take it back).
            raise _ReplayFailed(
                502,
                f"machine {machine.machine_id} refused: {exc!r}",
                reason="retries_exhausted",
                target=machine,
            ) from None
        except httpx.TransportError as exc:
            raise _Answer(502, f"machine {machine.machine_id} did not answer: {exc!r}") from None

    async def _reach(
        self, stack: contextlib.AsyncExitStack, machine: MachineInfo, timeout: float | None
    ) -> str:
        """Hold ``machine`` for the request (starting it if needed) within the replay timeout.

        Fly: "timeout sets how long the proxy tries to reach the replay target"; a target
        that does not start in time fails the replay with reason ``timeout``.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                return await stack.enter_async_context(self.backends.use(machine.machine_id))
        except TimeoutError:
            elapsed = round((time.monotonic() - started) * 1000)
            raise _ReplayFailed(
                504,
                f"machine {machine.machine_id} was not reached within the replay timeout "
                f"({elapsed} ms)",
                reason="timeout",
                target=machine,
            ) from None

    def _choose(self, hop: _Hop) -> tuple[MachineInfo, str | None]:
        """Pick the next machine as Fly's load balancer would, and a preferred one passed over."""
        machines = {m.machine_id: m for m in self.backends.machines()}
        app = self.backends.app_name
        directive = hop.directive
        if directive.app not in (None, app):
            raise _Answer(502, f"replays to other apps ({directive.app}) are not emulated")
        if directive.instance is not None:
            machine = machines.get(directive.instance)
            if machine is None:
                raise _ReplayFailed(502, f"no machine {directive.instance} in app {app}")
            if machine.state == "stopping":
                raise _ReplayFailed(
                    503,
                    f"PM08: machine {machine.machine_id} is stopping and takes no requests",
                    target=machine,
                )
            if _held_down(machine):
                raise _ReplayFailed(
                    503,
                    f"machine {machine.machine_id} is {machine.state} and its service has "
                    "autostart off: the proxy does not start it",
                    target=machine,
                )
            return machine, None
        preferred = directive.prefer_instance
        if preferred is not None:
            machine = machines.get(preferred)
            if machine is not None and machine.state != "failed" and not _held_down(machine):
                return machine, None
        regions = set(directive.regions)
        excluded = hop.source.machine_id if directive.elsewhere and hop.source else None
        candidates = [
            m
            for m in machines.values()
            if (not regions or "any" in regions or m.region in regions)
            and m.machine_id != excluded
            and not _held_down(m)
        ]
        for states in (("started",), _STARTABLE):
            pool = sorted((m for m in candidates if m.state in states), key=lambda m: m.machine_id)
            if pool:
                return self._rng.choice(pool), preferred
        held = sum(_held_down(m) for m in machines.values())
        reason = f" ({held} not started, with autostart off)" if held else ""
        raise _Answer(503, f"no machine of app {app} can take the request{reason}")

    def _record(
        self, request: _Request, source: MachineInfo, target: MachineInfo, via: ReplayVia
    ) -> None:
        self.replay_log.append(
            ReplayRecord(
                request.request_id,
                request.method,
                request.path,
                source.machine_id,
                target.machine_id,
                via,
            )
        )
        log.info(
            "replay %s %s [%s]: %s -> %s (%s; target %s)",
            request.method,
            request.path,
            request.request_id,
            source.machine_id,
            target.machine_id,
            via,
            target.state,
        )

    def _cached(self, host: str, path: str) -> _CacheEntry | None:
        now = self._clock()
        for key, entry in list(self._cache.items()):
            if entry.expires_at <= now:
                del self._cache[key]
        matching = [e for e in self._cache.values() if e.matches(host, path)]
        return max(matching, key=lambda e: len(e.prefix)) if matching else None

    def _invalidate(self, host: str, path: str) -> None:
        for key, entry in list(self._cache.items()):
            if entry.matches(host, path):
                del self._cache[key]
                log.info("replay cache: dropped %s%s/*", entry.host, entry.prefix)

    def _remember(
        self,
        headers: httpx.Headers,
        request: _Request,
        source: MachineInfo,
        directive: ReplayDirective,
    ) -> None:
        """Store a ``fly-replay-cache`` instruction, if it is one Fly would accept."""
        pattern = headers.get("fly-replay-cache")
        if pattern is None or pattern == "invalidate":
            return
        # "/path/*" is cached for the request's own domain; "example.com/path/*" names one.
        host, slash, rest = pattern.partition("/")
        path_pattern = slash + rest
        ttl = headers.get("fly-replay-cache-ttl-secs", "")
        problem = None
        if ":" in host:
            problem = "the domain must not include a port"
        elif not path_pattern.endswith("/*"):
            problem = "the pattern must end with /*"
        elif not ttl.isdigit() or int(ttl) < MIN_CACHE_TTL:
            problem = f"fly-replay-cache-ttl-secs {ttl!r} must be a whole number >= {MIN_CACHE_TTL}"
        elif directive.state is not None:
            problem = "a cached fly-replay cannot carry state"
        else:
            entry = _CacheEntry(
                host.lower() or request.host,
                path_pattern[:-2],
                directive,
                source,
                headers.get("fly-replay-cache-allow-bypass", "").lower() == "yes",
                self._clock() + int(ttl),
            )
            if not entry.matches(request.host, request.path):
                problem = f"it does not match the request ({request.host}{request.path})"
            else:
                self._cache[(entry.host, entry.prefix)] = entry
                log.info("replay cache: %s -> %s for %ss", pattern, directive.instance, ttl)
                return
        log.warning("ignored fly-replay-cache %r from %s: %s", pattern, source.machine_id, problem)


def _duration(text: str) -> float:
    """Seconds of a fly-replay ``timeout`` such as ``10s`` or ``800ms``; ValueError otherwise."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"timeout {text[:40]!r} is not a duration such as 10s or 800ms")
    return float(match["number"]) * _DURATION_UNITS[match["unit"]]


def _valid_replay(value: str, headers: httpx.Headers, machine: MachineInfo) -> ReplayDirective:
    """The fly-replay of ``machine``'s answer, or PA03 as Fly answers an invalid one.

    "The ``timeout`` and ``fallback`` fields cannot be set in the ``fly-replay`` intended to
    be cached" (https://fly.io/docs/networking/dynamic-request-routing/, "Requirements and
    Limitations"); PA03 is "Invalid fly-replay" (https://fly.io/docs/reference/error-codes/).
    """
    try:
        directive = ReplayDirective.parse(value)
    except ValueError as exc:
        raise _Answer(502, f"PA03: invalid fly-replay from {machine.machine_id}: {exc}") from None
    cached = headers.get("fly-replay-cache", "invalidate") != "invalidate"
    if cached and (directive.timeout is not None or directive.fallback is not None):
        raise _Answer(
            502,
            f"PA03: invalid fly-replay from {machine.machine_id}: timeout and fallback cannot "
            "be set on a fly-replay with fly-replay-cache",
        )
    return directive


def _held_down(machine: MachineInfo) -> bool:
    """True when a request may not start ``machine``, which is not running (autostart off)."""
    return not machine.autostart and machine.state != "started"


def _fall_back(hop: _Hop, failure: _ReplayFailed, app: str, elapsed: float) -> _Hop:
    """The hop back to the machine that asked for a failed replay, if its fallback allows.

    Without a fallback (or on the way back already) ``failure`` is raised: the client gets
    the proxy's error. The hop carries ``fly-replay-failed`` as Fly writes it:
    ``instance=..;app=..;region=..;replay_source=..;reason=..;elapsed_ms=..``
    (https://fly.io/docs/networking/dynamic-request-routing/, "The fly-replay-failed Header").
    """
    source = hop.source
    fallback = hop.directive.fallback
    if source is None or fallback is None or hop.failed is not None or hop.via != "fly-replay":
        raise failure
    log.info("replay to failed (%s): back to %s (%s)", failure, source.machine_id, fallback)
    back = (
        ReplayDirective(instance=source.machine_id)
        if fallback == "force_self"
        else ReplayDirective(prefer_instance=source.machine_id)
    )
    target = failure.target
    fields = {
        "instance": target.machine_id if target else hop.directive.instance,
        "app": app,
        "region": target.region if target else None,
        "replay_source": source.machine_id,
        "reason": failure.reason,
        "elapsed_ms": str(round(elapsed * 1000)),
    }
    failed = ";".join(f"{name}={value}" for name, value in fields.items() if value)
    return _Hop(back, failed=failed)


def _forward_headers(
    scope: Scope, raw: list[tuple[bytes, bytes]], request_id: str, replayable: bool
) -> list[tuple[bytes, bytes]]:
    """The request's headers as machines see them: hop-by-hop ones out, Fly's own in."""
    client = (scope.get("client") or ("", 0))[0].encode()
    forwarded_for = b", ".join([v for k, v in raw if k == b"x-forwarded-for"] + [client])
    kept = [
        (k, v)
        for k, v in raw
        if k not in _NOT_FORWARDED
        # A held body is sent whole and httpx sets its length; a streamed one keeps it.
        and not (replayable and k == b"content-length")
    ]
    subprotocols = ", ".join(scope.get("subprotocols", ())).encode()
    if subprotocols:
        kept.append((b"sec-websocket-protocol", subprotocols))
    return [
        *kept,
        (b"fly-request-id", request_id.encode()),
        (b"fly-client-ip", client),
        (b"x-forwarded-for", forwarded_for),
        # A websocket's scheme is ws or wss; the handshake itself came over http or https.
        (b"x-forwarded-proto", _HTTP_SCHEMES.get(scope.get("scheme", "http"), b"http")),
    ]


def _replay_src(source: MachineInfo, directive: ReplayDirective) -> str:
    """The ``fly-replay-src`` value Fly adds to a replayed request."""
    value = f"instance={source.machine_id};region={source.region};t={time.time_ns() // 1000}"
    return value if directive.state is None else f"{value};state={directive.state}"


async def _relay(response: httpx.Response, send: Send, request_id: str) -> None:
    """Stream a machine's answer to the client as it comes."""
    headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
    headers.append((b"fly-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    try:
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.TransportError as exc:
        # Too late for an error answer: leaving the response unfinished makes the server
        # drop the connection, so the client sees the failure.
        log.warning("request %s: the machine's answer broke off: %r", request_id, exc)
        return
    await send({"type": "http.response.body", "body": b""})


def _answers(scope: Scope, send: Send) -> Send:
    """``send`` for HTTP answers: on a websocket, as a denial response, or else a close."""
    if scope["type"] == "http":
        return send
    denial = "websocket.http.response" in scope.get("extensions", {})

    async def answer(message: Message) -> None:
        if denial:
            await send({**message, "type": "websocket." + message["type"]})
        elif message["type"] == "http.response.start":
            # The server refuses the handshake (403): the status is lost, the code says why.
            await send({"type": "websocket.close", "code": 1011})

    return answer


async def _relay_websocket(response: httpx.Response, receive: Receive, send: Send) -> None:
    """Accept the client's websocket as the machine accepted it; relay messages until a close."""
    session = AsyncWebSocketSession(
        response.extensions["network_stream"],
        # The client's pings are answered by the server in front of the proxy: none needed here.
        keepalive_ping_interval_seconds=None,
        response=response,
    )
    async with session:
        await send({"type": "websocket.accept", "subprotocol": session.subprotocol})
        directions = {
            asyncio.create_task(_to_machine(receive, session)),
            asyncio.create_task(_to_client(session, send)),
        }
        try:
            done, _ = await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in directions:
                task.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
        for task in done:
            task.result()


async def _to_machine(receive: Receive, session: AsyncWebSocketSession) -> None:
    """Send the client's messages to the machine; pass the client's close on."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            await session.close(message.get("code", 1000), message.get("reason") or None)
            return
        if message.get("text") is not None:
            await session.send_text(message["text"])
        else:
            await session.send_bytes(message.get("bytes") or b"")


async def _to_client(session: AsyncWebSocketSession, send: Send) -> None:
    """Send the machine's messages to the client; pass the machine's close on."""
    while True:
        try:
            event = await session.receive()
        except WebSocketDisconnect as closed:
            await session.close(closed.code, closed.reason or None)
            await send({"type": "websocket.close", "code": closed.code, "reason": closed.reason})
            return
        except WebSocketNetworkError:
            await send({"type": "websocket.close", "code": 1011, "reason": "machine gone"})
            return
        if isinstance(event, TextMessage):
            await send({"type": "websocket.send", "text": event.data})
        elif isinstance(event, BytesMessage):
            await send({"type": "websocket.send", "bytes": bytes(event.data)})


async def _redirect_to_https(scope: Scope, headers: dict[str, str], send: Send) -> None:
    """Answer as a force_https port does: 301 to the same URL over HTTPS, body unread."""
    host = headers.get("host", "").rsplit(":", 1)[0]
    target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    query = scope.get("query_string", b"").decode("latin-1")
    location = f"https://{host}{target}" + (f"?{query}" if query else "")
    await send(
        {
            "type": "http.response.start",
            "status": 301,
            "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def _send_error(send: Send, status: int, message: str, request_id: str) -> None:
    body = f"fly proxy (tenantdb dev): {message}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"fly-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
