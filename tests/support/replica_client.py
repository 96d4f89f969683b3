"""A client of several emulated machines that follows fly-replay as Fly's proxy would.

``Machines`` maps machine ids to base URLs; ``send`` sends a request to one machine and, while
an answer says ``fly-replay: instance=<id>``, sends it again to that machine with the
``fly-replay-src`` header Fly's proxy adds; a replay with ``fallback=prefer_self`` to a
machine that does not answer comes back with ``fly-replay-failed``. Cookies live in the
``httpx.AsyncClient`` given (one origin, as behind Fly's proxy: cookies ignore ports).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

MAX_HOPS = 3


@dataclass
class Sent:
    """The final answer of a request and the machines it went through, first to last."""

    response: httpx.Response
    hops: list[str] = field(default_factory=list)


def replay_target(response: httpx.Response) -> str | None:
    """The machine a fly-replay answer names, if the answer is one."""
    replay = response.headers.get("fly-replay")
    if replay is None:
        return None
    fields = dict(part.strip().partition("=")[::2] for part in replay.split(";"))
    return fields.get("instance") or None


async def send(
    client: httpx.AsyncClient,
    urls: dict[str, str],
    machine: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> Sent:
    """Send ``method path`` to ``machine`` and follow its fly-replays."""
    sent = Sent(httpx.Response(599), [machine])
    extra: dict[str, str] = {}
    fallback: str | None = None  # where a replay that cannot connect comes back to
    for _ in range(MAX_HOPS):
        try:
            response = await client.request(
                method, urls[machine] + path, headers={**(headers or {}), **extra}
            )
        except httpx.ConnectError:
            if fallback is None:
                raise
            # Fly's "fallback=prefer_self": the request comes back, saying why.
            machine, fallback = fallback, None
            extra = {"fly-replay-failed": "no_candidate"}
            sent.hops.append(machine)
            continue
        sent.response = response
        target = replay_target(response)
        if target is None:
            return sent
        t = int(time.time() * 1_000_000)
        extra = {"fly-replay-src": f"instance={machine};region=local;t={t};state=started"}
        fallback = machine if "fallback=prefer_self" in response.headers["fly-replay"] else None
        machine = target
        sent.hops.append(machine)
    raise AssertionError(f"more than {MAX_HOPS} replays: {sent.hops}")
