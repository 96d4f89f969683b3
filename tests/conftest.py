"""Fixtures shared by every test: buckets on both backends and a real S3 server.

- ``s3_endpoint``: URL of the one moto S3 server process of the session (started lazily,
  so tests that never touch S3 never start it).
- ``s3_bucket``: an opened ``S3Bucket`` on a fresh, uniquely named bucket.
- ``make_s3_bucket``: the same with constructor options, e.g. a small multipart threshold.
- ``local_bucket``: an opened ``LocalBucket`` in ``tmp_path``.
- ``bucket``: both of the above in turn (test ids ``local`` and ``s3``): the contract.
- ``s3_settings_env``: environment variables naming a fresh bucket, for subprocesses.
- ``subprocess_env``: a clean copy of the environment for child processes.
- ``clean_environment``: the same variables removed from this process's own environment.

Tests marked ``@pytest.mark.long`` (ten seconds or more of wall time) are collected first: a
parallel run (``make test``: pytest-xdist) starts them at once instead of ending on them.

Test S3 buckets use the small part sizes below so that multipart code runs on objects of a
few MiB, and a fast retry policy so that failure tests do not sleep.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from tenantdb.config import Secret
from tenantdb.storage import Bucket, LocalBucket, RetryPolicy
from tenantdb.storage.s3 import S3Bucket
from tests.support.interrupt import install_interrupt_handler
from tests.support.process_tree import kill_descendants
from tests.support.s3_server import (
    DUMMY_ACCESS_KEY_ID,
    DUMMY_REGION,
    DUMMY_SECRET_ACCESS_KEY,
    s3_client,
    s3_env,
    s3_server,
)

MiB = 1 << 20
TEST_PART_SIZE = 5 * MiB  # the smallest part S3 accepts
TEST_MULTIPART_THRESHOLD = 6 * MiB
TEST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)

# Many servers run at once in the tests (and in their subprocesses, which inherit this): the
# tests that scrape metrics choose a free port of their own.
os.environ.setdefault("TENANTDB_METRICS_PORT", "0")

BUCKET_BACKENDS = ["local", "s3"]


def pytest_configure(config: pytest.Config) -> None:
    """Make Ctrl-C stop the run at once, leaving no server behind (tests.support.interrupt)."""
    install_interrupt_handler(lambda: config.pluginmanager.has_plugin("dsession"))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Kill whatever a test left running: a server outlives neither its test process nor the run."""
    kill_descendants(signal.SIGKILL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the long tests to the front, keeping the order within both parts."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def new_bucket_name() -> str:
    """A fresh bucket name, unique across the session (S3 names: 3-63 chars, lowercase)."""
    return f"test-{uuid.uuid4().hex[:20]}"


def create_s3_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on the test S3 server; return its name."""
    name = name or new_bucket_name()
    client = s3_client(endpoint)
    client.create_bucket(Bucket=name)
    client.close()
    return name


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of the session's moto S3 server (its own process)."""
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
async def make_s3_bucket(s3_endpoint: str) -> AsyncIterator[Callable[..., Awaitable[S3Bucket]]]:
    """A factory: ``await make_s3_bucket(**options)`` opens an S3Bucket on a fresh bucket."""
    async with AsyncExitStack() as stack:

        async def make(name: str | None = None, **options: Any) -> S3Bucket:
            options.setdefault("multipart_threshold", TEST_MULTIPART_THRESHOLD)
            options.setdefault("part_size", TEST_PART_SIZE)
            options.setdefault("retry", TEST_RETRY)
            bucket = S3Bucket(
                name or create_s3_bucket(s3_endpoint),
                endpoint_url=s3_endpoint,
                region=DUMMY_REGION,
                access_key_id=DUMMY_ACCESS_KEY_ID,
                secret_access_key=Secret(DUMMY_SECRET_ACCESS_KEY),
                **options,
            )
            return await stack.enter_async_context(bucket)

        yield make


@pytest.fixture
async def s3_bucket(make_s3_bucket: Callable[..., Awaitable[S3Bucket]]) -> S3Bucket:
    """An opened S3Bucket on a fresh bucket of the test S3 server."""
    return await make_s3_bucket()


@pytest.fixture
async def local_bucket(tmp_path: Path) -> AsyncIterator[LocalBucket]:
    """An opened LocalBucket in a fresh temporary directory."""
    async with LocalBucket(tmp_path / "local-bucket") as bucket:
        yield bucket


@pytest.fixture(params=BUCKET_BACKENDS)
def bucket(request: pytest.FixtureRequest) -> Bucket:
    """Each backend in turn, opened and empty: tests using it are the bucket contract."""
    # A plain fixture on purpose: pytest-asyncio can set up the async fixture it names
    # from here, but not from inside another async fixture (its loop would be running).
    chosen: Bucket = request.getfixturevalue(f"{request.param}_bucket")
    return chosen


@pytest.fixture
def s3_settings_env(s3_endpoint: str) -> dict[str, str]:
    """Environment variables naming a fresh S3 bucket, for tests that start subprocesses.

    Merge it into ``subprocess_env`` rather than using it alone: a child process still
    needs PATH and friends.
    """
    return s3_env(create_s3_bucket(s3_endpoint), s3_endpoint)


# Variables tests and their child processes must not inherit from the developer's shell:
# they would point tests at a real bucket or app, or change tenantdb's behaviour.
_SCRUBBED_PREFIXES = ("AWS_", "BUCKET_NAME", "TENANTDB_", "FLY_", "TENANT_ID", "CUSTOMER_ID")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the S3/Fly/tenantdb settings from ``os.environ`` for this test.

    For modules whose code under test reads the environment itself (or starts processes
    inheriting it): ``pytestmark = pytest.mark.usefixtures("clean_environment")``.
    """
    for name in list(os.environ):
        if name.startswith(_SCRUBBED_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """A copy of ``os.environ`` for child processes: no S3/Fly/tenantdb settings, and the
    repository on PYTHONPATH (so ``python -m tests.support...`` works from anywhere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env
