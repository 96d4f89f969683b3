"""The S3 SDK boundary: opening an aioboto3 client, and SDK exceptions as plain values.

This is the only module that imports aioboto3, aiobotocore, botocore or aiohttp. The rest of
the S3 backend takes the client, ``ClientError`` (to read an answer's status) and the
``Failure`` values from here; ``s3_errors`` turns those values into tenantdb errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.handlers import add_expect_header
from botocore.loaders import Loader, create_loader

__all__ = [
    "SDK_ERRORS",
    "ClientError",
    "ClientSetupError",
    "Failure",
    "failure_of",
    "open_client",
    "status_and_code",
]

# What a call to the SDK can raise; anything else is not the SDK's (or the network's) doing.
# Local-file OSErrors are turned into LocalDiskError where they happen, so an OSError that
# reaches the boundary came from the network.
SDK_ERRORS: tuple[type[BaseException], ...] = (
    ClientError,
    BotoCoreError,
    aiohttp.ClientError,
    OSError,
)

# Tigris serves reads from the nearest region unless asked for consistency; the lease (and
# everything that reads or replaces it) must see the latest write, so these operations ask.
_TIGRIS_CONSISTENT_OPERATIONS = (
    "PutObject",
    "GetObject",
    "HeadObject",
    "DeleteObject",
    "ListObjectsV2",
)

# Network failures from botocore, aiobotocore and aiohttp: the request may not have reached
# the server, or its answer was lost. All are worth another attempt. SSLError is excluded:
# a certificate that does not verify will not start verifying on a retry.
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
    ResponseStreamingError,
    IncompleteReadError,
    HTTPClientError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    TimeoutError,  # asyncio.TimeoutError is TimeoutError since 3.11
    ConnectionError,
)

FailureKind = Literal["answer", "tls", "credentials", "parameters", "network", "other"]


@dataclass(frozen=True)
class Failure:
    """One SDK or network exception as plain values: what kind, and the server's answer."""

    kind: FailureKind
    # The HTTP status and S3 error code of an "answer" (0 and "" for the other kinds).
    status: int = 0
    code: str = ""
    # The exception's class name, for messages: never its text, which may carry URLs.
    name: str = ""


class ClientSetupError(Exception):
    """botocore refused to build a client (a bad endpoint URL, region or setting)."""


def status_and_code(exc: ClientError) -> tuple[int, str]:
    """The HTTP status and S3 error code of an answer the SDK raised as an error."""
    response: dict[str, Any] = exc.response or {}
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status, str(response.get("Error", {}).get("Code") or status)


def failure_of(exc: BaseException) -> Failure:
    """Classify an exception raised by an SDK call."""
    name = type(exc).__name__
    if isinstance(exc, ClientError):
        status, code = status_and_code(exc)
        return Failure("answer", status, code, name)
    if isinstance(exc, SSLError):
        return Failure("tls", name=name)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return Failure("credentials", name=name)
    if isinstance(exc, ParamValidationError):
        return Failure("parameters", name=name)
    if isinstance(exc, _NETWORK_ERRORS):
        return Failure("network", name=name)
    return Failure("other", name=name)


@cache
def _shared_loader() -> Loader:
    """botocore's model loader, shared by every client of the process.

    Parsing the S3 service model and endpoint rules costs tens of milliseconds per new
    session; the loader caches the parsed data and holds no credentials or loop state.
    """
    return create_loader()


def _new_session() -> Any:
    core = AioSession()
    core.register_component("data_loader", _shared_loader())
    return aioboto3.Session(botocore_session=core)


def _add_tigris_consistent_header(request: Any, **_: Any) -> None:
    """botocore ``before-sign`` hook: ask Tigris for read-after-write consistency."""
    request.headers["X-Tigris-Consistent"] = "true"


@asynccontextmanager
async def open_client(
    *,
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    addressing_style: str,
    tigris: bool,
    connect_timeout: float,
    read_timeout: float,
    max_pool_connections: int,
) -> AsyncIterator[Any]:
    """An S3 client that makes one attempt per call; ClientSetupError if botocore refuses."""
    config = AioConfig(
        region_name=region,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # One attempt per call: with_retries does the retrying, the same on every backend.
        retries={"total_max_attempts": 1, "mode": "standard"},
        # Only send or check checksums the API requires: many S3-compatible stores reject
        # or mangle the newer default CRC trailers. Payloads are still SHA-256 signed.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": addressing_style},
    )
    async with AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                _new_session().client(
                    "s3",
                    endpoint_url=endpoint_url,
                    region_name=region,
                    aws_access_key_id=access_key_id,
                    aws_secret_access_key=secret_access_key,
                    config=config,
                )
            )
        except (ValueError, BotoCoreError) as exc:
            raise ClientSetupError(type(exc).__name__) from exc
        # botocore sends "Expect: 100-continue" with every PUT body, and aiohttp arms no
        # read timeout while it waits for the "100 Continue": an endpoint that accepts
        # the connection and never answers (a hung load balancer) would hold a lease write
        # or an upload forever. Without the header the read timeout covers the whole wait.
        client.meta.events.unregister("before-call.s3", add_expect_header)
        if tigris:
            for operation in _TIGRIS_CONSISTENT_OPERATIONS:
                client.meta.events.register(
                    f"before-sign.s3.{operation}", _add_tigris_consistent_header
                )
        yield client
