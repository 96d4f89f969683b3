"""What the benchmarks share: a counting moto S3 server, SQLite fixtures, memory probes.

- ``S3Server``: moto's S3 in its own process (single-threaded werkzeug, as in the tests),
  wrapped in a WSGI middleware that records every request it receives. The recording is
  read (and reset) over HTTP at ``/__bench__/requests``: ``__bench__`` is not a valid
  bucket name, so it can never collide with an S3 request.
- ``fill_database``: a real SQLite file of a given size (random blobs, one row per page),
  optionally with a tail of committed rows left in its WAL. ``python -m bench.common fill``
  runs it in a child process, so the parent's peak RSS never includes it.
- ``MemoryWatch``: peak RSS growth over a measured window, from ``ru_maxrss`` and from a
  sampler of ``/proc/self/statm`` (whichever sees more).

Run ``python -m bench.common serve-s3`` to serve the counting S3 on 127.0.0.1 (it prints the
port once listening).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"  # moto accepts any credentials
REGION = "us-east-1"
CONTROL_PATH = "/__bench__/requests"
# Variables tenantdb or boto3 would read: a child process gets only what the bench sets.
_FOREIGN_PREFIXES = ("AWS_", "TENANTDB_", "FLY_")
_FOREIGN_NAMES = frozenset({"BUCKET_NAME", "TENANT_ID", "CUSTOMER_ID", "PORT"})


# -- the S3 server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request the S3 server received."""

    method: str
    path: str
    query: str
    body_bytes: int
    status: int = 0  # the HTTP status moto answered (0: not known)

    @property
    def kind(self) -> str:
        """A short S3 name for the request: GetObject, PutObject, UploadPart, ..."""
        query = self.query
        params = {part.split("=", 1)[0] for part in query.split("&") if part}
        key = self.path.strip("/").count("/") >= 1
        if self.method == "GET":
            if "list-type" in params or not key:
                return "ListObjectsV2"
            return "GetObject"
        if self.method == "HEAD":
            return "HeadObject"
        if self.method == "DELETE":
            return "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
        if self.method == "POST":
            if "uploads" in params:
                return "CreateMultipartUpload"
            if "uploadId" in params:
                return "CompleteMultipartUpload"
            return "DeleteObjects" if "delete" in params else "POST"
        if self.method == "PUT":
            if "partNumber" in params:
                return "UploadPart"
            return "PutObject" if key else "CreateBucket"
        return self.method


class _CountingApp:
    """WSGI middleware recording each request before moto answers it."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.requests: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == CONTROL_PATH:
            body = json.dumps(self.requests).encode()
            if "reset=1" in environ.get("QUERY_STRING", ""):
                self.requests = []
            start_response(
                "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        request = {
            "method": environ.get("REQUEST_METHOD", ""),
            "path": path,
            "query": environ.get("QUERY_STRING", ""),
            "body_bytes": int(environ.get("CONTENT_LENGTH") or 0),
            "status": 0,
        }
        self.requests.append(request)

        def recording(status: str, headers: Any, *exc_info: Any) -> Any:
            request["status"] = int(status.split(" ", 1)[0])
            return start_response(status, headers, *exc_info)

        return self.app(environ, recording)


def serve_s3(port: int = 0) -> None:
    """Serve the counting moto S3 on 127.0.0.1:``port`` until killed; print the port."""
    import logging

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = _CountingApp(DomainDispatcherApplication(create_backend_app))
    # Single-threaded, as in tests/support/s3_server.py: conditional writes stay atomic.
    server = make_server("127.0.0.1", port, app, threaded=False, request_handler=MotoRequestHandler)
    print(server.server_port, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: dummy credentials, the repo on the path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_FOREIGN_PREFIXES) and k not in _FOREIGN_NAMES
    }
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
        AWS_DEFAULT_REGION=REGION,
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class S3Server:
    """The counting moto S3 server in its own process (use as a context manager)."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.common", "serve-s3"],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                self.close()
                raise RuntimeError("the moto S3 server did not start")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                line += os.read(self.process.stdout.fileno(), 64)
        self.endpoint = f"http://127.0.0.1:{int(line.strip())}"

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the server and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def requests(self, *, reset: bool = True) -> list[Request]:
        """The requests received since the last reset (control requests excluded)."""
        url = f"{self.endpoint}{CONTROL_PATH}{'?reset=1' if reset else ''}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return [Request(**item) for item in json.load(response)]

    def client(self) -> Any:
        """A plain boto3 client on this server (the baseline's SDK, default settings)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket; return its name."""
        client = self.client()
        client.create_bucket(Bucket=name)
        client.close()
        return name

    def settings_env(self, bucket: str) -> dict[str, str]:
        """Environment variables naming ``bucket`` on this server, as tenantdb reads them."""
        return {
            "BENCH_S3_PID": str(self.process.pid),
            "BUCKET_NAME": bucket,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }


