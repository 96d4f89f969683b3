"""S3Bucket error translation and retries, against real sockets.

Most tests point an S3Bucket at a tiny scripted HTTP server (a thread running
``http.server``) that answers what the test says — 500, 503 SlowDown, 409, resets, stalls —
and counts the requests, so retries are observed on the wire. The rest use the moto server.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Secret
from tenantdb.errors import (
    AccessDeniedError,
    BucketConfigurationError,
    ConditionalConflictError,
    LocalDiskError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageError,
    TransientStorageError,
)
from tenantdb.storage import RetryPolicy
from tenantdb.storage.s3 import S3Bucket
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.s3_server import DUMMY_REGION, s3_client

ATTEMPTS = 3
FAST_RETRY = RetryPolicy(attempts=ATTEMPTS, base_delay=0.001, max_delay=0.005)
SECRET = "wJalrXUtnFEMI-this-must-never-be-printed"
MiB = 1 << 20


@dataclass(frozen=True)
class Reply:
    """One scripted answer: an S3 error (or success), or a misbehaving connection."""

    status: int = 200
    code: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    action: str = "answer"  # "answer" | "reset" (close without answering) | "stall" | "short"


@dataclass
class Recorded:
    """A request as the scripted server saw it."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class ScriptedS3:
    """A scripted HTTP server: answers ``script`` in order, repeating the last reply."""

    script: list[Reply]
    requests: list[Recorded] = field(default_factory=list)
    endpoint: str = ""

    def next_reply(self, recorded: Recorded) -> Reply:
        self.requests.append(recorded)
        index = min(len(self.requests), len(self.script)) - 1
        return self.script[index]


def error_xml(code: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>scripted {code}</Message><RequestId>r1</RequestId></Error>"
    ).encode()


def make_handler(server: ScriptedS3) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 so that http.server answers "Expect: 100-continue", which botocore
        # sends with every PutObject; each answer still closes its connection.
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            reply = server.next_reply(
                Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            )
            if reply.action == "reset":
                # SO_LINGER 0: close with an RST, as a dying load balancer would.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                return
            if reply.action == "stall":
                time.sleep(1.0)
            body = reply.body or (error_xml(reply.code) if reply.code else b"")
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            declared = len(body) * 10 if reply.action == "short" else len(body)
            self.send_header("Content-Length", str(declared))
            if reply.code:
                self.send_header("Content-Type", "application/xml")
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

    return Handler


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedS3]]:
    """Start scripted S3 servers on free ports; stop them after the test."""
    started: list[ThreadingHTTPServer] = []

    def start(*script: Reply) -> ScriptedS3:
        state = ScriptedS3(list(script))
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
        started.append(httpd)
        state.endpoint = f"http://127.0.0.1:{httpd.server_port}"
        return state

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def s3_for(endpoint: str, **options: Any) -> S3Bucket:
    options.setdefault("retry", FAST_RETRY)
    return S3Bucket(
        options.pop("name", "scripted"),
        endpoint_url=endpoint,
        region=options.pop("region", DUMMY_REGION),
        access_key_id="AKIDEXAMPLE",
        secret_access_key=Secret(SECRET),
        **options,
    )


OK_PUT = Reply(200, headers=(("ETag", '"abc"'),))


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(500, "InternalError"), TransientStorageError),
        (Reply(503, "SlowDown"), TransientStorageError),
        (Reply(503, "ServiceUnavailable"), TransientStorageError),
        (Reply(429, "TooManyRequests"), TransientStorageError),
        (Reply(400, "RequestTimeout"), TransientStorageError),
        (Reply(409, "ConditionalRequestConflict"), ConditionalConflictError),
    ],
    ids=lambda value: f"{value.status}-{value.code}" if isinstance(value, Reply) else "",
)
async def test_retryable_answers_are_retried_then_surface(
    scripted: Callable[..., ScriptedS3], reply: Reply, expected: type[StorageError]
) -> None:
    server = scripted(reply)
    async with s3_for(server.endpoint) as s3:
        with pytest.raises(expected) as raised:
            await s3.put("tenants/acme/lock.json", b"{}", if_none_match="*")
    assert len(server.requests) == ATTEMPTS
    assert all(r.method == "PUT" for r in server.requests)
    assert raised.value.key == "tenants/acme/lock.json"
    assert raised.value.operation == "put"
    assert "tenants/acme/lock.json" in str(raised.value)
    assert reply.code in str(raised.value)


