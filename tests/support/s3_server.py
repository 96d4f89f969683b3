"""A moto S3 server in its own process, for tests and benchmarks.

Run ``python -m tests.support.s3_server [--port N]``: it serves moto's S3 on 127.0.0.1 and
prints the port on stdout once the socket is listening. From Python, use
``start_s3_server()`` (returns the process and the endpoint URL) or the ``s3_server()``
context manager, which kills the process on exit; ``s3_client(endpoint)`` for a plain boto3
client on it and ``s3_env(bucket, endpoint)`` for the variables naming a bucket on it.

The server is single-threaded on purpose: werkzeug then handles one request at a time, so
moto's check-then-write for conditional PUTs cannot interleave and If-None-Match / If-Match
behave atomically, like real S3. Being single-threaded also means HTTP/1.0 (no keep-alive),
so one idle pooled connection can never starve the others.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "DUMMY_ACCESS_KEY_ID",
    "DUMMY_REGION",
    "DUMMY_SECRET_ACCESS_KEY",
    "s3_client",
    "s3_env",
    "s3_server",
    "start_s3_server",
    "stop_s3_server",
]

DUMMY_ACCESS_KEY_ID = "testing"
DUMMY_SECRET_ACCESS_KEY = "testing"  # moto accepts any credentials
DUMMY_REGION = "us-east-1"

_ROOT = Path(__file__).resolve().parents[2]


def s3_client(endpoint: str) -> Any:
    """A plain boto3 S3 client on the server at ``endpoint``; close it when done."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=DUMMY_REGION,
        aws_access_key_id=DUMMY_ACCESS_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY,
    )


def s3_env(bucket: str, endpoint: str) -> dict[str, str]:
    """Environment variables naming ``bucket`` on the server at ``endpoint``."""
    return {
        "BUCKET_NAME": bucket,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_ACCESS_KEY,
        "AWS_REGION": DUMMY_REGION,
    }


def serve(port: int = 0) -> None:
    """Serve moto's S3 on 127.0.0.1:``port`` (0 = any free port) until killed."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    # One log line per request would drown test output; errors still reach stderr.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", port, app, threaded=False, request_handler=MotoRequestHandler)
    # The parent reads this line to learn the port: print it only once the socket listens.
    print(server.server_port, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


def start_s3_server(timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server in its own process; return it and its endpoint URL once ready."""
    env = dict(os.environ)
    # moto reads these to build its fake account; never let real credentials leak in.
    env.update(
        AWS_ACCESS_KEY_ID=DUMMY_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=DUMMY_SECRET_ACCESS_KEY,
        AWS_DEFAULT_REGION=DUMMY_REGION,
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.s3_server"],
        cwd=_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            stop_s3_server(process)
            raise RuntimeError(f"moto S3 server did not start (exit code {process.returncode})")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            chunk = os.read(process.stdout.fileno(), 64)
            if not chunk:
                continue
            line += chunk
    return process, f"http://127.0.0.1:{int(line.strip())}"


def stop_s3_server(process: subprocess.Popen[bytes]) -> None:
    """Kill the server process and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


@contextmanager
def s3_server() -> Iterator[str]:
    """Run the server for the duration of a ``with`` block; yield its endpoint URL."""
    process, endpoint = start_s3_server()
    try:
        yield endpoint
    finally:
        stop_s3_server(process)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python -m tests.support.s3_server [--port N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 = any)")
    serve(parser.parse_args(argv).port)


if __name__ == "__main__":
    main()
