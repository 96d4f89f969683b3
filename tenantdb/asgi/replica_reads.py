"""Read requests on a replica: served from its copy, or sent on to the holder.

With ``TENANTDB_REPLICA_READS`` a machine whose role is ``replica`` serves a read request
itself (``is_read``: GET, HEAD and OPTIONS unless the app says otherwise) from a read-only
connection to its copy, once the copy has reached the request's bookmark; everything else,
and every read the copy may not serve (``ReplicaRefusedError``), goes to the holder the way
a standby's requests do. A read that tries to write before its answer started is sent to
the holder too (the answer it made is dropped); one that writes after is the app's marking
bug: a log line names the route, and ``tenantdb_replica_reads{outcome="write_after_answer"}``
counts it.

Bookmarks: the holder's answers to requests that used the database, and a replica's
answers, carry the log position their data needs (``tenantdb-bookmark`` header and cookie,
see ``bookmark_headers``); a request brings it back in the cookie or the header
(``bookmark_of``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantdb.errors import ReplicaRefusedError
from tenantdb.machine.database import TenantDB
from tenantdb.machine.replica import BOOKMARK_HEADER, Bookmark, ReadCopy
from tenantdb.metrics import Metrics
from tenantdb.responses import send_error
from tenantdb.routing.bodies import MAX_REPLAY_BODY, read_up_to

__all__ = [
    "LAG_HEADER",
    "SERVED_BY_HEADER",
    "WAITED_HEADER",
    "ReadRequest",
    "ReplicaReads",
    "bookmark_headers",
    "bookmark_of",
    "is_read_method",
]

log = logging.getLogger("tenantdb")

SERVED_BY_HEADER = "tenantdb-served-by"
LAG_HEADER = "tenantdb-lag-ms"
WAITED_HEADER = "tenantdb-waited-ms"  # how long a replica waited for the request's bookmark
# Whether a request only reads (the app's override: ``TenantDBMiddleware(is_read=...)``).
ReadRequest = Callable[[Scope], bool]
Forward = Callable[[Scope, Receive, Send], Awaitable[None]]
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A bookmark cookie outlives any copy a replica may serve without it: past the lag bound,
# every copy that may serve holds the write (see docs/guarantees.md).
_MIN_COOKIE_AGE = 60


def is_read_method(scope: Scope) -> bool:
    """The default ``is_read``: GET, HEAD and OPTIONS requests only read."""
    return scope["type"] == "http" and scope["method"] in _READ_METHODS


def bookmark_of(connection: HTTPConnection | Scope) -> Bookmark | None:
    """The newest bookmark a request carries (header or cookie); None without one.

    Raises ``ValueError`` for a malformed ``tenantdb-bookmark`` header (a malformed cookie
    is ignored: the client cannot fix it). To pass it along to another service of the app,
    send ``str(bookmark)`` in that request's ``tenantdb-bookmark`` header.
    """
    scope = connection.scope if isinstance(connection, HTTPConnection) else connection
    headers = Headers(scope=scope)
    found: list[Bookmark] = []
    for value in headers.getlist(BOOKMARK_HEADER):
        found.append(Bookmark.parse(value))
    for raw in headers.getlist("cookie"):
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(raw)
            morsel = cookie.get(BOOKMARK_HEADER)
            if morsel is not None:
                found.append(Bookmark.parse(morsel.value))
        except Exception:  # noqa: S112 - http.cookies raises several kinds; one rule for all
            continue
    return max(found, default=None)


def bookmark_headers(
    bookmark: Bookmark, *, path: str, max_lag: float, scope: Scope
) -> list[tuple[bytes, bytes]]:
    """The bookmark's header and its cookie, scoped to the tenant's ``path`` (``Secure``
    when the client came over HTTPS: Fly's proxy says so in ``X-Forwarded-Proto``)."""
    age = max(_MIN_COOKIE_AGE, int(2 * max_lag) + 1)
    cookie = f"{BOOKMARK_HEADER}={bookmark}; Path={path}; Max-Age={age}; HttpOnly; SameSite=Lax"
    forwarded = Headers(scope=scope).get("x-forwarded-proto", "").strip().lower()
    if scope.get("scheme") == "https" or forwarded == "https":
        cookie += "; Secure"
    return [(BOOKMARK_HEADER.encode(), str(bookmark).encode()), (b"set-cookie", cookie.encode())]


class ReplicaReads:
    """Serves the read requests of a replica's tenant from its copy (see the module)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        machine_id: str,
        cookie_path: Callable[[str], str],
        max_lag: float,
        is_read: ReadRequest,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.machine_id = machine_id
        self.cookie_path = cookie_path
        self.max_lag = max_lag
        self.is_read = is_read
        self.metrics = metrics

    def takes(self, scope: Scope, tdb: TenantDB) -> bool:
        """Whether this request is a read that this machine may try to serve itself."""
        if scope["type"] != "http" or tdb.state != "replica" or tdb.draining:
            return False
        return self.is_read(scope)

    async def refuse_bad_bookmark(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer 400 to a request whose bookmark header is malformed; whether it did.

        Asked of every request for the tenant, holder or replica: the same answer wherever
        the request lands.
        """
        try:
            bookmark_of(scope)
        except ValueError as exc:
            await send_error(scope, receive, send, 400, f"{BOOKMARK_HEADER}: {exc}")
            return True
        return False

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, tdb: TenantDB, holder: Forward
    ) -> None:
        """Serve a read from the copy, or hand it to ``holder`` (the standby's way on); its
        bookmark was checked (``refuse_bad_bookmark``)."""
        bookmark = bookmark_of(scope)
        try:
            chunks, more = await read_up_to(receive, MAX_REPLAY_BODY)
        except ClientDisconnect:
            return
        replay = _replaying(chunks, more, receive)
        if more:  # too large to hold here: the holder streams it
            await holder(scope, replay(), send)
            return
        try:
            async with tdb.read_copy(bookmark) as read:
                wrote = await self._run(scope, replay(), send, tdb, read)
        except ReplicaRefusedError as exc:
            log.debug("tenant %s: %s goes to the holder: %s", tdb.tenant, _route(scope), exc.reason)
            self.metrics.replica_read("replayed_refused")
            await holder(scope, replay(), send)
            return
        if wrote:
            self.metrics.replica_read("replayed_write")
            await holder(scope, replay(), send)

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, tdb: TenantDB, read: ReadCopy
    ) -> bool:
        """Run the app on the copy; True if it tried to write before answering."""
        scope = dict(scope)
        scope["state"] = {**scope.get("state", {}), "tenant": tdb.tenant, "db": read.connection}
        started = False
        stamp = [
            (SERVED_BY_HEADER.encode(), self.machine_id.encode()),
            (LAG_HEADER.encode(), str(round(read.lag * 1000)).encode()),
            (WAITED_HEADER.encode(), str(round(read.waited * 1000)).encode()),
            *bookmark_headers(
                read.position,
                path=self.cookie_path(tdb.tenant),
                max_lag=self.max_lag,
                scope=scope,
            ),
        ]

        async def to_client(message: Message) -> None:
            nonlocal started
            if read.wrote and not started:
                return  # it goes to the holder: nothing of this answer may go out
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *stamp]}
                started = True
            await send(message)

        try:
            await self.app(scope, receive, to_client)
        except Exception:
            if read.wrote and not started:
                return True  # the holder answers it instead
            raise
        finally:
            if read.wrote and started:
                log.error(
                    "tenant %s: %s tried to write on a replica after its answer began: mark "
                    "the route as a write (TenantDBMiddleware(is_read=...), see the README)",
                    tdb.tenant,
                    _route(scope),
                )
                self.metrics.replica_read("write_after_answer")
        if read.wrote:
            return not started
        self.metrics.replica_read("served")
        return False


def _route(scope: Scope) -> str:
    return f"{scope.get('method', '?')} {scope.get('path', '?')}"


def _replaying(chunks: list[bytes], more: bool, receive: Receive) -> Callable[[], Receive]:
    """Makes a fresh ``receive`` that gives the body read so far again, then the rest."""

    def fresh() -> Receive:
        pending = list(chunks)

        async def replay() -> Message:
            if pending:
                body = pending.pop(0)
                return {"type": "http.request", "body": body, "more_body": bool(pending) or more}
            return await receive()  # the rest of the body, or the disconnect when it comes

        return replay

    return fresh