async def test_transient_answers_then_success(scripted: Callable[..., ScriptedS3]) -> None:
    server = scripted(Reply(503, "SlowDown"), Reply(500, "InternalError"), OK_PUT)
    async with s3_for(server.endpoint) as s3:
        info = await s3.put("k", b"body")
    assert info.etag == '"abc"'
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("method", "reply", "expected"),
    [
        ("put", Reply(403, "AccessDenied"), AccessDeniedError),
        ("put", Reply(403, "SignatureDoesNotMatch"), AccessDeniedError),
        ("put", Reply(404, "NoSuchBucket"), BucketConfigurationError),
        ("put", Reply(412, "PreconditionFailed"), PreconditionFailedError),
        ("get", Reply(404, "NoSuchKey"), ObjectNotFoundError),
        ("get", Reply(404, "NoSuchBucket"), BucketConfigurationError),
        ("head", Reply(404), ObjectNotFoundError),
        ("head", Reply(403), AccessDeniedError),
        ("put", Reply(400, "InvalidBucketName"), BucketConfigurationError),
    ],
    ids=lambda value: f"{value.status}-{value.code}" if isinstance(value, Reply) else str(value),
)
async def test_definite_answers_are_not_retried(
    scripted: Callable[..., ScriptedS3], method: str, reply: Reply, expected: type[StorageError]
) -> None:
    server = scripted(reply)
    async with s3_for(server.endpoint) as s3:
        call = {"put": lambda: s3.put("k", b"x"), "get": lambda: s3.get("k")}.get(
            method, lambda: s3.head("k")
        )
        with pytest.raises(expected) as raised:
            await call()
    assert len(server.requests) == 1
    assert not isinstance(raised.value, TransientStorageError)
    assert SECRET not in str(raised.value)


async def test_connection_reset_is_transient(scripted: Callable[..., ScriptedS3]) -> None:
    server = scripted(Reply(action="reset"))
    async with s3_for(server.endpoint) as s3:
        with pytest.raises(TransientStorageError, match="network failure") as raised:
            await s3.get("k")
    assert f"at {server.endpoint}" in str(raised.value)  # which endpoint failed
    # aiohttp itself resends an idempotent request once when the server disconnects, so
    # each of our attempts may reach the server once or twice.
    assert ATTEMPTS <= len(server.requests) <= 2 * ATTEMPTS


async def test_truncated_body_is_transient(scripted: Callable[..., ScriptedS3]) -> None:
    server = scripted(Reply(200, body=b"0123456789", action="short"))
    async with s3_for(server.endpoint) as s3:
        with pytest.raises(TransientStorageError):
            await s3.get("k")
    assert len(server.requests) == ATTEMPTS


async def test_read_timeout_is_transient(scripted: Callable[..., ScriptedS3]) -> None:
    server = scripted(Reply(action="stall"), OK_PUT)
    async with s3_for(server.endpoint, read_timeout=0.2) as s3:
        # The first attempt times out; the retry gets an answer.
        assert (await s3.put("k", b"x")).etag == '"abc"'
    assert len(server.requests) == 2


async def test_closed_port_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more: every attempt is refused.
    started = time.monotonic()
    async with s3_for(f"http://127.0.0.1:{port}", connect_timeout=1.0) as s3:
        with pytest.raises(TransientStorageError) as raised:
            await s3.head("k")
    assert time.monotonic() - started < 5
    assert "head" in str(raised.value)
    assert isinstance(raised.value.__cause__, Exception)


@pytest.mark.parametrize("tigris", [True, False])
async def test_tigris_consistency_header(scripted: Callable[..., ScriptedS3], tigris: bool) -> None:
    found = (("ETag", '"abc"'), ("Last-Modified", "Sun, 22 Nov 2026 02:28:27 GMT"))
    server = scripted(
        OK_PUT,
        Reply(200, headers=found, body=b"0123456789"),
        Reply(200, headers=found),
        Reply(204),
    )
    async with s3_for(server.endpoint, tigris=tigris) as s3:
        await s3.put("k", b"x", if_none_match="*")
        await s3.get("k")
        await s3.head("k")
        await s3.delete("k", if_match='"abc"')
    assert [r.method for r in server.requests] == ["PUT", "GET", "HEAD", "DELETE"]
    for request in server.requests:
        assert (request.headers.get("x-tigris-consistent") == "true") is tigris
        # The header is added before signing, so the store can trust it.
        if tigris:
            assert "x-tigris-consistent" in request.headers["authorization"]


