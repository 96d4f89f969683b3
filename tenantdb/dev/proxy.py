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
- With regions (``edge_region``), a request enters at the edge of that region or of the one
  its dev-only ``tenantdb-dev-region`` header names, machines see it as ``Fly-Region``, load
  balancing takes a machine of that region first, and every attempt on a machine of another
  region waits the injected ``latency`` there and back (``dev.regions``).
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

This module routes each request (``FlyProxy``) and keeps its records; the replay rules are
``dev.replays``, the HTTP side ``dev.http_relay``, websockets ``dev.websocket_relay`` and the
machines' interface ``dev.backends``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Self

import httpx
from starlette.types import Receive, Scope, Send

from tenantdb.asgi.replica_reads import bookmark_of
from tenantdb.dev.backends import (
    Backends,
    MachineInfo,
    MachineState,
    MachineUnavailableError,
)
from tenantdb.dev.http_relay import (
    ProxyError,
    RequestBody,
    forward_headers,
    no_cookie_jar,
    redirect_to_https,
    relay,
    send_error,
)
from tenantdb.dev.regions import EDGE_REGION_HEADER, NO_LATENCY, RegionLatency, is_region
from tenantdb.dev.replays import (
    MAX_REPLAYS,
    MIN_CACHE_TTL,
    CacheStatus,
    Hop,
    ReplayCache,
    ReplayDirective,
    ReplayFailed,
    ReplayVia,
    choose_machine,
    fall_back,
    replay_src,
    valid_replay,
)
from tenantdb.dev.routes import ReplayRecord, RouteRecord, RouteStep, StepKind, Trace
from tenantdb.dev.websocket_relay import answers, relay_websocket

# Backends, MachineInfo, MachineState, MachineUnavailableError (dev.backends), MAX_REPLAYS,
# MIN_CACHE_TTL, ReplayDirective, ReplayVia (dev.replays) and ReplayRecord, RouteRecord,
# RouteStep, StepKind (dev.routes) are named here too, where callers have always found them.
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
RECENT_ROUTES = 50


@dataclass(frozen=True)
class _Request:
    """What every attempt of one client request shares."""

    request_id: str
    method: str
    path: str
    target: str
    host: str
    headers: list[tuple[bytes, bytes]]
    # The region the request entered in (Fly-Region), None when the proxy knows no regions.
    edge: str | None
    body: RequestBody
    # A websocket handshake: the client's messages, once upgraded, come from ``receive``.
    websocket: bool
    receive: Receive
    # Sends an HTTP answer (a machine's, or the proxy's error) to the client.
    answer: Send