# -- SQLite fixtures -------------------------------------------------------------------------

# A 3,000-byte random blob fills one 4 KiB page per row, incompressible.
_ROW_BYTES = 3000
_PAGE = 4096


def fill_database(path: Path, size: int, *, wal_tail: int = 0, table: str = "blobs") -> None:
    """Grow the SQLite file ``path`` to about ``size`` bytes of random rows.

    With ``wal_tail``, that many more bytes of rows are committed afterwards with automatic
    checkpoints off, so they are only in the ``-wal`` file (keep another connection open
    to the database, or closing this one checkpoints them).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if wal_tail:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, body BLOB)")
        insert = (
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?) "
            f"INSERT INTO {table} (body) SELECT randomblob({_ROW_BYTES}) FROM n"
        )
        batch = 16 * MiB // _PAGE
        while (have := path.stat().st_size) < size:
            rows = max(1, min(batch, (size - have) // _PAGE))
            conn.execute("BEGIN")
            conn.execute(insert, (rows,))
            conn.execute("COMMIT")
            if wal_tail:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if wal_tail:
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("BEGIN")
            conn.execute(insert, (max(1, wal_tail // _PAGE),))
            conn.execute("COMMIT")
    finally:
        conn.close()


def fill_database_in_child(path: Path, size: int, *, wal_tail: int = 0) -> None:
    """``fill_database`` in a child process (the caller's peak RSS stays untouched)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.common",
            "fill",
            str(path),
            "--bytes",
            str(size),
            "--wal-tail",
            str(wal_tail),
        ],
        cwd=ROOT,
        env=child_env(),
        check=True,
    )


def write_random_file(path: Path, size: int) -> None:
    """Write ``size`` random bytes, one MiB at a time."""
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))


# -- measuring -------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (0 if ``pid`` is None)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid() -> int | None:
    """The S3 server's pid, as a probe finds it in ``BENCH_S3_PID``."""
    raw = os.environ.get("BENCH_S3_PID")
    return int(raw) if raw else None


def maxrss_bytes() -> int:
    """This process's peak RSS so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryWatch:
    """Peak RSS growth over a ``with`` block: ru_maxrss and a 50 ms RSS sampler."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.growth = 0
        self._stop = threading.Event()
        self._peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> MemoryWatch:
        self._start_rss = _rss_bytes()
        self._start_max = maxrss_bytes()
        self._peak = self._start_rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.growth = max(self._peak - self._start_rss, maxrss_bytes() - self._start_max, 0)


def run_probe(module: str, args: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` in a fresh process; return its last JSON line."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{module} printed no result:\n{result.stdout}\n{result.stderr}")
    data: dict[str, Any] = json.loads(lines[-1])
    return data


def median(values: Iterable[float]) -> float:
    """The median of some figures."""
    return statistics.median(list(values))


def alternate(rounds: int, names: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """Yield (round number, order of the ways); the order flips every round (ABBA)."""
    for n in range(1, rounds + 1):
        yield n, list(names) if n % 2 else list(reversed(names))


def baseline_root(commit: str) -> Path:
    """A detached worktree of ``commit`` for a ``--baseline`` (made once, kept for later runs)."""
    path = Path(tempfile.gettempdir()) / f"tenantdb-baseline-{commit}"
    if not path.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), commit],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return path


def machine() -> str:
    """One line naming the machine: CPU model, cores, Python, load average."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {load}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.common serve-s3`` or ``python -m bench.common fill PATH``."""
    parser = argparse.ArgumentParser(prog="python -m bench.common")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve-s3", help="serve the counting moto S3")
    serve.add_argument("--port", type=int, default=0)
    fill = commands.add_parser("fill", help="grow a SQLite file with random rows")
    fill.add_argument("path", type=Path)
    fill.add_argument("--bytes", type=int, required=True)
    fill.add_argument("--wal-tail", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "serve-s3":
        serve_s3(args.port)
    else:
        fill_database(args.path, args.bytes, wal_tail=args.wal_tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
