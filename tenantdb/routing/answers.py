"""The answers a Router gives: a fly-replay (cached, or with the fallback), a body streamed to
the tenant's machine, or a 404/413/503 with a readable message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from tenantdb.errors import RoutingError
from tenantdb.metrics import Metrics, RoutingOutcome
from tenantdb.responses import RETRY_AFTER, send_error, send_response
from tenantdb.routing.arrival import RequestArrival, invalidation
from tenantdb.routing.bodies import MAX_REPLAY_BODY, MeasuredBody, body_stream, measure
from tenantdb.routing.proxy import BodyProxy

__all__ = ["Answers", "Problem", "fly_duration"]

log = logging.getLogger("tenantdb.routing")

# A replay that fails comes back to a machine of this app with fly-replay-failed, which
# tenantdb answers itself (503, Retry-After) instead of the proxy's bare error.
_FALLBACK = "fallback=prefer_self"
# Sends a request back to the app's load balancing, minus this machine: the documented
# carrier of fly-replay-cache: invalidate when there is no machine to replay to.
_ELSEWHERE = "elsewhere=true"


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a request cannot be routed: the HTTP status to answer and a readable message."""

    status: int
    message: str


def fly_duration(seconds: float) -> str:
    """A fly-replay ``timeout`` value, as Fly's examples write them (``10s``, ``800ms``)."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


class Answers:
    """Sends a Router's answers and counts each one in the routing metrics."""

    def __init__(self, metrics: Metrics, *, replay_timeout: float, replay_cache_ttl: int) -> None:
        self.metrics = metrics
        self.replay_cache_ttl = replay_cache_ttl
        self._fallback = f"timeout={fly_duration(replay_timeout)};{_FALLBACK}"

    async def refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        arrival: RequestArrival,
        problem: Problem,
    ) -> None:
        """Answer ``problem``; a cached route that led here is first sent back to the app.

        The replay cache sent this request here, so Fly would keep sending the tenant's
        requests here until its TTL runs out: the documented cure is a fly-replay back to the
        app with ``fly-replay-cache: invalidate``. Another machine then answers afresh.
        """
        try:
            replayable = arrival.how == "cache-hit" and (await measure(scope, receive)).replayable
        except ClientDisconnect:
            return  # nobody is left to answer
        outcome: RoutingOutcome = (
            "replay" if replayable else "404" if problem.status == 404 else "503"
        )
        self.metrics.routed(outcome)
        if replayable:
            headers = {"fly-replay": f"{_ELSEWHERE};{self._fallback}", **invalidation(arrival)}
            await send_response(scope, receive, send, Response(b"", 204, headers=headers))
            return
        retry = {"Retry-After": RETRY_AFTER} if problem.status == 503 else {}
        await send_error(scope, receive, send, problem.status, problem.message, headers=retry)

    async def replay(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        machine_id: str,
        cache: str | None,
        extra: Mapping[str, str],
    ) -> None:
        """Answer with a fly-replay to ``machine_id``, cached under ``cache`` if given."""
        self.metrics.routed("replay" if cache is None else "cached_replay")
        if cache is None:
            headers = {"fly-replay": f"instance={machine_id};{self._fallback}", **extra}
        else:
            # Fly refuses timeout and fallback on a replay it is asked to cache.
            headers = {"fly-replay": f"instance={machine_id}", **extra}
            headers["fly-replay-cache"] = cache
            headers["fly-replay-cache-ttl-secs"] = str(self.replay_cache_ttl)
        await send_response(scope, receive, send, Response(b"", 204, headers=headers))

    async def too_large(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        tenant: str,
        body: MeasuredBody,
        extra: Mapping[str, str],
    ) -> None:
        """Answer 413: the body is too large to replay, and large bodies are not proxied."""
        self.metrics.routed("413")
        await send_error(
            scope,
            receive,
            send,
            413,
            f"this request for tenant {tenant} has {body.size} larger than the 1 MB "
            f"({MAX_REPLAY_BODY} bytes) Fly can replay to the tenant's machine, and this "
            "app does not forward large bodies itself (proxy_large_bodies=False)",
            headers=extra,
        )

    async def proxy_body(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        proxy: BodyProxy,
        tenant: str,
        machine_id: str,
        body: MeasuredBody,
        invalidate: Callable[[str], None],
    ) -> None:
        """Stream the request to ``machine_id``; 503 (and ``invalidate``) if it is not taken."""
        started = False
        self.metrics.routed("proxied_body")

        async def observed_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await proxy.forward(
                scope,
                body_stream(body.chunks, receive, body.more),
                observed_send,
                machine_id,
                tenant=tenant,
            )
        except ClientDisconnect:
            return  # the client went away mid-upload: nobody is left to answer
        except RoutingError as exc:
            if started:
                raise
            log.warning("tenant %s: %s", tenant, exc)
            invalidate(tenant)
            await self.unavailable(
                scope,
                receive,
                send,
                f"the machine of tenant {tenant} did not take this request (its body is too "
                f"large for fly-replay, so it goes to machine {machine_id} directly, which "
                "does not start a stopped machine); retry shortly",
            )

    async def unavailable(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        message: str,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """Answer 503 with ``Retry-After``."""
        headers = {"Retry-After": RETRY_AFTER, **(extra or {})}
        self.metrics.routed("503")
        await send_error(scope, receive, send, 503, message, headers=headers)