@pytest.mark.parametrize(("region", "expected"), [(None, "us-east-1"), ("auto", "auto")])
async def test_region_is_explicit(
    scripted: Callable[..., ScriptedS3],
    monkeypatch: pytest.MonkeyPatch,
    region: str | None,
    expected: str,
) -> None:
    # botocore would ignore AWS_REGION anyway; make sure nothing else picks it up either.
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    server = scripted(OK_PUT)
    async with s3_for(server.endpoint, region=region) as s3:
        await s3.put("k", b"x")
    assert s3.region == expected
    assert f"/{expected}/s3/aws4_request" in server.requests[0].headers["authorization"]


async def test_secrets_never_shown(scripted: Callable[..., ScriptedS3]) -> None:
    server = scripted(Reply(403, "InvalidAccessKeyId"))
    s3 = s3_for(server.endpoint)
    assert SECRET not in repr(s3)
    assert SECRET not in str(vars(s3))
    async with s3:
        assert SECRET not in repr(s3)
        with pytest.raises(AccessDeniedError) as raised:
            await s3.get("k")
    assert SECRET not in str(raised.value)
    assert SECRET not in repr(raised.value)
    assert SECRET not in str(server.requests[0].headers)
    # Even credentials pasted into the endpoint URL stay out of the repr.
    assert "pa55" not in repr(s3_for("https://user:pa55@s3.example.com:9000"))


async def test_bucket_must_be_opened() -> None:
    with pytest.raises(StorageError, match="not open"):
        await s3_for("http://127.0.0.1:9").get("k")


async def test_bad_endpoint_is_a_configuration_error() -> None:
    with pytest.raises(BucketConfigurationError):
        async with s3_for("not a url"):
            pass


# -- against the moto server -----------------------------------------------------------------


async def test_no_such_bucket(s3_endpoint: str) -> None:
    async with s3_for(s3_endpoint) as s3:  # "scripted" was never created on moto
        with pytest.raises(BucketConfigurationError, match="NoSuchBucket"):
            await s3.get("k")
        with pytest.raises(BucketConfigurationError):
            await s3.put("k", b"x")


async def test_a_missing_bucket_is_named_with_how_to_create_it(s3_endpoint: str) -> None:
    async with s3_for(s3_endpoint) as s3:  # "scripted" was never created on moto
        for operation in (lambda: s3.get("tenants/acme/lock.json"), lambda: s3.list("tenants/")):
            with pytest.raises(BucketConfigurationError) as raised:
                await operation()
            message = str(raised.value)
            assert f"there is no bucket 'scripted' at {s3_endpoint}" in message
            assert "tenantdb does not create buckets: create it first" in message
            assert "fly storage create" in message


async def test_download_to_a_full_disk_is_a_local_disk_error(s3_bucket: S3Bucket) -> None:
    await s3_bucket.put("k", b"x" * 1000)
    with pytest.raises(LocalDiskError) as raised:
        await s3_bucket.download_file("k", Path("/dev/full"))
    assert raised.value.key == "k"


