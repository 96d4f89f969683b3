"""Secrets: the S3 secret key and FLY_API_TOKEN never appear in logs, exception messages,
reprs or answers, even with DEBUG logging on for tenantdb, botocore and httpx, and with the
bucket and the Machines API failing (so errors are logged) and an API that echoes the
token back in its error bodies.

A leak is any run of ``WINDOW`` characters of a secret: a token cut in half by a length
limit is still a leak.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tenantdb.config import Secret, Settings
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.errors import MachinesAPIError, StorageError
from tenantdb.logs import JSONFormatter, KeyValueFormatter
from tenantdb.machine.database import TenantDB
from tenantdb.metrics import Metrics
from tenantdb.routing.machines_api import MachinesClient
from tenantdb.storage.metered import MeteredBucket
from tenantdb.storage.s3 import S3Bucket
from tests.faults.conftest import ProxiedS3
from tests.support.fault_proxy import Fault
from tests.support.s3_server import DUMMY_ACCESS_KEY_ID, DUMMY_REGION
from tests.support.servers import ROOT, free_port

S3_SECRET = "S3SECRET-q7Zr2XbV9wLk4PnT8sYd3HfJ6mQc1GxA"
FLY_TOKEN = "FlyV1 fm2_SECRETTOKEN-Jd83kLq0PzW5nXr7Tb2YvC9hM4sG6eU1"
WINDOW = 12


def leaks(text: str, secret: str = "") -> list[str]:
    """The pieces of a secret (any ``WINDOW`` characters of it) found in ``text``."""
    found = []
    for value in [secret] if secret else [S3_SECRET, FLY_TOKEN.removeprefix("FlyV1 ")]:
        for start in range(len(value) - WINDOW + 1):
            piece = value[start : start + WINDOW]
            if piece in text:
                found.append(piece)
                break
    return found


# -- a Machines API that fails, echoing the token ---------------------------------------------


class EchoingAPI:
    """Answers every call with an error whose body quotes the Authorization header."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.calls = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api.calls += 1
                auth = self.headers.get("authorization", "")
                # Long enough that a length limit on the detail cuts the token in half.
                message = f"{'request refused by the policy engine; ' * 4}credentials: {auth}"
                body = json.dumps({"error": message}).encode()
                self.send_response(api.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_DELETE = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def echoing_api() -> Iterator[EchoingAPI]:
    api = EchoingAPI(401)
    yield api
    api.close()


def bucket_with_the_secret(s3: ProxiedS3, **options: Any) -> S3Bucket:
    """An S3Bucket (not opened) through the fault proxy, its secret key ``S3_SECRET``."""
    return S3Bucket(
        s3.name,
        endpoint_url=s3.proxy.url,
        region=DUMMY_REGION,
        access_key_id=DUMMY_ACCESS_KEY_ID,
        secret_access_key=Secret(S3_SECRET),
        **options,
    )


# -- reprs and messages ------------------------------------------------------------------------


def test_settings_never_show_the_secrets() -> None:
    settings = Settings.from_env(
        {"AWS_SECRET_ACCESS_KEY": S3_SECRET, "FLY_API_TOKEN": FLY_TOKEN, "TENANT_ID": "acme"}
    )
    for text in (
        repr(settings),
        str(settings),
        str(asdict(settings)),
        json.dumps(asdict(settings), default=str),
        repr(settings.secret_access_key),
        f"{settings.fly_api_token}",
        "%s %r" % (settings.fly_api_token, settings.secret_access_key),  # noqa: UP031
    ):
        assert leaks(text) == [], text
    assert settings.secret_access_key is not None
    assert settings.secret_access_key.reveal() == S3_SECRET


async def test_bucket_and_client_reprs_never_show_the_secrets(s3: ProxiedS3) -> None:
    bucket = bucket_with_the_secret(s3)
    assert leaks(repr(bucket) + str(bucket) + str(vars(bucket))) == []
    async with bucket:
        assert leaks(repr(bucket) + str(bucket)) == []
    client = MachinesClient("secrets-app", Secret(FLY_TOKEN), "http://127.0.0.1:9")
    assert leaks(repr(client) + str(client) + str(vars(client))) == []
    async with client:
        assert leaks(repr(client) + str(vars(client))) == []


async def test_machines_api_errors_never_carry_the_token(echoing_api: EchoingAPI) -> None:
    async with MachinesClient("secrets-app", Secret(FLY_TOKEN), echoing_api.url) as client:
        with pytest.raises(MachinesAPIError) as raised:
            await client.list_machines({"customer_id": "acme"})
    assert echoing_api.calls == 1
    assert raised.value.status == 401
    assert "credentials" in str(raised.value)  # the API's words are kept...
    assert leaks(str(raised.value)) == []  # ...but not the token, not even a piece of it
    assert leaks(repr(raised.value)) == []


async def test_tenantdb_with_a_failing_bucket_logs_no_secret_even_at_debug(
    s3: ProxiedS3, caplog: pytest.LogCaptureFixture
) -> None:
    """...nor in its log lines in either format, nor in its metrics."""
    caplog.set_level(logging.DEBUG)  # every logger: tenantdb, botocore, aiobotocore...
    metrics = Metrics()
    bucket = MeteredBucket(bucket_with_the_secret(s3, read_timeout=1), metrics)
    s3.proxy.add(
        Fault.slow_down(probability=0.3),
        Fault.error(403, "SignatureDoesNotMatch", operation="PutObject", key="*/snapshots/*"),
    )
    errors: list[BaseException] = []
    async with bucket:
        tdb = TenantDB(s3.settings("m1", kill_timeout=2), bucket=bucket, metrics=metrics)
        try:
            await tdb.start(standby=False)
        except StorageError as exc:
            errors.append(exc)
        else:
            try:
                await tdb.checkpoint()
            except StorageError as exc:
                errors.append(exc)
            await tdb.stop()  # the final publish fails: CRITICAL, with the path
    assert errors, "the failing bucket should have made something fail"
    records = caplog.records
    assert any(r.name.startswith("botocore") and r.levelno == logging.DEBUG for r in records)
    assert any(r.name.startswith("tenantdb") and r.levelno >= logging.WARNING for r in records)
    text = caplog.text + "".join(f"{e!s}{e!r}{e.__cause__!s}{e.__cause__!r}" for e in errors)
    assert leaks(text) == []
    lines = [f.format(r) for r in records for f in (KeyValueFormatter(), JSONFormatter())]
    assert leaks("\n".join(lines)) == []
    scraped = metrics.text()
    assert 'tenantdb_bucket_errors_total{kind="' in scraped  # the failures were counted
    assert leaks(scraped) == []


# -- the demo app, as a process ----------------------------------------------------------------


def test_the_demo_app_prints_no_secret_with_debug_logging_and_failures(
    s3: ProxiedS3, echoing_api: EchoingAPI, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    port = free_port()
    dns = DevDNSServer("secrets-app")
    # The demo under DEBUG logging for every logger, with a failing bucket (renewals and
    # uploads fail part of the time, snapshot uploads always) and a failing Machines API.
    s3.proxy.add(
        Fault.error(403, "AccessDenied", operation="PutObject", key="*/snapshots/*"),
        Fault.slow_down(probability=0.2),
    )
    env = {
        **subprocess_env,
        **s3.env(),
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "FLY_API_TOKEN": FLY_TOKEN,
        "FLY_APP_NAME": "secrets-app",
        "FLY_MACHINE_ID": "m1",
        "TENANT_ID": "100",
        "TENANTDB_DATA_DIR": str(tmp_path / "data"),
        "TENANTDB_LEASE_TTL": "3",
        "TENANTDB_CHECKPOINT_INTERVAL": "0.5",
        "TENANTDB_KILL_TIMEOUT": "3",
        "TENANTDB_MACHINES_API_URL": echoing_api.url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    debug_demo = (
        "import logging, runpy; logging.basicConfig(level=logging.DEBUG); "
        "runpy.run_module('example_app', run_name='__main__')"
    )
    answers: list[str] = []
    with dns.run_in_thread():
        env["TENANTDB_DNS_SERVER"] = f"{dns.address[0]}:{dns.address[1]}"
        log_path = tmp_path / "demo.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-c", debug_demo],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_until_up(proc, f"http://127.0.0.1:{port}/healthz", log_path)
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
                    for path in ["/customers/100", "/customers/300", "/customers/100"]:
                        response = client.get(path, headers={"accept": "application/json"})
                        answers.append(f"{response.status_code} {response.headers} {response.text}")
                time.sleep(1.5)  # checkpoints fail meanwhile, renewals now and then
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    output = log_path.read_text(errors="replace")
    # The run did what it should: DEBUG from botocore and httpx, tenantdb errors, and the
    # Machines API was asked about tenant 300 (which DNS and the bucket do not know).
    # configure_logging() kept the DEBUG level of the basicConfig() it took over from.
    assert "level=debug logger=botocore" in output
    assert "level=debug logger=httpx" in output or "level=debug logger=httpcore" in output
    assert "FINAL PUBLISH FAILED" in output
    assert echoing_api.calls >= 1
    assert "credentials" in " ".join(answers) + output  # the API's error text got through
    assert leaks(output) == [], [line for line in output.splitlines() if leaks(line)][:5]
    assert leaks(" ".join(answers)) == []
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != S3_SECRET  # only the child had it


def wait_until_up(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(log_path.read_text())
