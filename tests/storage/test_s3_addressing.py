"""Which URL each S3 endpoint gets: virtual-hosted style for Tigris, path style elsewhere.

Tigris cannot be reached from the tests, so a botocore ``before-send`` hook records the URL
of the request botocore is about to send (signed, final) and stops it there. A loopback
endpoint is also checked on the wire, against a real HTTP server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tenantdb.config import Settings
from tenantdb.errors import ConfigurationError
from tenantdb.storage.s3 import S3Bucket
from tests.storage.test_s3_errors import OK_PUT, ScriptedS3, s3_for, scripted  # noqa: F401 - a fixture


class _Stopped(Exception):
    """Raised by the hook in place of sending: the request never leaves the process."""


async def _sent_url(bucket: S3Bucket) -> str:
    """The URL botocore would send a PUT of ``tenants/acme/lock.json`` to."""
    urls: list[str] = []

    def record(request: Any, **_: Any) -> None:
        urls.append(request.url)
        raise _Stopped

    async with bucket:
        bucket._s3.meta.events.register("before-send.s3", record)
        with pytest.raises(_Stopped):
            await bucket.put("tenants/acme/lock.json", b"{}", if_none_match="*")
    assert len(urls) == 1
    return urls[0]


def _bucket(endpoint: str | None, **env: str) -> S3Bucket:
    settings = Settings.from_env(
        {
            "BUCKET_NAME": "tenantdb-demo",
            "AWS_ACCESS_KEY_ID": "tid_example",
            "AWS_SECRET_ACCESS_KEY": "tsec_example",
            **({"AWS_ENDPOINT_URL_S3": endpoint} if endpoint else {}),
            **env,
        }
    )
    return S3Bucket.from_settings(settings)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        # Fly's `fly storage create` sets this endpoint: the bucket goes in the host name.
        (
            "https://fly.storage.tigris.dev",
            "https://tenantdb-demo.fly.storage.tigris.dev/tenants/acme/lock.json",
        ),
        ("https://t3.storage.dev", "https://tenantdb-demo.t3.storage.dev/tenants/acme/lock.json"),
        # Any other S3-compatible store keeps the path style they all accept.
        (
            "https://minio.example.com",
            "https://minio.example.com/tenantdb-demo/tenants/acme/lock.json",
        ),
        ("http://localhost:9000", "http://localhost:9000/tenantdb-demo/tenants/acme/lock.json"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000/tenantdb-demo/tenants/acme/lock.json"),
    ],
)
async def test_each_endpoint_gets_its_addressing_style(endpoint: str, expected: str) -> None:
    assert await _sent_url(_bucket(endpoint)) == expected


async def test_a_tigris_look_alike_host_is_not_tigris() -> None:
    url = await _sent_url(_bucket("https://fly.storage.tigris.dev.example.com"))
    assert url == "https://fly.storage.tigris.dev.example.com/tenantdb-demo/tenants/acme/lock.json"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("path", "https://fly.storage.tigris.dev/tenantdb-demo/tenants/acme/lock.json"),
        ("virtual", "https://tenantdb-demo.minio.example.com/tenants/acme/lock.json"),
    ],
)
async def test_the_addressing_setting_overrides_the_endpoint_default(
    choice: str, expected: str
) -> None:
    endpoint = "https://fly.storage.tigris.dev" if choice == "path" else "https://minio.example.com"
    assert await _sent_url(_bucket(endpoint, TENANTDB_S3_ADDRESSING=choice)) == expected


def test_an_unknown_addressing_setting_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="TENANTDB_S3_ADDRESSING"):
        _bucket("https://t3.storage.dev", TENANTDB_S3_ADDRESSING="vhost")


async def test_tigris_without_a_region_signs_for_region_auto() -> None:
    signed: list[str] = []

    def record(request: Any, **_: Any) -> None:
        signed.append(request.headers["Authorization"].decode())
        raise _Stopped

    bucket = _bucket("https://fly.storage.tigris.dev")
    assert bucket.region == "auto"
    async with bucket:
        bucket._s3.meta.events.register("before-send.s3", record)
        with pytest.raises(_Stopped):
            await bucket.get("tenants/acme/lock.json")
    assert "/auto/s3/aws4_request" in signed[0]


async def test_a_loopback_server_receives_path_style_requests(
    scripted: Callable[..., ScriptedS3],  # noqa: F811 - the fixture imported above
) -> None:
    server = scripted(OK_PUT)
    async with s3_for(server.endpoint, name="tenantdb-demo") as s3:
        await s3.put("tenants/acme/lock.json", b"{}")
    assert server.requests[0].path == "/tenantdb-demo/tenants/acme/lock.json"