async def test_local_file_problems_are_local_disk_errors(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    await s3_bucket.put("k", b"x")
    with pytest.raises(LocalDiskError):
        await s3_bucket.download_file("k", tmp_path / "no-such-dir" / "out")
    with pytest.raises(LocalDiskError):
        await s3_bucket.upload_file("k", tmp_path / "no-such-file")
    assert (await s3_bucket.get("k")).body == b"x"


async def test_download_fails_if_the_object_is_replaced_midway(
    make_s3_bucket: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3: S3Bucket = await make_s3_bucket(concurrency=1)
    size = 3 * 5 * MiB  # three ranges of the 5 MiB test part size
    await s3.put("snap", os.urandom(size))
    original = s3._downloads._get_range
    calls = 0

    async def replace_after_first_range(key: str, start: int, end: int, *, etag: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            # Same size, other bytes: without If-Match the download would mix versions.
            await s3.put("snap", os.urandom(size))
        return await original(key, start, end, etag=etag)

    monkeypatch.setattr(s3._downloads, "_get_range", replace_after_first_range)
    with pytest.raises(PreconditionFailedError, match="replaced"):
        await s3.download_file("snap", tmp_path / "out")
    assert calls == 2  # not retried: a replaced object is not a transient failure


def pending_uploads(endpoint: str, bucket: str) -> list[Any]:
    client = s3_client(endpoint)
    uploads: list[Any] = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    client.close()
    return uploads


@pytest.mark.parametrize("failure", ["denied", "transient"])
async def test_failed_multipart_upload_is_aborted(
    s3_endpoint: str,
    s3_bucket: S3Bucket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    from botocore.exceptions import ClientError

    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(16 * MiB))  # four 5 MiB parts at the test part size
    client = s3_bucket._client
    real_upload_part = client.upload_part
    parts_sent: list[int] = []

    async def failing_upload_part(**kwargs: Any) -> Any:
        parts_sent.append(kwargs["PartNumber"])
        if kwargs["PartNumber"] == 3:
            status, code = (403, "AccessDenied") if failure == "denied" else (503, "SlowDown")
            raise ClientError(
                {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                "UploadPart",
            )
        return await real_upload_part(**kwargs)

    monkeypatch.setattr(client, "upload_part", failing_upload_part)
    expected = AccessDeniedError if failure == "denied" else TransientStorageError
    with pytest.raises(expected):
        await s3_bucket.upload_file("big", src)
    assert pending_uploads(s3_endpoint, s3_bucket.name) == []
    with pytest.raises(ObjectNotFoundError):
        await s3_bucket.head("big")
    # A transient failure restarts the whole upload each time: all attempts happened.
    assert parts_sent.count(3) == (1 if failure == "denied" else 4)


class BodySpy:
    """A GetObject body that counts the bytes read from it and whether it was closed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.read_bytes = 0
        self.closed = False

    async def read(self, amt: int | None = None) -> bytes:
        chunk: bytes = await self.inner.read(amt)
        self.read_bytes += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True
        self.inner.close()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-content-length"])
async def test_too_large_object_is_not_read_nor_retried(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, declared: bool
) -> None:
    await s3_bucket.put("big.json", b"x" * MiB)
    client = s3_bucket._client
    real_get_object = client.get_object
    bodies: list[BodySpy] = []

    async def spying_get_object(**kwargs: Any) -> Any:
        response = await real_get_object(**kwargs)
        if not declared:
            # A store that streams without Content-Length: the read itself must stop.
            del response["ContentLength"]
        bodies.append(BodySpy(response["Body"]))
        response["Body"] = bodies[-1]
        return response

    monkeypatch.setattr(client, "get_object", spying_get_object)
    with pytest.raises(ObjectTooLargeError) as raised:
        await s3_bucket.get("big.json", max_size=1000)
    assert (raised.value.key, raised.value.limit) == ("big.json", 1000)
    assert raised.value.size == (MiB if declared else 1001)
    (body,) = bodies  # not retried
    assert body.read_bytes == (0 if declared else 1001)
    assert body.closed
    # The dropped connection does not hurt the next read.
    assert (await s3_bucket.get("big.json")).body == b"x" * MiB


@pytest.fixture
async def proxied(s3_endpoint: str) -> AsyncIterator[tuple[S3Bucket, FaultProxy]]:
    """A fresh moto bucket seen through a fault proxy, with a small multipart threshold."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=name)
    client.close()
    with FaultProxy(s3_endpoint) as proxy:
        bucket = s3_for(
            proxy.url, name=name, multipart_threshold=6 * MiB, part_size=5 * MiB, read_timeout=5
        )
        async with bucket:
            yield bucket, proxy


def uploads_of(endpoint: str, bucket: str, key: str) -> list[str]:
    """The ids of the in-progress multipart uploads of exactly ``key``, asked directly."""
    client = s3_client(endpoint)
    try:
        page = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
    finally:
        client.close()
    return [upload["UploadId"] for upload in page.get("Uploads", []) if upload["Key"] == key]


def read_object(endpoint: str, bucket: str, key: str) -> bytes:
    client = s3_client(endpoint)
    try:
        body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    finally:
        client.close()
    return body


@pytest.mark.parametrize("lost", ["once", "always"])
async def test_unanswered_create_multipart_upload_is_aborted(
    s3_endpoint: str,
    proxied: tuple[S3Bucket, FaultProxy],
    tmp_path: Path,
    lost: str,
) -> None:
    s3, proxy = proxied
    # A neighbour the cleanup must leave alone: its key only starts with the uploaded one.
    client = s3_client(s3_endpoint)
    neighbour = client.create_multipart_upload(Bucket=s3.name, Key="snap/1.bin.other")
    client.close()
    src = tmp_path / "big.bin"
    data = os.urandom(7 * MiB)  # two parts at the test part size
    src.write_bytes(data)
    # The server creates the upload, then its answer is lost: a 500 from a proxy after
    # the store acted, as far as the client can tell no different from a reset.
    proxy.add(
        Fault.error(
            500,
            "InternalError",
            operation="CreateMultipartUpload",
            after_upstream=True,
            count=1 if lost == "once" else None,
        )
    )
    if lost == "once":
        await s3.upload_file("snap/1.bin", src)
        assert read_object(s3_endpoint, s3.name, "snap/1.bin") == data
    else:
        with pytest.raises(TransientStorageError):
            await s3.upload_file("snap/1.bin", src)
        assert len(proxy.seen(operation="CreateMultipartUpload")) == ATTEMPTS
    assert uploads_of(s3_endpoint, s3.name, "snap/1.bin") == []
    assert uploads_of(s3_endpoint, s3.name, "snap/1.bin.other") == [neighbour["UploadId"]]


@pytest.mark.parametrize("size", [1000, 7 * MiB], ids=["put", "multipart"])
async def test_retried_create_only_upload_that_landed_gets_412(
    s3_endpoint: str,
    proxied: tuple[S3Bucket, FaultProxy],
    tmp_path: Path,
    size: int,
) -> None:
    s3, proxy = proxied
    src = tmp_path / "snap.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    operation = "PutObject" if size < 6 * MiB else "CompleteMultipartUpload"
    # The first attempt creates the object and its answer is lost: the retry finds it.
    proxy.add(Fault.internal_error(operation=operation, after_upstream=True, count=1))
    with pytest.raises(PreconditionFailedError) as raised:
        await s3.upload_file("snap/2.bin", src, if_none_match="*")
    assert (raised.value.key, raised.value.operation) == ("snap/2.bin", "upload")
    # The landed attempt and the retry (for a multipart upload, the retry's HEAD finds the
    # object before any part is sent); the refusal itself is not retried.
    retried = 2 if operation == "PutObject" else 1
    assert len(proxy.seen(operation=operation)) == retried
    assert read_object(s3_endpoint, s3.name, "snap/2.bin") == data
    assert uploads_of(s3_endpoint, s3.name, "snap/2.bin") == []


async def test_a_create_only_multipart_upload_does_not_depend_on_if_none_match_on_complete(
    s3_endpoint: str, proxied: tuple[S3Bucket, FaultProxy], tmp_path: Path
) -> None:
    # Tigris does not document If-None-Match on CompleteMultipartUpload: an existing key is
    # refused before the upload starts, whatever the store does with that header.
    s3, proxy = proxied
    src = tmp_path / "snap.bin"
    first = os.urandom(7 * MiB)
    src.write_bytes(first)
    await s3.upload_file("snap/3.bin", src)
    src.write_bytes(os.urandom(7 * MiB))
    with pytest.raises(PreconditionFailedError) as raised:
        await s3.upload_file("snap/3.bin", src, if_none_match="*")
    assert (raised.value.key, raised.value.operation) == ("snap/3.bin", "upload")
    assert len(proxy.seen(operation="CreateMultipartUpload")) == 1  # the first upload's only
    assert read_object(s3_endpoint, s3.name, "snap/3.bin") == first
    assert uploads_of(s3_endpoint, s3.name, "snap/3.bin") == []


async def test_missing_credentials_name_the_variables_to_set(
    monkeypatch: pytest.MonkeyPatch, clean_environment: None, tmp_path: Path
) -> None:
    # Nothing for botocore to find: no variables, no files, no instance metadata.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    async with S3Bucket(
        "b", endpoint_url="http://127.0.0.1:9", region=DUMMY_REGION, retry=FAST_RETRY
    ) as s3:
        with pytest.raises(AccessDeniedError) as raised:
            await s3.get("k")
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(raised.value)
