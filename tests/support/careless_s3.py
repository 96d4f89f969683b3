"""A small loopback S3 that ignores conditional headers, beside moto's real one.

Some S3-compatible stores accept ``If-None-Match: *`` and ``If-Match`` on PUT and do not
enforce them; on such a store two machines can both hold one lease. This fake answers PUT,
GET, HEAD and DELETE of path-style keys from memory (no signature checks, no listing) and
ignores the conditional headers named in ``ignores``, so that the probe and `tenantdb
doctor` can be shown to catch it.

    with careless_s3(ignores={"if-none-match"}) as endpoint:
        ...  # S3Bucket("bucket", endpoint_url=endpoint, ...)
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["careless_s3"]


def _handler(objects: dict[str, bytes], ignores: frozenset[str]) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def _answer(self, status: int, body: bytes = b"", etag: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Date", formatdate(usegmt=True))
            self.send_header("Last-Modified", formatdate(usegmt=True))
            if etag is not None:
                self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
            self._answer(status, body)

        def _key(self) -> str:
            return self.path.split("?", 1)[0]

        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            key = self._key()
            with lock:
                current = objects.get(key)
                none_match = self.headers.get("If-None-Match")
                match = self.headers.get("If-Match")
                if none_match == "*" and current is not None and "if-none-match" not in ignores:
                    self._error(412, "PreconditionFailed")
                    return
                if (
                    match is not None
                    and "if-match" not in ignores
                    and (current is None or _etag(current) != match)
                ):
                    self._error(412 if current is not None else 404, "PreconditionFailed")
                    return
                objects[key] = body
            self._answer(200, etag=_etag(body))

        def do_GET(self) -> None:
            current = objects.get(self._key())
            if current is None:
                self._error(404, "NoSuchKey")
                return
            self._answer(200, current, _etag(current))

        do_HEAD = do_GET

        def do_DELETE(self) -> None:
            with lock:
                objects.pop(self._key(), None)
            self._answer(204)

    return Handler


def _etag(body: bytes) -> str:
    return f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'


@contextmanager
def careless_s3(ignores: set[str] | frozenset[str] = frozenset()) -> Iterator[str]:
    """Serve the fake on a free loopback port; yield its endpoint URL."""
    objects: dict[str, bytes] = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(objects, frozenset(ignores)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