class FlyProxy:
    """An ASGI app routing requests to machines the way Fly Proxy does (dev and tests).

    Open it with ``async with`` (its HTTP client) before serving. ``rng`` and ``clock`` are
    there for tests: load balancing and replay cache expiry.

    Why ~285 lines: one request's journey (``_route``, ``_attempt``, ``_reach``) reads best
    in one place; the rules it applies are ``dev.replays``'.
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
        edge_region: str | None = None,
        latency: RegionLatency = NO_LATENCY,
    ) -> None:
        self.backends = backends
        self.edge_region = edge_region
        self.latency = latency
        self.max_replays = max_replays
        self.max_replay_body = max_replay_body
        self.force_https = force_https
        self.timeout = timeout
        self.replay_log: list[ReplayRecord] = []
        self.routes: deque[RouteRecord] = deque(maxlen=RECENT_ROUTES)
        self._rng = rng or random.Random()
        self._cache = ReplayCache(clock)
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        # trust_env=False: an HTTP(S)_PROXY of the developer's shell must not catch loopback.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            trust_env=False,
            cookies=no_cookie_jar(),
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
        trace = Trace()
        send = trace.watching(send)
        answer = answers(scope, send)
        if self.force_https and scope.get("scheme", "http") in ("http", "ws"):
            await redirect_to_https(scope, headers, answer)
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        body = RequestBody(receive, self.max_replay_body)
        await body.load()
        if body.client_gone:
            return  # nobody is left to answer
        edge = headers.get(EDGE_REGION_HEADER, self.edge_region)
        if edge is not None and not is_region(edge):
            message = f"{EDGE_REGION_HEADER}: {edge[:20]!r} is not a region code such as ams"
            await send_error(answer, 400, message, "")
            return
        request_id = secrets.token_hex(13)
        request = _Request(
            request_id=request_id,
            # A websocket handshake is a GET.
            method=scope.get("method", "GET"),
            path=scope["path"],
            target=target.decode("latin-1"),
            host=headers.get("host", "").rsplit(":", 1)[0].lower(),
            headers=forward_headers(scope, scope["headers"], request_id, body.replayable, edge),
            edge=edge,
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
                    trace.served_by,
                    _carried_bookmark(scope),
                    trace.bookmark,
                    trace.waited_ms,
                    edge,
                )
            )

    async def _route(
        self, request: _Request, headers: dict[str, str], trace: Trace, send: Send
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
                    machine, unavailable = choose_machine(
                        hop,
                        self.backends.machines(),
                        self.backends.app_name,
                        self._rng,
                        near=request.edge,
                    )
                    trace.add(machine, hop)
                    if hop.source is not None:
                        self._record(request, hop.source, machine, hop.via)
                    try:
                        directive = await self._attempt(request, machine, hop, unavailable, send)
                    except ReplayFailed as failure:
                        trace.failed(failure)
                        raise
                except ReplayFailed as failure:
                    elapsed = time.monotonic() - attempt_started
                    hop = fall_back(hop, failure, self.backends.app_name, elapsed)
                    continue
                if directive is None:
                    return
                if hop.failed is not None:
                    raise ProxyError(
                        502,
                        f"machine {machine.machine_id} asked to replay a request that came back "
                        "through a replay fallback: Fly does not replay it again",
                    )
                if not body.replayable:
                    raise ProxyError(
                        502,
                        f"machine {machine.machine_id} asked to replay a request whose body is "
                        f"over {self.max_replay_body} bytes: Fly cannot replay it",
                    )
                if replays >= self.max_replays:
                    raise ProxyError(
                        502, f"gave up after {replays} replays (the last from {machine.machine_id})"
                    )
                replays += 1
                status: CacheStatus = "bypass" if hop.cache_status == "bypass" else "miss"
                hop = Hop(directive, source=machine, cache_status=status)
        except ProxyError as error:
            log.warning(
                "%s %s [%s]: %d %s",
                request.method,
                request.path,
                request.request_id,
                error.status,
                error,
            )
            await send_error(request.answer, error.status, str(error), request.request_id)

    def _first_hop(self, request: _Request, headers: dict[str, str]) -> Hop:
        """Where a new request goes: a forced or preferred machine, the cache, or anywhere."""
        forced = headers.get("fly-force-instance-id")
        if forced:
            return Hop(ReplayDirective(instance=forced))
        plain = Hop(ReplayDirective(prefer_instance=headers.get("fly-prefer-instance-id")))
        entry = self._cache.cached(request.host, request.path)
        if entry is None:
            return plain
        if entry.allow_bypass and headers.get("fly-replay-cache-control") == "skip":
            return replace(plain, cache_status="bypass")
        return Hop(entry.directive, source=entry.source, via="cache", cache_status="hit")

    async def _attempt(
        self,
        request: _Request,
        machine: MachineInfo,
        hop: Hop,
        unavailable: str | None,
        send: Send,
    ) -> ReplayDirective | None:
        """Send the request to ``machine``; relay its answer, or return its fly-replay."""
        if self._client is None:
            raise RuntimeError("FlyProxy is not open: use `async with FlyProxy(...)`")
        headers = list(request.headers)
        if hop.source is not None and hop.via == "fly-replay":
            headers.append((b"fly-replay-src", replay_src(hop.source, hop.directive).encode()))
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
                # From the edge to the machine's region and back, as on Fly, where the edge
                # that took the request also replays it.
                await self.latency.cross(request.edge, machine.region)
                upstream = self._client.build_request(
                    request.method,
                    base_url + request.target,
                    headers=headers,
                    content=request.body.content(),
                )
                response = await self._client.send(upstream, stream=True)
                await self.latency.cross(machine.region, request.edge)
                try:
                    replay = response.headers.get("fly-replay")
                    if replay is None:
                        if request.websocket and response.status_code == 101:
                            await relay_websocket(response, request.receive, send)
                        else:
                            leg = self.latency.between(machine.region, request.edge)
                            await relay(response, request.answer, request.request_id, leg=leg)
                        return None
                    if response.headers.get("fly-replay-cache") == "invalidate":
                        self._cache.invalidate(request.host, request.path)
                    directive = valid_replay(replay, response.headers, machine)
                    self._cache.remember(
                        response.headers, request.host, request.path, machine, directive
                    )
                    return directive
                finally:
                    await response.aclose()
        except MachineUnavailableError as exc:
            raise ReplayFailed(503, str(exc), target=machine) from None
        except httpx.ConnectError as exc:
            # No connection was made: the replay failed (a fallback may take it back).
            raise ReplayFailed(
                502,
                f"machine {machine.machine_id} refused: {exc!r}",
                reason="retries_exhausted",
                target=machine,
            ) from None
        except httpx.TransportError as exc:
            raise ProxyError(502, f"machine {machine.machine_id} did not answer: {exc!r}") from None

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
            raise ReplayFailed(
                504,
                f"machine {machine.machine_id} was not reached within the replay timeout "
                f"({elapsed} ms)",
                reason="timeout",
                target=machine,
            ) from None

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


def _carried_bookmark(scope: Scope) -> str | None:
    """The bookmark a request carried (header or cookie), as the dashboard shows it."""
    try:
        found = bookmark_of(scope)
    except ValueError:
        return "malformed"
    return None if found is None else str(found)
